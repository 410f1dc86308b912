"""GPU paths of training: every method learns on CUDA and its deployed weights agree with the CPU evaluation.
Skipped where torch sees no CUDA device."""
import numpy as np
import pytest

from edgecl.arch import preset
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["finetune", "stl", "lps", "agscl", "halrp", "rgo"])
def test_method_trains_on_cuda(method):
    stream = make_stream("permuted-digits", 2)
    epochs = 10 if method == "agscl" else 2  # AGS-CL's group lasso needs steps before a second task has free nodes
    res = engine.run(registry.create(method, preset("mlp"), {"epochs": epochs}), stream,
                     TrainContext(device="cuda", progress=False))
    final = res.acc_matrix[-1]
    assert min(final) > 0.5
    for t, task in enumerate(stream.tasks):  # the same deployed weights evaluated on the CPU
        cpu = engine.predict(res.packed, t, task.x_test, device="cpu")
        gpu = engine.predict(res.packed, t, task.x_test, device="cuda")
        assert np.mean(cpu == gpu) > 0.99
