"""Where the in-place runtime's time goes against a dense session: ONNX Runtime's profiler, per node and per op.

    python tools/profile_inplace.py [--arch torchvision.models:resnet18] [--input-shape 3,32,32] [--batches 1,64]
        [--calls 24] [--out tools/results/profile_inplace_resnet18.json]

For each model shape (element-wise LPS with shared and with per-task BatchNorm, AGS-CL node masks, HALRP low rank;
synthetic, `edgecl.synthetic.random_packed`) it profiles, with 1 intra-op thread, the dense per-task sessions
(folded initializers, ONNX Runtime's full optimisation: the baseline `tools/bench_switch.py` compares with) and the
in-place runtime's own session (`InPlace.new_session(profile_prefix=...)`: the same graph and options, run through
`TaskRuntime.infer`, so its IOBinding and output copy are in the wall time). Calls alternate tasks right after a
switch, as bench_switch's "after a switch" rows. Per variant and batch it records, per call: the wall time of the
Python call, ONNX Runtime's `model_run`, the sum of its node kernels, per-op kernel time and node counts, and the
ops one graph has and the other lacks. Kernel times under the profiler are a breakdown, not the speed claim (that
is bench_switch's ratio); the profiler adds a few µs per node to both sides alike.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort

from edgecl.deltas import materialize
from edgecl.graph.builder import INPUT, OUTPUT, build_onnx
from edgecl.machine import machine_info
from edgecl.runtime import TaskRuntime
from edgecl.runtime.inputs import check_input
from edgecl.synthetic import random_packed

SHAPES = {"lps": ("lps", "shared"), "lps_task_bn": ("lps", "task"), "node": ("node", "shared"),
          "lowrank": ("lowrank", "shared")}


def read_profile(path: str, calls: int, drop_last: int) -> dict:
    """Per call means (µs; means, so the kernels add up inside model_run) from one profiler file: the `calls`
    model_run events that end `drop_last` runs before the file's end, and the node kernels inside them."""
    with open(path) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    if calls < 1 or len(runs) < drop_last + calls:  # a negative slice start would wrap round to other runs
        raise ValueError(f"{path}: {len(runs)} model_run events, {calls} + {drop_last} asked")
    runs = runs[len(runs) - drop_last - calls:len(runs) - drop_last]
    lo, hi = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi]
    per_op: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    names = set()
    for e in nodes:
        op = e["args"]["op_name"]
        per_op[op] += e["dur"] / calls
        if e["name"] not in names:
            names.add(e["name"])
            count[op] += 1
    return {"model_run_us": statistics.mean(e["dur"] for e in runs),  # means: its kernels add up inside it
            "kernels_us": sum(per_op.values()), "per_op_us": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
            "nodes": dict(sorted(count.items()))}


