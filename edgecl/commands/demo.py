"""`edgecl demo`: the whole product on the embedded default — LPS learns 10 permuted-digit tasks, the model is packed
into one artifact, exported to per-task ONNX, then loaded torch-free in the runtime, which switches through every task
and must reproduce the training-side accuracy; ends with the memory budget summary. The steps are `edgecl.demo`."""
from __future__ import annotations

import argparse

from edgecl.checks import path_arg
from edgecl.commands.options import add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", type=path_arg, help="output folder (default: demo-out)")
    p.add_argument("--tasks", type=int, default=10, help="number of permuted-digit tasks (default 10)")
    p.add_argument("--budget", default="32MiB",
                   help="memory budget for the runtime and the closing audit (default 32MiB); one the model cannot "
                        "meet ends in the audit's DOES NOT FIT and exit 1")
    p.add_argument("--no-progress", action="store_true")
    add_threads_argument(p)


def main(args: argparse.Namespace) -> int:
    from edgecl.demo import run_demo

    ok = run_demo(args.out, args.tasks, args.budget, progress=not args.no_progress, threads=args.threads)
    return 0 if ok else 1
