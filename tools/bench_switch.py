"""Task switching on CPU, as ratios measured in one run (these machines are noisy; absolute times are not the claim).

    python tools/bench_switch.py [--width 8] [--tasks 5] [--threads 1] [--repeats 30] [--out bench_switch.json]

For an MLP of ≥ 4 M parameters (`preset('mlp', width=8)`) shaped like an LPS model (element-wise masks) and like a
finetune model (shared trunk, per-task heads), built in numpy with random weights so no training is needed:
- switch (cache miss: materialise into the bound buffers) against the physical floor, one np.copyto of every dense
  weight of a task (goal ≤ 2.0×), and against creating a new ONNX Runtime session for that task (goal ≥ 20× faster);
- switch on a cache hit (the task is still in an LRU slot: no copy);
- inference right after a switch against plain dense ONNX Runtime sessions with folded initializers (one per task,
  the status quo of N separate models) called in the same task order, batch 1 and 64 (goal ≤ 1.05×), for the
  in-place strategy and for per-task sessions; and the warm, same-task latency against one dense session (where the
  gap is ONNX Runtime pre-packing constant weights, which graph inputs cannot get).
Medians (or minima, `--stat min`) of `--repeats` runs, the variants timed in turns; prints a table and writes JSON with the machine and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort

from edgecl.arch import preset
from edgecl.deltas import materialize
from edgecl.export.onnx_graph import build_onnx
from edgecl.machine import machine_info
from edgecl.runtime import TaskRuntime
from edgecl.synthetic import random_packed


ARGS = argparse.Namespace(stat="median")


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


STAT = {"median": statistics.median, "min": min}


def interleaved(variants: dict, n_tasks: int, repeats: int, warm: bool) -> dict[str, float]:
    """Median latency per variant, the variants taking turns so load changes on a shared machine hit them alike.

    warm=False: each timed call is task t right after switching to it, cycling through the tasks (the weights it
    reads are not the ones its previous call read, as on a device serving mixed requests). warm=True: the same task
    again, right after one untimed call."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats):
        t = 1 if warm else i % n_tasks
        for name, (switch, run) in variants.items():
            switch(t)
            if warm:
                run(t)
            start = time.perf_counter()
            run(t)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * STAT[ARGS.stat](v) for name, v in times.items()}


