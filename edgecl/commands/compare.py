"""`edgecl compare`: several methods on one stream → DIR/compare.json, DIR/compare.md, PNG charts and one artifact per
method and seed under DIR/artifacts/. The logic lives in `edgecl.compare`."""
from __future__ import annotations

import argparse

from edgecl.checks import path_arg
from edgecl.commands.options import add_arch_arguments, add_threads_argument
from edgecl.compare.spec import DEFAULT_METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", default="permuted-digits",
                   help="permuted-digits, split-digits, rotated-digits, synthetic, or a .npz stream file")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated method names (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seeds", default="3", help="number of seeds (0..N-1) or a comma-separated list (default 3)")
    p.add_argument("--orders", type=int, default=0,
                   help="task orders for OPD/MOPD/AOPD robustness (0 = off; order 0 is the stream's own)")
    p.add_argument("--tasks", type=int, default=None, help="number of tasks to take from the stream")
    add_arch_arguments(p, default="mlp")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every method's default `epochs` by this (min 1), for quick runs")
    p.add_argument("--config", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override one config field of one method (JSON value), e.g. --config lps.epochs=5")
    p.add_argument("--timing-repeats", type=int, default=5, help="round trips over all tasks when timing the runtime")
    p.add_argument("--device", default="cpu", help="cpu or cuda (training)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one log line per run remains)")
    p.add_argument("--verbose", action="store_true", help="also log every task of every run")
    p.add_argument("--out", required=True, type=path_arg, help="output folder")


def main(args: argparse.Namespace) -> int:
    from edgecl.compare import CompareSpec, parse_config_overrides, parse_methods, parse_seeds, run_compare
    from edgecl.compare.report import format_markdown
    from edgecl.config import parse_overrides
    from edgecl.train.data import parse_input_shape

    methods = parse_methods(args.methods)
    spec = CompareSpec(stream=args.stream, methods=methods, seeds=parse_seeds(args.seeds), orders=args.orders,
                       n_tasks=args.tasks, arch=args.arch, input_shape=parse_input_shape(args.input_shape),
                       classifier=False if args.no_classifier else None,
                       factory_args=parse_overrides(args.arch_arg, "--arch-arg"), epochs_scale=args.epochs_scale,
                       overrides=parse_config_overrides(args.config, methods), device=args.device,
                       threads=args.threads, timing_repeats=args.timing_repeats, progress=not args.no_progress,
                       verbose=args.verbose)
    report = run_compare(spec, args.out)
    print(format_markdown(report), end="")  # what compare.md holds
    print(f"edgecl compare: wrote {args.out}/compare.json, compare.md and {len(report['plots'])} plots "
          f"in {report['wall_seconds'] / 60:.1f} min")
    return 0
