"""What weight-standardised convs (NF-ResNet's ScaledStdConv2d) cost the in-place runtime: the same per-task model
served as stored ("as_stored": the runtime standardises) and folded (`fold_standardized` per task: plain convs).
Before `edgecl.runtime.switch_standardize` the switchable graph recomputed every filter's mean and variance from the
bound weight on every call (tools/results/bench_std_conv_in_graph.json: 55.9 against 12.5 ms at batch 1); now the
host slots standardise on the switch (bench_std_conv_on_switch.json). Per-task weights (delta kind ``task``, as STL;
LPS's masked weights go through a slot's fill instead), random, no training; medians of interleaved calls.

    python tools/bench_std_conv.py [--arch timm:nf_resnet26] [--side 64] [--threads 1] [--repeats 15]
                                   [--resident host|device] [--out F]

``--resident device`` runs the device path (on the CPU: its numpy twin), which standardises on the switch too
(`edgecl.runtime.device_standardize`; bench_std_conv_device.json).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgecl.arch import from_torch, param_shapes
from edgecl.arch.factories import build_module, ensure_torchvision_imports
from edgecl.deltas import PackedModel, TaskInfo
from edgecl.graph.standardize import fold_standardized
from edgecl.runtime import TaskRuntime


def packed(arch: dict, n_tasks: int, fold: bool) -> PackedModel:
    rng = np.random.default_rng(0)
    tasks = []
    for _ in range(n_tasks):
        p = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in param_shapes(arch, 10).items()}
        tasks.append(p)
    if fold:
        folded = [fold_standardized(arch, p) for p in tasks]
        arch, tasks = folded[0][0], [p for _, p in folded]
    kinds = {k: {"kind": "task"} for k in tasks[0]}
    return PackedModel(arch, "stl", {}, kinds, {}, [TaskInfo(f"t{t}", 10, None) for t in range(n_tasks)], tasks, {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="timm:nf_resnet26")
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--resident", default="host", choices=("host", "device"))
    ap.add_argument("--out")
    args = ap.parse_args()
    ensure_torchvision_imports()
    arch = from_torch(build_module(args.arch).eval(), (3, args.side, args.side))
    runtimes = {name: TaskRuntime(packed(arch, 2, fold), strategy="inplace", threads=args.threads, cache_tasks=2,
                                  resident=args.resident)
                for name, fold in (("as_stored", False), ("folded", True))}
    result = {"arch": args.arch, "side": args.side, "threads": args.threads, "resident": args.resident,
              "standardized_convs": sum(bool(n.get("standardize")) for n in arch["nodes"])}
    for batch in (1, 8):
        x = np.random.default_rng(1).standard_normal((batch, 3, args.side, args.side)).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        for rt in runtimes.values():
            rt.infer(x, task=0), rt.infer(x, task=1)  # both tasks in their slots: warm calls only
        for _ in range(args.repeats):
            for name, rt in runtimes.items():
                start = time.perf_counter()
                rt.infer(x, task=0)
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        result[f"batch_{batch}_ms"] = ms
        print(f"batch {batch}: as stored {ms['as_stored']:.1f} ms, folded {ms['folded']:.1f} ms "
              f"({ms['as_stored'] / ms['folded']:.2f}x)")
    for rt in runtimes.values():
        rt.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
