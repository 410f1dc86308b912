"""Train a spec `from_torch` made for a real module and write the trained values back into that module
(`to_module_state`): shared by the tests of families whose position-bias MLPs train as the module's weights."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.fx_import import tensors_of


def trained_back_into(make: Callable[[int], nn.Module], head: str, moving: tuple[str, ...], tmp_path) -> None:
    """Train the spec of `make`'s module (given the number of classes) one epoch on split-digits' task 0 (1 × 8 ×
    8), check the spec tensors named with one of `moving` trained, write task 0's values back (every key one of the
    module's, of its shape, every parameter but the classifier `head` written), give it the task's head: it computes
    what the artifact's runtime does."""
    from edgecl import artifact
    from edgecl.arch.module_state import to_module_state
    from edgecl.deltas import materialize
    from edgecl.runtime import TaskRuntime
    from edgecl.train import registry
    from edgecl.train.data import make_stream
    from edgecl.train.protocol import TrainContext

    task = make_stream("split-digits", 1, seed=0).tasks[0]
    module = make(task.n_classes)
    spec = from_torch(module, (1, 8, 8))
    method = registry.create("finetune", spec, {"epochs": 1})
    method.learn_task(0, task, TrainContext(progress=False))
    packed = method.pack()
    trained = materialize(packed, 0)
    start = tensors_of(module, spec)
    moved = [k for k in start if any(word in k for word in moving)]
    assert moved and all(not np.array_equal(start[k], trained[k]) for k in moved)
    state = to_module_state(spec, {k: v for k, v in trained.items() if not k.startswith("head.")})
    own = module.state_dict()
    assert all(key in own and tuple(own[key].shape) == value.shape for key, value in state.items())
    assert set(dict(module.named_parameters())) - set(state) == {f"{head}.weight", f"{head}.bias"}
    state.update({f"{head}.weight": trained["head.weight"], f"{head}.bias": trained["head.bias"]})
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=False)
    artifact.save(packed, tmp_path / "m.edgecl")
    x = task.x_test[:16]
    with TaskRuntime(str(tmp_path / "m.edgecl")) as runtime, torch.no_grad():
        want = runtime.infer(x, task=0)
        got = module.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
