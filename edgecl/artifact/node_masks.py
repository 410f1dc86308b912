"""A task's node masks as one blob (format 3): the `nodes:GROUP` masks of task t, concatenated in the order the
manifest's ``node_groups`` states once, stored as ``task<t>::nodes``.

One blob per channel group per task cost a manifest entry and a table entry each: ~1,000 groups on a ShuffleNet made
a 1.3 MB manifest. The layout lives in the file, not in code (not derived from the arch's channel map), so what a
file means never depends on the edgecl that reads it. Pure functions of arrays and JSON values: no file access.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgecl.artifact.limits import MASK_VIEW_BYTES, MAX_DIM, MAX_NODE_GROUPS, is_int
from edgecl.errors import UsageError

PACKED = "nodes"
"""Task t's packed node masks: blob ``task<t>::nodes`` (format ≥ 3)."""
PREFIX = "nodes:"
"""In-memory name of one group's mask (`PackedModel.task_tensors[t]["nodes:GROUP"]`), and its blob in formats 1–2."""

Layout = list[tuple[str, int]]
"""(group, size) in blob order: group g's mask is the next `size` bits."""


def is_mask(name: str) -> bool:
    return name.startswith(PREFIX)


def layout_of(task_tensors: list[dict[str, Any]]) -> Layout:
    """The groups and sizes of a model's node masks (task 0's order), which every task must have alike; UsageError
    naming the task and group otherwise. Empty when the model has no node masks."""
    first = task_tensors[0] if task_tensors else {}
    layout = [(name[len(PREFIX):], _mask_size(first[name], 0, name)) for name in first if is_mask(name)]
    for t, tt in enumerate(task_tensors[1:], 1):
        sizes = {name[len(PREFIX):]: _mask_size(a, t, name) for name, a in tt.items() if is_mask(name)}
        if sizes != dict(layout):
            diff = sorted(set(sizes.items()) ^ set(layout))[:3]
            raise UsageError(f"node masks of task {t} differ from task 0's (group, size) {diff}: every task needs the "
                             "same groups, as one blob stores them in one layout")
    if len(layout) > MAX_NODE_GROUPS:
        raise UsageError(f"cannot store this model: {len(layout)} node groups (limit {MAX_NODE_GROUPS})")
    return layout


def _mask_size(arr: Any, t: int, name: str) -> int:
    arr = np.asarray(arr)
    if arr.dtype != np.bool_ or arr.ndim != 1:
        raise UsageError(f"node mask {name!r} of task {t} is {arr.dtype}{arr.shape}, needs 1-D bool")
    return arr.size


def view_bytes(n_groups: int, n_tasks: int) -> int:
    """Memory the reader spends on the `nodes:GROUP` views of every task (counted in the decode bound: the views
    number groups × tasks, not what the file's size pays for)."""
    return n_groups * n_tasks * MASK_VIEW_BYTES


def join(tensors: dict[str, Any], layout: Layout) -> np.ndarray:
    """One task's masks as one 1-D bool array, in `layout` order."""
    if not layout:
        return np.zeros(0, bool)
    return np.concatenate([np.asarray(tensors[PREFIX + g], bool) for g, _ in layout])


def split(packed: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """`nodes:GROUP` → a view of `packed`; the caller has checked that the sizes sum to its length."""
    out, start = {}, 0
    for group, size in layout:
        out[PREFIX + group] = packed[start:start + size]
        start += size
    return out


def layout_problem(value: Any) -> str | None:
    """What is wrong with a manifest's ``node_groups`` (a list of [group, size] pairs, each group once), or None.
    Group names are checked by the caller (they must make valid `nodes:GROUP` tensor names)."""
    if not isinstance(value, list) or len(value) > MAX_NODE_GROUPS:
        return f"must be a list of at most {MAX_NODE_GROUPS} [group, size] pairs"
    seen: set[str] = set()
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and is_int(pair[1], 0, MAX_DIM)):
            return f"entry {i} is {str(pair)[:80]}, needs [group name, size 0..{MAX_DIM}]"
        if pair[0] in seen:
            return f"group {pair[0]!r} is listed twice"
        seen.add(pair[0])
    return None
