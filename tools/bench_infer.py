"""Inference benchmark (issue 9 `bench_infer`; goal from issue 4), ratios measured in one process: compacted vs
dense per-task graphs at several kept fractions of LPS columns; goal ≥ 1.5× faster at 50 % kept, batch 64.
(Inference right after a task switch, issue 5, is measured on the runtime itself by `tools/bench_switch.py`.)

The model is the wide MLP preset (width 8: 64 → 2048 → 2048 → 10, 4.3 M parameters) with column-structured LPS
masks built by `edgecl.synthetic` (random weights: latency does not depend on trained values). With `--arch` (a
spec as `edgecl train --arch` takes it, e.g. torchvision's resnet18 at 3×32×32, 11.2 M parameters) the model is
instead AGS-CL-shaped: per task a random `--alive` fraction of every channel group alive
(`edgecl.synthetic.group_node_model`, zero rows and columns as `materialize` gives them), and each task's
compacted graph (channel groups at multiples of 16, the default) and its exact one (no rounding) are timed against
the dense graph, with their parity. Timings are medians of interleaved repeats, so machine noise hits both sides of
a ratio alike. One command each:

    python tools/bench_infer.py --out bench_infer.json
    python tools/bench_infer.py --arch torchvision.models:resnet18 --input-shape 3,32,32 --out bench_infer_resnet18.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from edgecl.arch import preset
from edgecl.deltas import materialize
from edgecl.export import compact_task, task_model
from edgecl.graph.builder import INPUT, build_onnx
from edgecl.synthetic import group_node_model, structured_lps_model
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


def against_dense(models: dict[str, onnx.ModelProto], arch: dict, batches: list[int], threads: int, repeats: int,
                  inner: int) -> dict[int, dict[str, float]]:
    """Per batch: each model's median ms, its speedup over models["dense"] and its max |Δ logits| from it."""
    sessions = {name: session(model, threads) for name, model in models.items()}
    out = {}
    for batch in batches:
        x = np.random.default_rng(batch).random((batch, *arch["input_shape"]), dtype=np.float32)
        logits = {name: s.run(None, {INPUT: x})[0] for name, s in sessions.items()}
        n = inner if batch > 1 else 4 * inner
        med = interleaved_medians({name: timed(lambda s=s: s.run(None, {INPUT: x}), n)
                                   for name, s in sessions.items()}, repeats)
        row = {f"{name}_ms": 1e3 * t for name, t in med.items()}
        for name in sessions:
            if name != "dense":
                row[f"{name}_speedup"] = med["dense"] / med[name]
                row[f"{name}_max_abs_diff"] = float(np.abs(logits[name] - logits["dense"]).max())
        out[batch] = row
    return out


def bench_compact(arch, fractions: list[float], batches: list[int], threads: int, repeats: int,
                  inner: int) -> list[dict]:
    """Dense vs compacted graph of task 0 at each kept fraction of LPS columns."""
    rows = []
    for frac in fractions:
        packed = structured_lps_model(arch, frac, n_tasks=2, unit="column", seed=0)
        params = materialize(packed, 0)
        dense_model, _ = task_model(arch, params, compact=False)
        small_model, info = task_model(arch, params, compact=True)
        timing = against_dense({"dense": dense_model, "compact": small_model}, arch, batches, threads, repeats, inner)
        for batch, r in timing.items():
            rows.append({"kept": frac, "batch": batch, "params_dense": info["params_dense"],
                         "params_compact": info["params_compact"], "dense_ms": r["dense_ms"],
                         "compact_ms": r["compact_ms"], "speedup": r["compact_speedup"],
                         "max_abs_diff": r["compact_max_abs_diff"]})
    return rows


