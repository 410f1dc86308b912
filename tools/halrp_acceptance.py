"""Issue 7 acceptance for HALRP on permuted digits: ACC/BWT against STL, old-task bit-identity, parameter growth per
task, and training time per epoch against `finetune` — all measured in one process, on the same stream and seed.

    python tools/halrp_acceptance.py --arch mlp --tasks 10 --out halrp_mlp.json
    python tools/halrp_acceptance.py --arch lenet --tasks 10 --epochs 30 --batch-size 32 --out halrp_lenet.json
    python tools/halrp_acceptance.py --arch lenet --tasks 10 --epochs 30 --batch-size 32 --config '{"alpha": 0.99}'
    python tools/halrp_acceptance.py --arch mlp --config '{"prune_budget": 0.05}'   # a tighter parameter budget
    python tools/halrp_acceptance.py --arch lenet --epochs 30 --batch-size 32 --seeds 0,1,2 \
        --config '{"alpha": 0.95, "min_rank": 1, "prune": "absolute", "ls_rounds": 3}'   # the LeNet recipe
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from edgecl import metrics
from edgecl.arch import preset
from edgecl.deltas import materialize
from edgecl.machine import machine_info
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext


def run_method(name: str, arch, stream, config: dict, device: str = "cpu") -> dict:
    """Learn every task, pack after each; accuracy matrix through materialize, bit-identity of old tasks, time."""
    method = registry.create(name, arch, config)
    ctx = TrainContext(device=device, progress=False)
    n = len(stream.tasks)
    acc = np.full((n, n), np.nan)
    first: dict[int, dict[str, np.ndarray]] = {}
    seconds = []
    identical = True
    for t, task in enumerate(stream.tasks):
        start = time.perf_counter()
        method.learn_task(t, task, ctx)
        seconds.append(time.perf_counter() - start)
        packed = method.pack()
        first[t] = materialize(packed, t)
        for j in range(t + 1):
            acc[t, j] = engine.accuracy(packed, j, stream.tasks[j], device)
            now = materialize(packed, j)
            identical &= all(np.array_equal(first[j][k], now[k]) for k in now)
    epochs = method.config.epochs
    return {"method": name, "config": method.config.to_json(), **metrics.summary(acc),
            "acc_matrix": [[float(v) for v in row[:i + 1]] for i, row in enumerate(acc)],
            "old_tasks_bit_identical": bool(identical), "seconds_per_task": seconds,
            "seconds_per_epoch_later_tasks": float(np.median(seconds[1:]) / epochs) if n > 1 else None,
            "extra": packed.extra if name == "halrp" else None}


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    """finetune, HALRP, STL and finetune again on one seed's stream; the report of that seed."""
    print(f"== seed {seed}")
    stream = make_stream("permuted-digits", args.tasks, seed)
    arch = preset(args.arch)
    common = {"epochs": args.epochs, "lr": args.lr, "seed": seed, "batch_size": args.batch_size}
    # finetune first and last: the median of the two brackets machine drift around the HALRP run
    runs = {"finetune": run_method("finetune", arch, stream, common, args.device)}
    runs["halrp"] = run_method("halrp", arch, stream, {**common, **json.loads(args.config)}, args.device)
    runs["stl"] = run_method("stl", arch, stream, common, args.device)
    again = run_method("finetune", arch, stream, common, args.device)
    ft_epoch = float(np.median([runs["finetune"]["seconds_per_epoch_later_tasks"],
                                again["seconds_per_epoch_later_tasks"]]))
    h = runs["halrp"]
    report = {"machine": machine_info(), "device": args.device, "arch": args.arch,
              "tasks": args.tasks,
              "halrp_acc": h["acc"], "halrp_bwt": h["bwt"], "stl_acc": runs["stl"]["acc"],
              "acc_minus_stl_points": 100 * (h["acc"] - runs["stl"]["acc"]), "finetune_acc": runs["finetune"]["acc"],
              "finetune_bwt": runs["finetune"]["bwt"], "old_tasks_bit_identical": h["old_tasks_bit_identical"],
              "growth_per_task": h["extra"]["growth"], "growth_without_heads": h["extra"]["growth_without_heads"],
              "ranks": h["extra"]["ranks"],
              "task_params": h["extra"]["task_params"],
              "epoch_time_ratio_vs_finetune": h["seconds_per_epoch_later_tasks"] / ft_epoch, "runs": runs}
    for k in ("halrp_acc", "halrp_bwt", "stl_acc", "acc_minus_stl_points", "finetune_acc", "finetune_bwt",
              "old_tasks_bit_identical", "epoch_time_ratio_vs_finetune"):
        print(f"{k:32s} {report[k]}")
    print("growth after each task (× one dense model):", " ".join(f"{g:.3f}" for g in report["growth_per_task"]))
    print("  the same without per-task heads:", " ".join(f"{g:.3f}" for g in report["growth_without_heads"]))
    print("ranks per task:", [list(r.values()) for r in report["ranks"]])
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mlp", choices=["mlp", "lenet"])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed); adds mean and worst")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--config", default="{}", help="extra HALRP config as JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    reports = [one_seed(args, seed) for seed in seeds]
    report = reports[0] if len(reports) == 1 else {
        "seeds": seeds, "mean_acc_minus_stl_points": float(np.mean([r["acc_minus_stl_points"] for r in reports])),
        "worst_acc_minus_stl_points": float(min(r["acc_minus_stl_points"] for r in reports)),
        "all_old_tasks_bit_identical": all(r["old_tasks_bit_identical"] for r in reports), "per_seed": reports}
    if len(reports) > 1:
        print("ACC − STL per seed:", " ".join(f"{r['acc_minus_stl_points']:+.2f}" for r in reports),
              f"| mean {report['mean_acc_minus_stl_points']:+.2f}, worst {report['worst_acc_minus_stl_points']:+.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
