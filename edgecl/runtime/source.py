"""Where a runtime's model comes from: an artifact path, a loaded `edgecl.artifact.Artifact`, or an in-memory
`PackedModel`. Everything is reduced to a `PackedModel` so switching can use the delta structure (masks as bits)
rather than only dense `materialize` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecl.deltas import PackedModel, check_consistent
from edgecl.errors import ArtifactError, UsageError


def load_packed(source: Any) -> PackedModel:
    """A checked `PackedModel` from a path, an Artifact (anything with `to_packed()`), or a PackedModel."""
    if isinstance(source, PackedModel):
        try:
            check_consistent(source)
        except UsageError as exc:
            raise UsageError(f"inconsistent model: {exc}") from None
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ArtifactError(path, "file", "does not exist or is not a file")
        try:
            from edgecl import artifact
        except ImportError:
            raise UsageError("reading artifact files needs edgecl.artifact, which is not installed") from None
        opened = artifact.load(path)
        try:
            return opened.to_packed()  # decodes, verifies every checksum and runs check_consistent
        finally:
            opened.close()
    to_packed = getattr(source, "to_packed", None)
    if to_packed is None:
        raise UsageError(f"expected an artifact path, Artifact or PackedModel, got {type(source).__name__}")
    return to_packed()
