"""Issue 18's equivalence: N ranks × per-rank batch b against one process × batch N·b on the same data order, for
every method, measured (not asserted) and written to JSON.

1. End to end: `edgecl train` on permuted-digits (10 tasks, MLP, each method's default config) as one process and as
   `--nproc 2`; ACC, BWT and the whole accuracy matrix of each (goal: ACC within 1 point).
2. The deterministic statistics on the same weights: from the 1-process model, each method's statistic over task
   1's data computed by 2 ranks (torchrun, this script as the worker) and by one process — AGS-CL's node importance
   Ω, HALRP's gradient importances, RGO's projection update — as max |difference| / max |value| (goal: float
   tolerance). (BatchNorm recalibration, absent from the MLP, is compared the same way in CI.)
3. The same statistics after one task of training end to end (each run trains on its own, so everything a
   float-summation order changes during training shows): Ω and RGO's P after task 0, HALRP's importances of task 1.
4. Empty slices: 3 ranks with a global batch of 251 on a BatchNorm convnet (the last batch holds 2 samples, so one
   rank has none) against one process and against 2 ranks, every method.
5. The gradient of one global batch on that BatchNorm convnet (synchronised BatchNorm inside), 2 ranks against one
   process, per tensor.

    python tools/dist_equivalence.py --out tools/results/dist_equivalence.json          # ~15 min on 2 busy cores
    python tools/dist_equivalence.py --methods lps,rgo --tasks 3 --skip-empty --out /tmp/eq.json

`statistics()` is also what tests/dist_worker.py evaluates in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
METHODS = ("lps", "agscl", "halrp", "rgo", "finetune", "stl")
STATISTIC_METHODS = ("agscl", "halrp", "rgo")
# a BatchNorm convnet small enough for 3 ranks on 2 cores (the CI test's network)
TINY_BN = {"name": "tinybn", "input_shape": [1, 8, 8], "layers": [
    {"op": "conv", "name": "conv1", "in": 1, "out": 4, "k": 3, "pad": 1}, {"op": "bn", "name": "bn1", "ch": 4},
    {"op": "relu"}, {"op": "maxpool", "k": 2}, {"op": "flatten"},
    {"op": "linear", "name": "fc1", "in": 64, "out": 24}, {"op": "bn", "name": "bn2", "ch": 24}, {"op": "relu"}]}


def statistics(method_name: str, path: str, stream_name: str = "permuted-digits", t: int = 1) -> dict[str, list]:
    """Method `method_name`'s data statistic over task t's training data, from the weights of the artifact at
    `path` (task t's for HALRP), computed by however many ranks run this (one alone): AGS-CL's Ω update, HALRP's
    gradient importances (every prunable layer, batch 32), RGO's projection update with task t's head and per-task
    tensors, BatchNorm recalibration (finetune). Every input is identical on every rank and in one process, so only
    the statistic's synchronisation can make the results differ."""
    import torch

    from edgecl import artifact
    from edgecl.arch import prunable
    from edgecl.deltas import materialize
    from edgecl.train import registry
    from edgecl.train.data import make_stream
    from edgecl.train.models import from_numpy

    with artifact.load(path) as art:
        packed = art.to_packed()
    task = make_stream(stream_name, packed.n_tasks).tasks[t]
    if method_name == "agscl":
        method = registry.create("agscl", packed.arch, packed.config)
        method.resume(packed)
        method.update_omega(task)
        return {"omega": method.omega.tolist()}
    if method_name == "halrp":
        from edgecl.train.methods.halrp import gradient_importance

        names = prunable(packed.arch)
        grads = gradient_importance(packed.arch, from_numpy(materialize(packed, t)), names, task, 32,
                                    torch.Generator().manual_seed(5))
        return {"importance": [grads[n] for n in names]}
    if method_name == "rgo":
        from edgecl.train.state import load_training_state

        method = registry.create("rgo", packed.arch, packed.config)
        method.resume(packed, load_training_state(path))
        method.trunk = {k: v.requires_grad_(True) for k, v in method.trunk.items()}  # as during learn_task
        perms = method.permutations(t)
        shared_bn = method.bn.start(t, order=method.fel.orders(perms, follows=True))  # identity/frozen: not per task
        method.update_projections(task, {**shared_bn, **from_numpy(packed.task_tensors[t])}, perms)
        return {"projection": np.concatenate([p.p.reshape(-1).numpy() for p in method.proj.values()]).tolist()}
    if method_name == "finetune":
        from edgecl.train.batchnorm import recalibrate

        weights = from_numpy(materialize(packed, 0))
        recalibrate(packed.arch, weights, task)
        return {"running_stats": np.concatenate([weights[k].reshape(-1).numpy() for k in sorted(weights)
                                                 if "running" in k]).tolist()}
    return {}


def difference(a, b) -> dict[str, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.abs(b).max()) or 1.0
    return {"max_abs": float(np.abs(a - b).max()), "max_abs_over_max_value": float(np.abs(a - b).max()) / scale,
            "median_abs_over_max_value": float(np.median(np.abs(a - b))) / scale, "values": int(a.size),
            "zero_pattern_differs": int(((a == 0) != (b == 0)).sum())}  # e.g. AGS-CL nodes important in one run only


def train(method: str, out: str, nproc: int, argv: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edgecl", "train", "--method", method, "--no-progress", "--out", out,
                           "--nproc", str(nproc), *argv], env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method} nproc={nproc}: {done.stderr[-2000:]}")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    results["wall_seconds"] = time.perf_counter() - start
    return results


