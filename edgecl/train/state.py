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


STATE_OF = "edgecl.artifact_digest"
"""safetensors metadata: the digest of the artifact the state belongs to (they are written one after the other, so a
run stopped between the two leaves a state that `load_training_state` recognises as another model's)."""


def save_training_state(state: dict[str, Any], artifact_path: str) -> None:
    """safetensors (no pickle), written atomically, naming the artifact it belongs to. For methods without training
    state nothing is written, and a state left beside that path by an earlier model is removed: side files follow
    the model."""
    if not state:
        try:
            os.remove(state_path(artifact_path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise UsageError(f"{state_path(artifact_path)}: the training state of the model this run replaced cannot "
                             f"be removed ({exc.strerror or exc}); remove it by hand: it belongs to no model now") \
                from None
        return
    from safetensors.numpy import save

    from edgecl import artifact

    with artifact.load(artifact_path) as art:
        digest = art.digest
    write_atomic(state_path(artifact_path), save({k: np.ascontiguousarray(v) for k, v in state.items()},
                                                 metadata={STATE_OF: digest}))


def load_training_state(artifact_path: str) -> dict[str, Any] | None:
    """The state saved beside an artifact, or None when there is none; a damaged file is a clear error."""
    path = state_path(artifact_path)
    if not os.path.exists(path):
        return None
    from safetensors import SafetensorError, safe_open

    from edgecl import artifact

    try:
        with safe_open(path, "np") as f:
            owner = (f.metadata() or {}).get(STATE_OF)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable training state ({exc})") from None
    with artifact.load(artifact_path) as art:
        if owner is not None and owner != art.digest:
            raise UsageError(f"{path}: this training state belongs to another version of {artifact_path} (a run "
                             "stopped between writing the two?); retrain, or restore the state written with it")
    return state
