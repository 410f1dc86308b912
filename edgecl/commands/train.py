"""`edgecl train`: one method on one stream → DIR/results.json, DIR/acc_matrix.png, DIR/model.edgecl. The work is
`edgecl.train.pipeline.train_and_write`."""
from __future__ import annotations

import argparse

from edgecl.commands.options import add_arch_arguments, add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="lps, agscl, halrp, rgo, finetune or stl")
    p.add_argument("--stream", default="permuted-digits",
                   help="permuted-digits, split-digits, rotated-digits, synthetic, or a .npz file (see README)")
    p.add_argument("--tasks", type=int, default=None,
                   help="number of tasks to take from the stream (with --resume: number of NEW tasks to add)")
    p.add_argument("--resume", metavar="ARTIFACT", default=None,
                   help="add tasks to a deployed artifact made by the same method and architecture; earlier tasks "
                        "stay bit-identical (verified before the new artifact is written to --out)")
    add_arch_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the method (JSON value), e.g. --set epochs=5")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder")


def main(args: argparse.Namespace) -> int:
    from edgecl.config import parse_overrides
    from edgecl.train.data import parse_input_shape
    from edgecl.train.pipeline import train_and_write

    train_and_write(args.method, args.stream, args.out, arch_name=args.arch, n_tasks=args.tasks, seed=args.seed,
                    overrides=parse_overrides(args.set), device=args.device, threads=args.threads,
                    progress=not args.no_progress, resume=args.resume,
                    input_shape=parse_input_shape(args.input_shape), classifier=False if args.no_classifier else None)
    return 0
