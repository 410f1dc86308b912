"""One view of whatever the caller exports from — an artifact path, a loaded `Artifact`, or an in-memory
`PackedModel` — so the exporters never care which: they need the spec, the task list, and `materialize(t)`."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgecl.arch import Arch
from edgecl.deltas import PackedModel, materialize
from edgecl.errors import UsageError


@dataclass
class ModelSource:
    """The exporter's view of a continually learned model."""

    arch: Arch
    method: str
    tasks: list[Any]  # TaskInfo-like: .name, .n_classes
    task_index: Callable[[int | str], int]
    materialize: Callable[[int], dict[str, np.ndarray]]
    origin: str  # file path, or "<memory>"

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


def open_source(source: Any) -> ModelSource:
    """Accept `str | Path | Artifact | PackedModel` (or an opened ModelSource). Unreadable files raise ArtifactError
    naming the file."""
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, PackedModel):
        return ModelSource(source.arch, source.method, list(source.tasks), source.task_index,
                           lambda t: materialize(source, t), "<memory>")
    if isinstance(source, (str, os.PathLike)):
        from edgecl import artifact

        source = artifact.load(source)
    needed = ("arch", "tasks", "task_index", "materialize")
    if not all(hasattr(source, a) for a in needed):
        raise UsageError(f"cannot export from a {type(source).__name__}: expected an artifact path, an Artifact or "
                         "a PackedModel")
    origin = str(getattr(source, "path", "<artifact>"))
    return ModelSource(source.arch, getattr(source, "method", "unknown"), list(source.tasks), source.task_index,
                       source.materialize, origin)


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
