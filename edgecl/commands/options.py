"""Arguments several commands share, defined once so they mean the same everywhere."""
from __future__ import annotations

import argparse

from edgecl.checks import MAX_THREADS, int_arg
from edgecl.train.compute import DEFAULT_THREADS


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """--threads for every command that trains (train, demo, compare); `edgecl.train.compute` says why one."""
    p.add_argument("--threads", type=int_arg(1, MAX_THREADS), default=DEFAULT_THREADS,
                   help=f"torch CPU threads for training (default {DEFAULT_THREADS}: the built-in models are small, "
                        f"and more threads stall on a busy machine; at most {MAX_THREADS})")


def add_arch_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--arch, --input-shape and --no-classifier: which network, at which input size (train, compare)."""
    p.add_argument("--arch", default=default,
                   help="a preset (mlp, lenet, resnet), a saved spec (.json), or a model factory: module:factory "
                        "(torchvision.models:resnet18), timm:NAME, path/to/file.py:factory — built without "
                        "pretrained weights; its final nn.Linear is replaced by edgecl's per-task heads (default: "
                        + (f"{default})" if default else "mlp, or the artifact's with --resume)"))
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument for the --arch factory (JSON value), e.g. --arch-arg width_mult=0.5 "
                        "--arch-arg num_classes=10; repeatable (a key given again takes the later value)")
    p.add_argument("--input-shape", metavar="C,H,W", default=None,
                   help="resize the digit streams, e.g. 3,32,32 (each pixel a block, repeated over channels)")
    p.add_argument("--no-classifier", action="store_true",
                   help="the factory's module is a trunk returning (batch, features): nothing to strip")
