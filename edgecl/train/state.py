"""Training state beside an artifact: tensors a method needs to go on learning that a device does not (RGO's
projection matrices). Kept out of the artifact so devices never carry them; safetensors, so loading never unpickles.

Layout: `<artifact>.state`, a safetensors file of float/int arrays, written atomically; absent when the method has
no such state. `edgecl train --resume ARTIFACT` reads it back."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgecl.errors import UsageError
from edgecl.io import write_atomic


def state_path(artifact_path: str) -> str:
    """Where a method's training state lives: beside the artifact, not in it."""
    return f"{artifact_path}.state"


def save_training_state(state: dict[str, Any], artifact_path: str) -> None:
    """safetensors (no pickle), written atomically; nothing is written for methods without training state."""
    if not state:
        return
    from safetensors.numpy import save

    write_atomic(state_path(artifact_path), save({k: np.ascontiguousarray(v) for k, v in state.items()}))


def load_training_state(artifact_path: str) -> dict[str, Any] | None:
    """The state saved beside an artifact, or None when there is none; a damaged file is a clear error."""
    path = state_path(artifact_path)
    if not os.path.exists(path):
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable training state ({exc})") from None