def torchrun(nproc: int, argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *argv], env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])


def end_to_end(methods: list[str], tasks: int, work: str) -> dict:
    out = {}
    for m in methods:
        one = train(m, os.path.join(work, m, "one"), 1, ["--tasks", str(tasks)])
        two = train(m, os.path.join(work, m, "two"), 2, ["--tasks", str(tasks)])
        out[m] = {"acc_one_process": one["acc"], "acc_two_ranks": two["acc"], "bwt_one_process": one["bwt"],
                  "bwt_two_ranks": two["bwt"], "acc_difference_points": 100 * (two["acc"] - one["acc"]),
                  "within_1_point": abs(two["acc"] - one["acc"]) <= 0.01,
                  "max_matrix_difference_points": 100 * max(abs(x - y) for r1, r2 in zip(one["acc_matrix"],
                                                                                         two["acc_matrix"])
                                                            for x, y in zip(r1, r2)),
                  "global_batch": two["distributed"]["global_batch"],
                  "per_rank_batch": two["distributed"]["per_rank_batch"],
                  "wall_seconds_one_process": one["wall_seconds"], "wall_seconds_two_ranks": two["wall_seconds"]}
        print(f"{m:9s} ACC {100 * one['acc']:.2f} (1 process) vs {100 * two['acc']:.2f} (2 ranks), BWT "
              f"{100 * one['bwt']:+.2f} vs {100 * two['bwt']:+.2f}", flush=True)
    return out


def same_weights(methods: list[str], work: str) -> dict:
    """Section 2: each statistic by 2 ranks and by this process on the 1-process model of section 1."""
    wanted = [m for m in methods if m in STATISTIC_METHODS]
    paths = {m: os.path.join(work, m, "one", "model.edgecl") for m in wanted}
    ranked = os.path.join(work, "statistics_two_ranks.json")
    torchrun(2, [os.path.abspath(__file__), "--statistics-worker", ranked, json.dumps(paths)])
    with open(ranked) as f:
        two = json.load(f)
    out = {}
    for m in wanted:
        one = statistics(m, paths[m])
        out[m] = {k: difference(two[m][k], one[k]) for k in one}
        print(f"{m:9s} same weights: {out[m]}", flush=True)
    return out


