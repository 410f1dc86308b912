"""Issue 8 acceptance for RGO on permuted digits (MLP preset; `--arch lenet` too): ACC/BWT against STL and finetune on the same stream and
seeds, the ablation without feature encoding (RGO-2) and with the backprop-scaled curvature vectors, the memory of P
per layer, what the artifact stores per task (via `edgecl.artifact.inspect`, the code behind `edgecl inspect`), and
training time per epoch against finetune — all in one process.

Budgets. RGO uses its defaults (Appendix C.4: SGD lr 0.1, batch 10, 8 epochs ≈ the paper's 1,000 steps per task).
STL and finetune (Adam, lr 1e-3) get the same batch size and epochs, so every method sees the same number of steps.

Timing. Interleaved repeats on the first `--time-tasks` tasks of the stream; seconds per epoch of tasks 1.. (task 0
has P = I and is left out), median over repeats. "train" counts RGO's SGD epochs only; "with curvature pass" adds the
second pass over the data that updates P (Algorithm 1 lines 8–12), spread over the task's epochs.

    python tools/rgo_acceptance.py --out tools/results/rgo_acceptance.json
    python tools/rgo_acceptance.py --seeds 0,1,2 --tasks 10 --out /tmp/rgo.json
    python tools/rgo_acceptance.py --arch lenet --out /tmp/rgo_lenet.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from edgecl import metrics
from edgecl.arch import preset
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext

RGO_DEFAULTS = {"lr": 0.1, "batch_size": 10, "epochs": 8}


def variants(epochs: int, batch: int) -> dict[str, tuple[str, dict]]:
    budget = {"epochs": epochs, "batch_size": batch}
    return {"rgo": ("rgo", dict(budget)),
            "rgo-2 (no FEL)": ("rgo", {**budget, "fel": False}),
            "rgo backprop vectors": ("rgo", {**budget, "weight_vectors": "backprop"}),
            "stl": ("stl", dict(budget)),
            "finetune": ("finetune", dict(budget))}


def run_accuracy(name: str, config: dict, stream, device: str, arch: str) -> dict:
    method = registry.create(name, preset(arch), config)
    start = time.perf_counter()
    result = engine.run(method, stream, TrainContext(device=device, progress=False), log=lambda *a: None)
    n = len(result.acc_matrix)
    a = np.full((n, n), np.nan)
    for i, row in enumerate(result.acc_matrix):
        a[i, :len(row)] = row
    return {"acc": metrics.acc(a), "bwt": metrics.bwt(a), "forgetting": metrics.forgetting(a),
            "seconds": time.perf_counter() - start, "acc_matrix": result.acc_matrix, "packed": result.packed}


def artifact_check(packed) -> dict:
    """Save the RGO model as an artifact and list what it stores per task (goal: heads only)."""
    from edgecl import artifact

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rgo.edgecl")
        artifact.save(packed, path)
        info = artifact.inspect(path)
    per_task = sorted({b["key"] for b in info["blobs"] if b["task"] is not None})
    per_task_names = sorted({k.split("::", 1)[-1] for k in per_task})
    return {"file_bytes": info["file_bytes"], "ratio_to_dense": info["ratio_to_dense"],
            "per_task_bytes": [t["bytes"] for t in info["tasks"]], "per_task_tensors": per_task_names,
            "heads_only": all(n.startswith("head.") for n in per_task_names),
            "components": [{k: c[k] for k in ("component", "bytes", "params")} for c in info["components"]]}


def time_epochs(label: str, name: str, config: dict, stream, arch: str) -> dict:
    """Seconds per epoch over tasks 1..: all of learn_task, and (RGO) the SGD epochs only."""
    method = registry.create(name, preset(arch), config)
    ctx = TrainContext(progress=False)
    total, train = 0.0, 0.0
    for t, task in enumerate(stream.tasks):
        start = time.perf_counter()
        method.learn_task(t, task, ctx)
        spent = time.perf_counter() - start
        if t > 0:
            total += spent
            train += method.train_seconds[-1] if hasattr(method, "train_seconds") else spent
    epochs = config["epochs"] * (len(stream.tasks) - 1)
    return {"label": label, "with_curvature": total / epochs, "train": train / epochs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mlp", choices=["mlp", "lenet"])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--seeds", default="0", help="comma-separated stream/model seeds")
    ap.add_argument("--time-tasks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs, batch = RGO_DEFAULTS["epochs"], RGO_DEFAULTS["batch_size"]
    runs: dict[str, list[dict]] = {}
    artifact_info, memory = None, None
    for seed in seeds:
        stream = make_stream("permuted-digits", args.tasks, seed)
        for label, (name, config) in variants(epochs, batch).items():
            r = run_accuracy(name, {**config, "seed": seed}, stream, args.device, args.arch)
            packed = r.pop("packed")
            runs.setdefault(label, []).append(r)
            print(f"seed {seed} {label:22s} ACC {100 * r['acc']:6.2f}  BWT {100 * r['bwt']:6.2f}  "
                  f"({r['seconds']:.0f}s)", flush=True)
            if label == "rgo" and artifact_info is None:
                memory = {k: packed.extra[k] for k in ("projection_dims", "projection_bytes",
                                                       "projection_bytes_total", "projection_storage")}
                artifact_info = artifact_check(packed)
    summary = {label: {"acc": statistics.mean(r["acc"] for r in rs), "bwt": statistics.mean(r["bwt"] for r in rs),
                       "acc_per_seed": [r["acc"] for r in rs], "bwt_per_seed": [r["bwt"] for r in rs]}
               for label, rs in runs.items()}
    timing_stream = make_stream("permuted-digits", args.time_tasks, seeds[0])
    times: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so drift hits every method alike
        for label, (name, config) in (("finetune", ("finetune", {"epochs": epochs, "batch_size": batch})),
                                      ("rgo", ("rgo", {"epochs": epochs, "batch_size": batch}))):
            times.setdefault(label, []).append(time_epochs(label, name, config, timing_stream, args.arch))
    med = {label: {k: statistics.median(x[k] for x in rs) for k in ("train", "with_curvature")}
           for label, rs in times.items()}
    ratios = {"train_epoch_vs_finetune": med["rgo"]["train"] / med["finetune"]["with_curvature"],
              "epoch_with_curvature_pass_vs_finetune": med["rgo"]["with_curvature"] / med["finetune"]["with_curvature"]}
    rgo, stl, fine = summary["rgo"], summary["stl"], summary["finetune"]
    checks = {"bwt_ge_minus_3_points": rgo["bwt"] >= -0.03, "acc_ge_stl_minus_3_points": rgo["acc"] >= stl["acc"] - 0.03,
              "better_than_finetune": rgo["acc"] > fine["acc"] + 0.05, "artifact_heads_only": artifact_info["heads_only"],
              "epoch_time_le_2x_finetune": ratios["epoch_with_curvature_pass_vs_finetune"] <= 2.0}
    print("\nmean over seeds", seeds)
    for label, s in summary.items():
        print(f"  {label:22s} ACC {100 * s['acc']:6.2f}  BWT {100 * s['bwt']:6.2f}")
    print(f"RGO ACC − STL ACC: {100 * (rgo['acc'] - stl['acc']):+.2f} points")
    print("memory of P per parameter (bytes):", memory["projection_bytes"], "total", memory["projection_bytes_total"])
    print("artifact:", {k: artifact_info[k] for k in ("file_bytes", "ratio_to_dense", "per_task_tensors",
                                                       "heads_only")})
    print("seconds per epoch (median):", med)
    print("ratios:", {k: round(v, 3) for k, v in ratios.items()})
    print("checks:", checks)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from edgecl.machine import machine_info

        report = {"machine": machine_info(), "arch": args.arch, "threads": args.threads, "tasks": args.tasks,
                  "seeds": seeds,
                  "budget": {"epochs": epochs, "batch_size": batch}, "summary": summary, "memory": memory,
                  "artifact": artifact_info, "seconds_per_epoch": med, "time_ratios": ratios, "checks": checks,
                  "runs": runs}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