def bench_shape(shape: str, args: argparse.Namespace) -> dict:
    arch = preset("mlp", width=args.width)
    packed = random_packed(arch, n_tasks=args.tasks, shape=shape, classes=(10, 7))
    n_params = sum(a.size for a in materialize(packed, 0).values())
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    cpu = ["CPUExecutionProvider"]
    dense_weights = materialize(packed, 1)
    floor_bufs = {k: np.empty_like(v) for k, v in dense_weights.items()}
    task_bytes = [build_onnx(arch, materialize(packed, t)).SerializeToString() for t in range(packed.n_tasks)]
    onnx_file = os.path.join(args.tmp, f"task1_{shape}.onnx")
    with open(onnx_file, "wb") as f:
        f.write(task_bytes[1])
    miss_rt = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=args.threads)
    hit_rt = TaskRuntime(packed, strategy="inplace", cache_tasks=packed.n_tasks, threads=args.threads)
    for t in range(packed.n_tasks):
        hit_rt.switch(t)
    order = iter(np.tile(np.arange(packed.n_tasks), 10 * args.repeats))
    switch_times = interleaved({
        "floor": (lambda t: None, lambda t: [np.copyto(floor_bufs[k], v) for k, v in dense_weights.items()]),
        "miss": (lambda t: None, lambda t: miss_rt.switch(int(next(order)))),
        "hit": (lambda t: None, lambda t: hit_rt.switch(int(next(order)))),
    }, packed.n_tasks, args.repeats, warm=False)
    floor, miss, hit = switch_times["floor"], switch_times["miss"], switch_times["hit"]
    session_times = interleaved({
        "bytes": (lambda t: None, lambda t: ort.InferenceSession(task_bytes[1], options, providers=cpu)),
        "file": (lambda t: None, lambda t: ort.InferenceSession(onnx_file, options, providers=cpu)),
    }, packed.n_tasks, max(5, args.repeats // 3), warm=False)
    new_session, new_session_file = session_times["bytes"], session_times["file"]
    sessions_rt = TaskRuntime(packed, strategy="sessions", threads=args.threads)
    session_switch = median_ms(lambda: sessions_rt.switch(int(next(order))), args.repeats)

    infer = {}
    rng = np.random.default_rng(0)
    dense_sessions = [ort.InferenceSession(b, options, providers=cpu) for b in task_bytes]
    for batch in (1, 64):
        x = rng.standard_normal((batch, *arch["input_shape"])).astype(np.float32)
        variants = {"dense": (lambda t: None, lambda t: dense_sessions[t].run(None, {"x": x})),
                    "inplace": (miss_rt.switch, lambda t: miss_rt.infer(x)),
                    "sessions": (sessions_rt.switch, lambda t: sessions_rt.infer(x))}
        row = {}
        for name, ms in interleaved(variants, packed.n_tasks, args.repeats, warm=False).items():
            row[f"{name}_after_switch_ms"] = ms
        for name, ms in interleaved(variants, packed.n_tasks, args.repeats, warm=True).items():
            row[f"{name}_warm_ms"] = ms
        for name in ("inplace", "sessions"):
            row[f"{name}_ratio"] = row[f"{name}_after_switch_ms"] / row["dense_after_switch_ms"]
            row[f"{name}_warm_ratio"] = row[f"{name}_warm_ms"] / row["dense_warm_ms"]
        infer[batch] = row
    return {"shape": shape, "params": int(n_params), "dense_mib": 4 * n_params / 2**20, "floor_ms": floor,
            "switch_miss_ms": miss, "switch_hit_ms": hit, "sessions_switch_ms": session_switch,
            "new_session_ms": new_session, "new_session_from_file_ms": new_session_file,
            "new_session_file_over_miss": new_session_file / max(miss, 1e-9), "miss_over_floor": miss / floor, "new_session_over_miss": new_session / max(miss, 1e-9),
            "infer": infer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, same for every session")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--shapes", default="lps,finetune")
    p.add_argument("--out", default="bench_switch.json")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the per-task .onnx baseline file is written")
    p.add_argument("--stat", choices=sorted(STAT), default="median",
                   help="statistic of the repeats; 'min' resists other load on a shared machine")
    args = p.parse_args()
    ARGS.stat = args.stat
    rows = [bench_shape(shape, args) for shape in args.shapes.split(",")]
    print(f"{'shape':9} {'params':>9} {'floor':>7} {'miss':>7} {'hit':>7} {'new sess':>8} {'miss/floor':>10} "
          f"{'sess/miss':>9} {'file/miss':>9} | {'b1 inpl':>7} {'b1 sess':>7} {'b64 inpl':>8} {'b64 sess':>8} | warm: {'b1 inpl':>7} "
          f"{'b64 inpl':>8}  (ms; ratios vs dense)")
    for r in rows:
        i1, i64 = r["infer"][1], r["infer"][64]
        print(f"{r['shape']:9} {r['params']:>9} {r['floor_ms']:7.3f} {r['switch_miss_ms']:7.3f} {r['switch_hit_ms']:7.4f}"
              f" {r['new_session_ms']:8.2f} {r['miss_over_floor']:10.2f} {r['new_session_over_miss']:9.1f} "
              f"{r['new_session_file_over_miss']:9.1f} | "
              f"{i1['inplace_ratio']:7.2f} {i1['sessions_ratio']:7.2f} {i64['inplace_ratio']:8.2f} "
              f"{i64['sessions_ratio']:8.2f} |       {i1['inplace_warm_ratio']:7.2f} {i64['inplace_warm_ratio']:8.2f}")
    goals = {"switch ≤ 2.0× copy floor": all(r["miss_over_floor"] <= 2.0 for r in rows if r["shape"] == "lps"),
             "switch ≥ 20× faster than new session (from bytes)": all(r["new_session_over_miss"] >= 20 for r in rows),
             "switch ≥ 20× faster than new session (from .onnx file)": all(r["new_session_file_over_miss"] >= 20
                                                                             for r in rows),
             "inference ≤ 1.05× dense (in-place)": all(max(r["infer"][b]["inplace_ratio"] for b in (1, 64)) <= 1.05
                                                       for r in rows),
             "inference ≤ 1.05× dense (sessions)": all(max(r["infer"][b]["sessions_ratio"] for b in (1, 64)) <= 1.05
                                                       for r in rows)}
    for goal, met in goals.items():
        print(f"  {'MET  ' if met else 'UNMET'} {goal}")
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "args": vars(args), "rows": rows, "goals": goals}, f, indent=2)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