def after_one_task(methods: list[str], work: str) -> dict:
    """Section 3: Ω and P after task 0, HALRP's importances of task 1, each from its own end-to-end run."""
    from safetensors.numpy import load_file

    out = {}
    for m in [m for m in methods if m in STATISTIC_METHODS]:
        runs = [train(m, os.path.join(work, m, f"first-{n}"), n, ["--tasks", "2" if m == "halrp" else "1"])
                for n in (1, 2)]
        if m == "agscl":
            values = [np.concatenate([np.asarray(v) for v in r["method_info"]["omega"].values()]) for r in runs]
        elif m == "halrp":
            values = [np.asarray(list(r["method_info"]["importance"][1].values())) for r in runs]
        else:
            values = [np.concatenate([v.reshape(-1) for _, v in sorted(load_file(
                os.path.join(work, m, f"first-{n}", "model.edgecl.state")).items())]) for n in (1, 2)]
        out[m] = difference(values[1], values[0])
        print(f"{m:9s} after one task of training: {out[m]}", flush=True)
    return out


def empty_slices(methods: list[str], work: str) -> dict:
    """Section 4: 3 ranks, global batch 251 (1,257 training samples: the last batch holds 2, one rank none), against
    one process and against 2 ranks (whose slices are never empty): 2 and 3 ranks share the synchronised BatchNorm's
    arithmetic, one process runs F.batch_norm, so a difference between 2 and 3 ranks would be the empty slice's."""
    spec = os.path.join(work, "tinybn.json")
    with open(spec, "w") as f:
        json.dump(TINY_BN, f)
    out = {}
    for m in methods:
        argv = ["--tasks", "2", "--arch", spec, "--set", "batch_size=251", "--set", "epochs=2"]
        argv += ["--set", "curvature_batch=251"] if m == "rgo" else []
        runs = {n: train(m, os.path.join(work, m, f"empty-{n}"), n, argv) for n in (1, 2, 3)}
        out[m] = {f"acc_{n}": runs[n]["acc"] for n in runs}
        for n in (1, 2):
            out[m][f"max_matrix_difference_points_3_vs_{n}"] = 100 * max(
                abs(x - y) for r1, r2 in zip(runs[3]["acc_matrix"], runs[n]["acc_matrix"]) for x, y in zip(r1, r2))
        print(f"{m:9s} 3 ranks with an empty slice: {out[m]}", flush=True)
    return out


def batch_gradient(spec_path: str, batch: int = 251) -> dict[str, list]:
    """Every parameter's gradient of the cross-entropy over one global batch of task 0 (BatchNorm in training mode,
    fresh seeded weights), computed by however many ranks run this: the step every method's loop takes."""
    import torch
    import torch.nn.functional as F

    from edgecl.arch.spec import validate
    from edgecl.train import distributed
    from edgecl.train.data import make_stream
    from edgecl.train.models import forward, init_head, init_params

    with open(spec_path) as f:
        arch = validate(json.load(f))
    task = make_stream("permuted-digits", 1).tasks[0]
    x, y = torch.from_numpy(task.x_train[:batch]), torch.from_numpy(task.y_train[:batch])
    params = {**init_params(arch, generator=torch.Generator().manual_seed(0)),
              **init_head(arch, task.n_classes, torch.Generator().manual_seed(1))}
    names = [k for k in params if "running" not in k]
    for k in names:
        params[k].requires_grad_(True)
    part = distributed.local_part(torch.arange(batch))
    loss = distributed.weighted(F.cross_entropy(forward(arch, params, x[part], train=True), y[part]), len(part), batch)
    grads = distributed.all_sum(list(torch.autograd.grad(loss, [params[k] for k in names])))
    return {k: g.reshape(-1).tolist() for k, g in zip(names, grads)}