def bench_node_graph(arch, alive: float, n_tasks: int, batches: list[int], threads: int, repeats: int,
                     inner: int) -> list[dict]:
    """Per task of an AGS-CL-shaped model: dense vs compacted (rounded to the blocked layout) vs exactly compacted."""
    packed = group_node_model(arch, alive, n_tasks=n_tasks, seed=0)
    rows = []
    for t in range(n_tasks):
        params = materialize(packed, t)
        exact_arch, exact_params, exact = compact_task(arch, params, channel_multiple=1)
        models = {"dense": task_model(arch, params, compact=False)[0]}
        models["compact"], info = task_model(arch, params, compact=True)
        models["exact"] = build_onnx(exact_arch, exact_params)
        for batch, r in against_dense(models, arch, batches, threads, repeats, inner).items():
            rows.append({"task": t, "batch": batch, "alive": alive, "params_dense": info["params_dense"],
                         "params_compact": info["params_compact"], "params_exact": exact.params_compact,
                         "groups_compact": {g: v[1] for g, v in info["compaction"]["groups"].items()},
                         "groups_exact": {g: v[1] for g, v in exact.groups.items()}, **r})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=8, help="MLP width multiplier (8 → 4.3 M parameters)")
    parser.add_argument("--arch", default="mlp", help="mlp (LPS columns), or a graph spec (AGS-CL-shaped node masks), "
                        "e.g. torchvision.models:resnet18")
    parser.add_argument("--input-shape", default="3,32,32", help="C,H,W for --arch")
    parser.add_argument("--alive", type=float, default=0.5, help="alive fraction of every channel group (--arch)")
    parser.add_argument("--tasks", type=int, default=2, help="tasks of the node-mask model (--arch)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--inner", type=int, default=5, help="calls per timed repeat (batch 64; ×4 at batch 1)")
    parser.add_argument("--kept", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--out", default="bench_infer.json")
    args = parser.parse_args()
    info = machine_info()
    print(format_machine(info))
    batches = [int(b) for b in args.batches.split(",")]
    if args.arch != "mlp":
        return node_graph_main(args, info, batches)
    arch = preset("mlp", width=args.width)
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


def node_graph_main(args: argparse.Namespace, info: dict, batches: list[int]) -> None:
    from edgecl.arch.factories import resolve_arch

    arch = resolve_arch(args.arch, tuple(int(d) for d in args.input_shape.split(",")))
    print(f"model: {arch['name']} {args.input_shape}, {args.alive:.0%} of every channel group alive per task, "
          f"ONNX Runtime threads {args.threads}, median of {args.repeats} repeats")
    rows = bench_node_graph(arch, args.alive, args.tasks, batches, args.threads, args.repeats, args.inner)
    print(f"\n{'task':>4} {'batch':>5} {'params dense':>12} {'compact':>9} {'exact':>9} {'dense ms':>9} "
          f"{'compact ms':>10} {'speedup':>7} {'exact ms':>9} {'speedup':>7} {'max|Δ|':>8}")
    for r in rows:
        print(f"{r['task']:>4} {r['batch']:>5} {r['params_dense']:>12} {r['params_compact']:>9} {r['params_exact']:>9} "
              f"{r['dense_ms']:>9.3f} {r['compact_ms']:>10.3f} {r['compact_speedup']:>7.2f} {r['exact_ms']:>9.3f} "
              f"{r['exact_speedup']:>7.2f} {max(r['compact_max_abs_diff'], r['exact_max_abs_diff']):>8.1e}")
    goals = {"compacted faster than dense at every batch, every task": all(r["compact_speedup"] > 1 for r in rows),
             "fewer parameters": all(r["params_compact"] < r["params_dense"] for r in rows),
             "parity <= 1e-4": all(r["compact_max_abs_diff"] <= 1e-4 for r in rows)}
    with open(args.out, "w") as f:
        json.dump({"machine": info, "config": vars(args), "node_masks": rows, "goals": goals}, f, indent=1)
    print(f"\ngoals: {goals}; wrote {args.out}")


if __name__ == "__main__":
    main()
