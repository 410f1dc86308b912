"""One way to open a model, whatever the caller holds: an artifact path, an opened `Artifact`, or an in-memory
`PackedModel`. Export, the runtime and the audit all take what `open_model` returns and read it through one small
read-only protocol, `ModelSource`, so none of them sniffs types or reaches into another module's private fields.

An artifact opened here stays lazy: only its header and manifest are read until a tensor is asked for, so a consumer
that goes task by task (the runtime building its switch plans) never holds every task's decoded deltas at once.
"""
from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgecl import artifact
from edgecl.arch.spec import Arch
from edgecl.deltas import PackedModel, TaskInfo, checked
from edgecl.errors import UsageError

IN_MEMORY = "<memory>"  # the `origin` of a model that is not a file (`PackedModel.origin`)


@runtime_checkable
class ModelSource(Protocol):
    """A continually learned model, read-only: its spec, its tasks, and its tensors on demand."""

    arch: Arch
    method: str
    config: dict[str, Any]
    params: dict[str, dict[str, Any]]  # tensor name → delta spec (``kind`` and its fields)
    extra: dict[str, Any]
    tasks: list[TaskInfo]

    @property
    def origin(self) -> str:
        """The file it came from, or `IN_MEMORY`."""

    @property
    def n_tasks(self) -> int:
        """How many tasks the model holds."""

    def task_index(self, task: int | str) -> int:
        """Index of a task given by index or name; UsageError naming the task otherwise."""

    def base_names(self) -> list[str]:
        """Names of the shared tensors (weights, LPS owner maps, …), in storage order."""

    def read_base(self, name: str) -> np.ndarray:
        """One shared tensor (read-only: never write into it)."""

    def read_task(self, t: int) -> dict[str, np.ndarray]:
        """Task t's own tensors (heads, masks, factors), decoded; the caller may keep or drop them."""

    def materialize(self, task: int | str) -> dict[str, np.ndarray]:
        """Dense float32 tensors of one task: trunk and head (`edgecl.deltas.materialize`)."""

    def task_blobs(self, names: set[str]) -> Any:
        """Every task's tensors `names`, to read one at a time later, also after this source is closed
        (`edgecl.artifact.reader.TaskBlobs`: ``shape(t, name)``, ``read(t, name)``, ``close()``); None for a model in
        memory, whose arrays a consumer simply keeps."""


def open_model(source: Any) -> ModelSource:
    """`str | os.PathLike` (an artifact file, opened lazily: header and manifest validated), an opened `Artifact`,
    or a `PackedModel` (checked for consistency). Anything else is a UsageError naming what was given; a damaged
    file is an ArtifactError naming the file and field."""
    if isinstance(source, PackedModel):
        return checked(source)
    if isinstance(source, (str, os.PathLike)):
        return artifact.load(source)
    if isinstance(source, artifact.Artifact):
        return source
    raise UsageError(f"expected an artifact path, an Artifact or a PackedModel, got {type(source).__name__}")