def one_step(work: str) -> dict:
    """Section 5: the gradient of one global batch on a BatchNorm convnet, 2 ranks against one process. A bias
    right before a BatchNorm has a true gradient of 0 (the normalisation removes it): its values are rounding noise
    in both, reported apart (Adam's normalised step turns that noise into ±lr moves, which BatchNorm cancels)."""
    spec = os.path.join(work, "tinybn.json")
    with open(spec, "w") as f:
        json.dump(TINY_BN, f)
    ranked = os.path.join(work, "gradient_two_ranks.json")
    torchrun(2, [os.path.abspath(__file__), "--gradient-worker", ranked, spec])
    with open(ranked) as f:
        two = json.load(f)
    one = batch_gradient(spec)
    before_bn = {"conv1.bias", "fc1.bias"}
    out = {k: difference(two[k], one[k]) for k in one}
    print(f"one global batch's gradient, 2 ranks vs 1 process: worst max_abs_over_max_value (biases before "
          f"BatchNorm apart) {max(v['max_abs_over_max_value'] for k, v in out.items() if k not in before_bn):.2e}",
          flush=True)
    return {"per_tensor": out, "biases_before_batchnorm": sorted(before_bn)}


def worker(out: str, compute) -> None:
    """A torchrun rank: join the group, `compute()`, rank 0 writes the result to `out`."""
    from edgecl.train import distributed

    with distributed.joined("cpu") as world:
        values = compute()
        if world.is_main:
            with open(out, "w") as f:
                json.dump(values, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--skip-empty", action="store_true", help="leave out section 4 (3 ranks)")
    p.add_argument("--only", help="comma-separated sections to run (end_to_end, statistics, empty, gradient), "
                                  "updating --out's other sections in place")
    p.add_argument("--statistics-worker", nargs=2, metavar=("OUT", "PATHS"), help=argparse.SUPPRESS)
    p.add_argument("--gradient-worker", nargs=2, metavar=("OUT", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "tools", "results", "dist_equivalence.json"))
    args = p.parse_args(argv)
    if args.statistics_worker:
        paths = json.loads(args.statistics_worker[1])
        worker(args.statistics_worker[0], lambda: {m: statistics(m, path) for m, path in paths.items()})
        return 0
    if args.gradient_worker:
        worker(args.gradient_worker[0], lambda: batch_gradient(args.gradient_worker[1]))
        return 0
    sys.path.insert(0, ROOT)
    from edgecl.machine import machine_info

    methods = args.methods.split(",")
    sections = set(args.only.split(",")) if args.only else {"end_to_end", "statistics", "empty", "gradient"}
    if args.skip_empty:
        sections.discard("empty")
    report = {}
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            report = json.load(f)
    report.update({"machine": machine_info(), "stream": "permuted-digits", "tasks": args.tasks, "arch": "mlp",
                   "configs": "each method's defaults; batch_size is the global batch"})
    run = {"sections": sorted(sections), "load_before": os.getloadavg()}  # 1/5/15-min load averages, 2 cores
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        if "end_to_end" in sections or "statistics" in sections:
            report["end_to_end"] = end_to_end(methods, args.tasks, work)
        if "statistics" in sections:
            report["statistics_same_weights"] = same_weights(methods, work)
            report["statistics_after_one_task"] = after_one_task(methods, work)
        if "empty" in sections:
            report["empty_slices_three_ranks"] = empty_slices(methods, work)
        if "gradient" in sections:
            report["one_global_batch_gradient"] = one_step(work)
        run["seconds"] = time.perf_counter() - start
    run["load_after"] = os.getloadavg()
    report.setdefault("runs", []).append(run)  # one entry per invocation (--only updates some sections)
    write_report(report, args.out)
    return 0


def write_report(report: dict, path: str) -> None:
    """The JSON report, written atomically (the folder made if needed); dist_scaling.py writes with it too."""
    from edgecl.train.outputs import save_json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_json(report, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
