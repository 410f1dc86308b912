"""Checks every command and library entry shares: bounded integers, non-empty paths, outputs that must not be inputs.

Defined once so a flag means the same everywhere and is refused the same way: a `UsageError` naming the flag, before
any allocation or long work. Stdlib only (the torch-free runtime uses it too). The bounds are documented limits, not
tuning: each keeps a request inside what numpy, torch or ONNX Runtime can take without a crash or an allocation no
machine holds (torch segfaults at 100,000 threads; a seed times 1000 must fit torch's 64-bit seed).
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Iterable

from edgecl.errors import UsageError

MAX_THREADS = 1024  # CPU threads of torch or an ONNX Runtime session
MAX_NPROC = 256  # ranks `edgecl train --nproc` starts on one machine
MAX_BATCH = 1 << 20  # samples of one inference batch (run --batch, audit --batch)
MAX_BENCHMARK = 10_000_000  # timed runs of `edgecl run --benchmark`
SEED_MAX = 2**32 - 1  # seeds are 0..SEED_MAX: seed * 1000 + task stays far inside torch's 64-bit seed
MAX_SEEDS = 1000  # seeds one `edgecl compare` trains


def check_int(value: object, name: str, low: int, high: int) -> int:
    """`value` when it is an int in [low, high]; UsageError naming `name` and the range otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def int_arg(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type` for an integer in [low, high]: anything else exits 2 naming the flag and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not an int, or more digits than Python converts
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text[:40]}")
        return value

    parse.__name__ = "integer"
    return parse


def path_arg(text: str) -> str:
    """An argparse `type` for a path: the empty string names no file and is refused (exit 2)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def check_path(value: object, name: str) -> str:
    """A non-empty path as a string (library callers); UsageError naming `name` otherwise."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{name} must be a non-empty path, got {value!r}")
    return value


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths exist and are one file (through symlinks and hard links too)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def refuse_overwrite(writes: Iterable[tuple[str, str | os.PathLike]],
                     reads: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """UsageError when a file about to be written is one of the inputs: writing it would destroy what is read (an
    artifact replaced by a PNG, an input array by its logits). `writes` and `reads` are (flag, path) pairs; a
    None input is skipped."""
    reads = [(flag, path) for flag, path in reads if path is not None]
    for out_flag, out in writes:
        for in_flag, src in reads:
            if same_file(out, src):
                raise UsageError(f"{out_flag} {os.fspath(out)} is the same file as the {in_flag} {os.fspath(src)}; "
                                 "writing it would destroy the input: choose another output path")
