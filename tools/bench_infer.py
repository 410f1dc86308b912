"""Inference benchmark (issue 9 `bench_infer`; goal from issue 4), ratios measured in one process: compacted vs
dense per-task graphs at several kept fractions of LPS columns; goal ≥ 1.5× faster at 50 % kept, batch 64.
(Inference right after a task switch, issue 5, is measured on the runtime itself by `tools/bench_switch.py`.)

The model is the wide MLP preset (width 8: 64 → 2048 → 2048 → 10, 4.3 M parameters) with column-structured LPS
masks built by `edgecl.synthetic` (random weights: latency does not depend on trained values). Timings are
medians of interleaved repeats, so machine noise hits both sides of a ratio alike. One command:

    python tools/bench_infer.py --out bench_infer.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgecl.arch import preset
from edgecl.deltas import materialize
from edgecl.export import task_model
from edgecl.graph.builder import INPUT
from edgecl.synthetic import structured_lps_model
from edgecl.machine import format_machine, machine_info


def session(model, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def interleaved_medians(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each callable (each returns the seconds it measured), taken round-robin."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[[], object], inner: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner
    return run


def bench_compact(arch, fractions: list[float], batches: list[int], threads: int, repeats: int,
                  inner: int) -> list[dict]:
    """Dense vs compacted graph of task 0 at each kept fraction of LPS columns."""
    rows = []
    for frac in fractions:
        packed = structured_lps_model(arch, frac, n_tasks=2, unit="column", seed=0)
        params = materialize(packed, 0)
        dense_model, _ = task_model(arch, params, compact=False)
        small_model, info = task_model(arch, params, compact=True)
        dense, small = session(dense_model, threads), session(small_model, threads)
        for batch in batches:
            x = np.random.default_rng(batch).random((batch, *arch["input_shape"]), dtype=np.float32)
            err = float(np.abs(dense.run(None, {INPUT: x})[0] - small.run(None, {INPUT: x})[0]).max())
            n = inner if batch > 1 else 4 * inner
            med = interleaved_medians({"dense": timed(lambda: dense.run(None, {INPUT: x}), n),
                                       "compact": timed(lambda: small.run(None, {INPUT: x}), n)}, repeats)
            rows.append({"kept": frac, "batch": batch, "params_dense": info["params_dense"],
                         "params_compact": info["params_compact"], "dense_ms": 1e3 * med["dense"],
                         "compact_ms": 1e3 * med["compact"], "speedup": med["dense"] / med["compact"],
                         "max_abs_diff": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=8, help="MLP width multiplier (8 → 4.3 M parameters)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--inner", type=int, default=5, help="calls per timed repeat (batch 64; ×4 at batch 1)")
    parser.add_argument("--kept", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--out", default="bench_infer.json")
    args = parser.parse_args()
    info = machine_info()
    print(format_machine(info))
    arch = preset("mlp", width=args.width)
    batches = [int(b) for b in args.batches.split(",")]
    fractions = [float(f) for f in args.kept.split(",")]
    print(f"model: mlp width {args.width}, ONNX Runtime threads {args.threads}, median of {args.repeats} repeats")

    compact_rows = bench_compact(arch, fractions, batches, args.threads, args.repeats, args.inner)
    print("\ncompacted vs dense per-task graph, LPS column pruning (goal ≥ 1.5× at 50 % kept, batch 64)")
    print(f"{'kept':>5} {'batch':>5} {'params dense':>12} {'compact':>9} {'dense ms':>9} {'compact ms':>10} "
          f"{'speedup':>7} {'max|Δ|':>8}")
    for r in compact_rows:
        print(f"{r['kept']:>5.2f} {r['batch']:>5} {r['params_dense']:>12} {r['params_compact']:>9} "
              f"{r['dense_ms']:>9.3f} {r['compact_ms']:>10.3f} {r['speedup']:>7.2f} {r['max_abs_diff']:>8.1e}")
    goal = [r for r in compact_rows if r["kept"] == 0.5 and r["batch"] == 64]
    result = {"machine": info, "config": vars(args), "compact": compact_rows,
              "goals": {"compact_ge_1.5_at_half_batch64": bool(goal) and goal[0]["speedup"] >= 1.5}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\ngoals: {result['goals']}; wrote {args.out}")


if __name__ == "__main__":
    main()
