"""Which tasks to export: 'all', '0,3', '2-5', names, or a list — parsed once for ONNX and TensorRT export."""
from __future__ import annotations

import re

from edgecl.errors import UsageError
from edgecl.source import ModelSource

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def select_tasks(spec: str | int | list | tuple | None, source: ModelSource) -> list[int]:
    """Task indices from 'all', '0,3', '2-5', task names, or a list of indices/names; order kept, repeats dropped.
    Bad syntax and unknown tasks raise UsageError naming them."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(source.n_tasks))
    if isinstance(spec, int):
        items: list = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")]
        if any(not s for s in items):
            raise UsageError(f"bad task list {spec!r}: use 'all' or comma-separated indices, ranges (2-5) or names")
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise UsageError(f"bad task list {spec!r}: use 'all', '0,3', or a list of indices or names")
    out: list[int] = []
    for item in items:
        match = _RANGE.match(item) if isinstance(item, str) else None
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise UsageError(f"bad task range {item!r}: end before start")
            for end in (lo, hi):
                source.task_index(end)  # both ends must exist
            picked = list(range(lo, hi + 1))
        else:
            picked = [source.task_index(item)]
        out.extend(i for i in picked if i not in out)
    if not out:
        raise UsageError(f"task list {spec!r} selects no task")
    return out
