"""Every limit the artifact reader and writer enforce, in one place, each with the reason it exists.

A file is untrusted input: these bounds make sure a small or hostile file can never make the reader allocate,
loop or recurse much, and that the writer never produces a file a reader would refuse. Changing one changes which
files are valid (docs/ARTIFACT.md, "Checks and limits").
"""
from __future__ import annotations

from edgecl.arch.spec import Arch, dense_params

MAX_HEADER_BYTES = 8 << 20
"""The JSON header (manifest + tensor table) is read and parsed whole: 8 MiB holds the manifest of ~2,500 tasks of a
ResNet-18, and parses into at most ~170 MB of Python objects (a 16 MiB header of empty objects took 340 MB)."""

DECODE_FLOOR, DECODE_RATIO = 64 << 20, 256
"""Everything a file can make the reader allocate (all decoded blobs plus one dense task) stays under
DECODE_FLOOR + DECODE_RATIO × file size, so zstd bombs and huge declared shapes are refused before any allocation.
Trained artifacts decode to 1.4-4× their size; the most compressible real case is an LPS file after its first task
(W̄ stored only where owned): 17× at α = 0.09, ~180× at α = 0.01. (Was 1024: a 2.9 MB file could take 2.7 GB.)"""

MAX_DECODED_BYTES = 8 << 30
"""Everything a file can make the reader allocate, whatever its size: a device-sized model (ResNet-50 with ten LPS
tasks decodes to under 1 GB) fits many times over; beyond it, nothing is read."""

MAX_JSON_CONTAINERS = 1 << 18
"""JSON objects and arrays in a header (each bracket counted, so the bound holds before parsing): ~6 per stored tensor,
so a full 8 MiB header of real blobs stays well under it, while 8 MiB of empty objects would parse into 230 MB."""

MAX_NDIM = 8
"""Dimensions of any tensor: real weights have at most 4; the bound keeps shape arithmetic cheap."""

MAX_TASKS = 1 << 16
"""Tasks in one file: the structure checks loop over tasks, so the manifest's size must bound the work."""

MAX_CLASSES = 1 << 16
"""Classes of one task's head: a head is n_classes × feature_dim floats (and every runtime keeps every task's head),
so this bounds one task's dense size. (Was 2²⁰: a 2.9 MB file declared a 2 GB head.)"""

MAX_TENSOR_NAME, MAX_TASK_NAME = 200, 128
"""Characters in a tensor or task name: names reach file names and logs (exports, the runtime), never paths."""

MAX_NODE_GROUPS = 1 << 16
"""Channel groups in a format-3 file's ``node_groups`` (one task's node masks, packed): torchvision's ShuffleNet v2
has ~1,000 (shuffled groups cut into single channels), the widest real map seen; the list is walked once per load."""

MASK_VIEW_BYTES = 256
"""What one group's mask of one task costs in memory once read (`read_task`, `to_packed`: a numpy view, its
``nodes:GROUP`` name, a dict slot; ~200 B measured), counted against the decode bound: groups × tasks views grow with
the product of two lists the manifest holds once each, so 20,000 empty groups × 100 tasks in a 0.4 MB file made
`to_packed` build 2 M views (0.4 GB, 1,000× the file) unless counted."""

MAX_DIM, MAX_JSON_INT = 1 << 31, 1 << 62
"""Largest architecture size (channels, widths, input dims) and largest shape/offset integer the reader believes."""


def is_int(x: object, lo: int = 0, hi: int = MAX_JSON_INT) -> bool:
    """A JSON integer (not a bool, not a float) within [lo, hi]: the one bounds check every field goes through."""
    return type(x) is int and lo <= x <= hi


def dense_bytes(arch: Arch, n_classes: list[int]) -> int:
    """fp32 bytes of one task's dense weights (the largest head): what `Artifact.materialize` allocates."""
    return 4 * dense_params(arch, max(n_classes, default=0))


def decode_bound(stored: int) -> int:
    """The most a file of `stored` bytes may make the reader allocate (decoded blobs plus one dense task)."""
    return min(DECODE_FLOOR + DECODE_RATIO * stored, MAX_DECODED_BYTES)


def budget_problem(decoded: int, stored: int) -> str | None:
    """Why `decoded` bytes are too many for a file of `stored` bytes (the DECODE bound), or None when they fit."""
    bound = decode_bound(stored)
    if decoded > bound:
        return f"declares {decoded} decoded bytes, beyond the bound {bound} for {stored} stored bytes"
    return None
