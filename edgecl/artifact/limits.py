"""Every limit the artifact reader and writer enforce, in one place, each with the reason it exists.

A file is untrusted input: these bounds make sure a small or hostile file can never make the reader allocate,
loop or recurse much, and that the writer never produces a file a reader would refuse. Changing one changes which
files are valid (docs/ARTIFACT.md, "Checks and limits").
"""
from __future__ import annotations

from edgecl.arch.spec import Arch, dense_params

MAX_HEADER_BYTES = 64 << 20
"""The JSON header (manifest + tensor table) is read whole into memory: a forged length must not allocate more."""

DECODE_FLOOR, DECODE_RATIO = 64 << 20, 1024
"""Everything a file can make the reader allocate (all decoded blobs plus one dense task) stays under
DECODE_FLOOR + DECODE_RATIO × file size, so zstd bombs and huge declared shapes are refused before any allocation."""

MAX_NDIM = 8
"""Dimensions of any tensor: real weights have at most 4; the bound keeps shape arithmetic cheap."""

MAX_TASKS = 1 << 16
"""Tasks in one file: the structure checks loop over tasks, so the manifest's size must bound the work."""

MAX_CLASSES = 1 << 20
"""Classes of one task's head: a head is n_classes × feature_dim floats, so this bounds one task's dense size."""

MAX_TENSOR_NAME, MAX_TASK_NAME = 200, 128
"""Characters in a tensor or task name: names reach file names and logs (exports, the runtime), never paths."""

MAX_DIM, MAX_JSON_INT = 1 << 31, 1 << 62
"""Largest architecture size (channels, widths, input dims) and largest shape/offset integer the reader believes."""


def is_int(x: object, lo: int = 0, hi: int = MAX_JSON_INT) -> bool:
    """A JSON integer (not a bool, not a float) within [lo, hi]: the one bounds check every field goes through."""
    return type(x) is int and lo <= x <= hi


def dense_bytes(arch: Arch, n_classes: list[int]) -> int:
    """fp32 bytes of one task's dense weights (the largest head): what `Artifact.materialize` allocates."""
    return 4 * dense_params(arch, max(n_classes, default=0))


def budget_problem(decoded: int, stored: int) -> str | None:
    """Why `decoded` bytes are too many for a file of `stored` bytes (the DECODE bound), or None when they fit."""
    bound = DECODE_FLOOR + DECODE_RATIO * stored
    if decoded > bound:
        return f"declares {decoded} decoded bytes, beyond the bound {bound} for {stored} stored bytes"
    return None
