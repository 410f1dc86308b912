"""`edgecl audit ARTIFACT --budget 32MiB [--batch 8] [--device cpu|cuda] [--device-budget 2GiB]
[--strategy auto|inplace|sessions] [--task-tensors auto|resident|cached] [--json] [--plot out.png]`.
Exit 0 when the artifact fits the budget (and, on cuda, the device budget), 1 when it does not, 2 on bad input."""
from __future__ import annotations

import argparse
import json

from edgecl.checks import MAX_BATCH, int_arg, path_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path_arg, help="artifact file (model.edgecl)")
    p.add_argument("--budget", required=True, help="memory budget, e.g. 32MiB, 1.5GB, or bytes")
    p.add_argument("--batch", type=int_arg(1, MAX_BATCH), default=8,
                   help=f"inference batch the activations are sized for (default 8, at most {MAX_BATCH})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: tasks resident in GPU memory, reported apart)")
    p.add_argument("--device-budget", default=None,
                   help="GPU memory budget for --device cuda, e.g. 2GiB (--budget stays the host RAM budget)")
    p.add_argument("--strategy", default="auto", choices=("auto", "inplace", "sessions"),
                   help="the runtime strategy to audit: the one TaskRuntime(artifact, budget=BUDGET) chooses "
                        "(default), one session switched in place (one cache slot), or one session per task")
    p.add_argument("--task-tensors", default="auto", choices=("auto", "resident", "cached"),
                   help="in place: heads and other per-task tensors kept for every task (resident) or only in the "
                        "cache slot, read from the file on a miss (cached); auto caches them where a switch writes "
                        "weights anyway and they are >= 10%% of the resident model (default)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", type=path_arg, help="write a PNG: bytes against task count, and the resident breakdown")


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.audit import audit, budget_summary

    report = audit(args.artifact, args.budget, args.batch, args.device, args.strategy,
                   device_budget=args.device_budget, task_tensors=args.task_tensors, plot_to=args.plot)
    print(json.dumps(report, indent=2, default=str) if args.json else budget_summary(report))
    return 0 if report["fits"] else 1