def profile(variants: dict, n_tasks: int, calls: int) -> dict[str, float]:
    """Median wall ms per variant of `run(t)` right after an untimed `switch(t)`, `calls` calls each cycling tasks
    after 2·n_tasks untimed ones; the variants take turns in blocks of n_tasks calls (as bench_switch's
    `interleaved`: load on a shared machine hits both alike, each block keeps its own cache state)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for block in range(2 + calls // n_tasks):
        for name, (switch, run) in variants.items():
            for t in range(n_tasks):
                switch(t)
                start = time.perf_counter()
                run(t)
                if block >= 2:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def compare(dense: dict, inplace: dict) -> dict:
    """Per op: in-place minus dense kernel µs per call, largest first; ops only one side runs."""
    ops = set(dense["per_op_us"]) | set(inplace["per_op_us"])
    diff = {op: inplace["per_op_us"].get(op, 0.0) - dense["per_op_us"].get(op, 0.0) for op in ops}
    return {"per_op_extra_us": dict(sorted(diff.items(), key=lambda kv: -abs(kv[1]))),
            "node_count_diff": {op: inplace["nodes"].get(op, 0) - dense["nodes"].get(op, 0) for op in sorted(ops)
                                if inplace["nodes"].get(op, 0) != dense["nodes"].get(op, 0)},
            "kernel_ratio": inplace["kernels_us"] / dense["kernels_us"],
            "model_run_ratio": inplace["model_run_us"] / dense["model_run_us"],
            # model_run beyond its kernels: the executor's per-node and per-call work
            "executor_extra_us": (inplace["model_run_us"] - inplace["kernels_us"])
                                 - (dense["model_run_us"] - dense["kernels_us"])}


def profile_shape(arch: dict, shape: str, bn: str, args: argparse.Namespace, tmp: str) -> dict:
    packed = random_packed(arch, n_tasks=args.tasks, shape=shape, classes=(10, 7), bn=bn)
    rt = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=1)
    strategy = rt._strategy
    strategy._session = strategy.new_session(profile_prefix=os.path.join(tmp, f"inplace_{shape}_{bn}"))
    strategy._local = type(strategy._local)()  # bindings of the profiled session, made on first use
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    dense = []
    for t in range(packed.n_tasks):
        options.profile_file_prefix = os.path.join(tmp, f"dense_{shape}_{bn}_{t}")
        dense.append(ort.InferenceSession(build_onnx(arch, materialize(packed, t)).SerializeToString(), options,
                                          providers=["CPUExecutionProvider"]))
    out = {"blocked_convs": len(strategy.blocked_convs), "batches": {}}
    rng = np.random.default_rng(0)
    for batch in args.batches:
        x = rng.standard_normal((batch, *arch["input_shape"])).astype(np.float32)
        wall = profile({"inplace": (rt.switch, lambda t: rt.infer(x)),
                        "dense": (lambda t: None, lambda t: dense[t].run(None, {"x": x}))}, packed.n_tasks, args.calls)
        out["batches"][batch] = {f"{name}_wall_ms": ms for name, ms in wall.items()}
    # one profile file per session, every batch in it: each batch's window counted back from the file's end
    files_in = strategy._session.end_profiling()
    files_dense = [s.end_profiling() for s in dense]
    per_batch_calls = args.calls + 2 * packed.n_tasks
    for i, batch in enumerate(args.batches):
        keep = (len(args.batches) - i - 1) * per_batch_calls  # runs after this batch's, to drop
        row = out["batches"][batch]
        row["inplace"] = read_profile(files_in, args.calls, keep)
        merged = [read_profile(f, args.calls // packed.n_tasks, keep // packed.n_tasks) for f in files_dense]
        row["dense"] = merge(merged)
        row["compare"] = compare(row["dense"], row["inplace"])
        row["wall_ratio"] = row["inplace_wall_ms"] / row["dense_wall_ms"]
        # the runtime's Python call beyond its model_run (switch on a hit, input checks, binding, logits copy)
        row["inplace_call_extra_us"] = 1e3 * row["inplace_wall_ms"] - row["inplace"]["model_run_us"]
        row["dense_call_extra_us"] = 1e3 * row["dense_wall_ms"] - row["dense"]["model_run_us"]
    out["call_parts_us"] = call_parts(rt, arch)
    rt.close()
    return out


def call_parts(rt: TaskRuntime, arch: dict, calls: int = 2000) -> dict[str, float]:
    """Median µs of the pieces of `infer` beside the session's run, each repeated alone at batch 1 (`_HostStore`'s
    binding steps, the input check, a switch that hits its slot)."""
    strategy = rt._strategy
    x = np.zeros((1, *arch["input_shape"]), np.float32)
    rt.switch(0)
    rt.infer(x)
    slot = strategy.cache.slots[0]
    binding = strategy._binding(strategy._session, slot, 0)
    out = np.empty((1, strategy._n_classes[0]), np.float32)

    def median_us(fn) -> float:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)

    return {"bind_task": median_us(lambda: strategy._store.bind_task(binding.io, slot.buffers, 0)),
            "bind_output": median_us(lambda: binding.io.bind_output(OUTPUT, "cpu", element_type=np.float32,
                                                                    shape=out.shape, buffer_ptr=out.ctypes.data)),
            "bind_input": median_us(lambda: binding.io.bind_cpu_input(INPUT, x)),
            "check_input": median_us(lambda: check_input(x, rt.input_shape)),
            "switch_hit": median_us(lambda: rt.switch(0))}


def merge(parts: list[dict]) -> dict:
    """Mean of per-call figures over the dense per-task sessions (same graph, different weights)."""
    ops = set().union(*(p["per_op_us"] for p in parts))
    return {"model_run_us": statistics.mean(p["model_run_us"] for p in parts),
            "kernels_us": statistics.mean(p["kernels_us"] for p in parts),
            "per_op_us": dict(sorted(((op, statistics.mean(p["per_op_us"].get(op, 0.0) for p in parts))
                                      for op in ops), key=lambda kv: -kv[1])),
            "nodes": parts[0]["nodes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="torchvision.models:resnet18")
    ap.add_argument("--input-shape", default="3,32,32")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--calls", type=int, default=24, help="profiled calls per batch (a multiple of --tasks)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="tools/results/profile_inplace_resnet18.json")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.calls -= args.calls % args.tasks
    from edgecl.arch.factories import ensure_torchvision_imports, resolve_arch

    ensure_torchvision_imports()
    arch = resolve_arch(args.arch, tuple(int(d) for d in args.input_shape.split(",")))
    result = {"machine": machine_info(), "args": vars(args), "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            result["shapes"][name] = profile_shape(arch, *SHAPES[name], args, tmp)
            for batch, row in result["shapes"][name]["batches"].items():
                c = row["compare"]
                top = ", ".join(f"{op} {us:+.0f}" for op, us in list(c["per_op_extra_us"].items())[:4])
                print(f"{name:12s} b{batch:<3d} wall {row['wall_ratio']:.2f}× kernels {c['kernel_ratio']:.2f}× "
                      f"run {c['model_run_ratio']:.2f}× | extra µs: {top} | nodes {c['node_count_diff']}")
            parts = result["shapes"][name]["call_parts_us"]
            print(f"{name:12s} call parts (µs):", {k: round(v, 1) for k, v in parts.items()})
            for f in glob.glob(os.path.join(tmp, "*.json")):
                os.remove(f)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
