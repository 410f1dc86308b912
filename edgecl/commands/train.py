"""`edgecl train`: one method on one stream → DIR/results.json, DIR/acc_matrix.png, DIR/model.edgecl. The work is
`edgecl.train.pipeline.train_and_write`."""
from __future__ import annotations

import argparse

from edgecl.checks import MAX_NPROC, SEED_MAX, int_arg, path_arg
from edgecl.commands.options import add_arch_arguments, add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="lps, agscl, halrp, rgo, finetune or stl")
    p.add_argument("--stream", default="permuted-digits",
                   help="permuted-digits, split-digits, rotated-digits, synthetic, or a .npz file (see README)")
    p.add_argument("--tasks", type=int, default=None,
                   help="number of tasks to take from the stream, a file's first N (with --resume: number of NEW "
                        "tasks to add; the stream holds the artifact's tasks first)")
    p.add_argument("--resume", metavar="ARTIFACT", default=None, type=path_arg,
                   help="add tasks to a deployed artifact made by the same method and architecture; earlier tasks "
                        "stay bit-identical (verified before the new artifact is written to --out)")
    add_arch_arguments(p)
    p.add_argument("--init-weights", metavar="SOURCE", default=None,
                   help="start the trunk from these weights instead of a fresh draw: 'module' (the weights of the "
                        "module the --arch factory builds, e.g. one that loads your checkpoint) or an .npz / "
                        ".safetensors file keyed by state-dict names; heads stay fresh (README: Your own network)")
    p.add_argument("--seed", type=int_arg(0, SEED_MAX), default=None,
                   help=f"seeds the method and a built-in stream's data, 0..{SEED_MAX} (default 0; with --resume, "
                        "the artifact's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the method (JSON value), e.g. --set epochs=5")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_threads_argument(p)
    p.add_argument("--nproc", type=int_arg(1, MAX_NPROC), default=1,
                   help="train with N ranks on this machine (torch.distributed: gloo on cpu, NCCL with one GPU per "
                        "rank on cuda), started through torch's launcher like `torchrun --nproc-per-node N -m edgecl "
                        f"train ...`; batch_size stays the global batch; at most {MAX_NPROC}. Several machines: use "
                        "torchrun (README)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, type=path_arg, help="output folder")


def main(args: argparse.Namespace) -> int:
    from edgecl.config import parse_overrides
    from edgecl.train.data import parse_input_shape
    from edgecl.train.pipeline import check_request, train_and_write

    if args.nproc != 1:
        check_request(args.method, args.stream, arch_name=args.arch, n_tasks=args.tasks, seed=args.seed,
                      overrides=parse_overrides(args.set), device=args.device, threads=args.threads, resume=args.resume,
                      input_shape=parse_input_shape(args.input_shape), init_weights=args.init_weights,
                      factory_args=parse_overrides(args.arch_arg, "--arch-arg"))  # refused once, not per rank
        return _launch(args)
    train_and_write(args.method, args.stream, args.out, arch_name=args.arch, n_tasks=args.tasks, seed=args.seed,
                    overrides=parse_overrides(args.set), device=args.device, threads=args.threads,
                    progress=not args.no_progress, resume=args.resume,
                    input_shape=parse_input_shape(args.input_shape), classifier=False if args.no_classifier else None,
                    init_weights=args.init_weights, factory_args=parse_overrides(args.arch_arg, "--arch-arg"))
    return 0


def _launch(args: argparse.Namespace) -> int:
    """`--nproc N`: the same command as N ranks through torch's launcher (each rank runs `python -m edgecl train`
    with these arguments but --nproc)."""
    import os

    from edgecl.errors import UsageError

    if os.environ.get("WORLD_SIZE"):
        raise UsageError("--nproc starts the ranks itself; under torchrun leave it out")
    from edgecl.train.distributed import launch

    return launch(args.nproc, rank_argv(args))


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one rank: every option as parsed (dest `no_progress` is `--no-progress`), without
    --nproc. Values are glued to their option (`--seed=3`) so that one starting with '-' stays a value."""
    argv = ["train"]
    for dest, value in vars(args).items():
        flag = "--" + dest.replace("_", "-")
        if dest == "nproc" or value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        else:
            argv += [f"{flag}={v}" for v in (value if isinstance(value, list) else [value])]
    return argv
