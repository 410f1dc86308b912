"""Arguments several commands share, defined once so they mean the same everywhere."""
from __future__ import annotations

import argparse

from edgecl.train.compute import DEFAULT_THREADS


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """--threads for every command that trains (train, demo, compare); `edgecl.train.compute` says why one."""
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch CPU threads for training (default {DEFAULT_THREADS}: the built-in models are small, "
                        f"and more threads stall on a busy machine)")
