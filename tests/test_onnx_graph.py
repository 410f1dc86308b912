"""The ONNX builder mirrors the torch forward op for op, folded and switchable."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgecl.arch import preset
from edgecl.graph.builder import build_onnx, tensor_names
from edgecl.train.models import forward, init_head, init_params, to_numpy


def _random_params(arch, classes):
    gen = torch.Generator().manual_seed(0)
    p = {**init_params(arch, generator=gen), **init_head(arch, classes, gen)}
    for k, v in p.items():  # non-trivial BatchNorm statistics and biases
        if k.endswith("running_var"):
            p[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith(("running_mean", "bias")):
            p[k] = 0.1 * torch.randn(v.shape, generator=gen)
    return p


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet"])
def test_folded_and_switchable_match_torch(name):
    arch = preset(name)
    params = _random_params(arch, 7)
    x = torch.rand(5, *arch["input_shape"])
    with torch.no_grad():
        ref = forward(arch, params, x).numpy()
    folded = build_onnx(arch, to_numpy(params))
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(_session(folded).run(None, {"x": x.numpy()})[0], ref, atol=1e-5)
    switchable = build_onnx(arch, weights_as_inputs=True)
    onnx.checker.check_model(switchable, full_check=True)
    feeds = {"x": x.numpy(), **{n: v for n, v in to_numpy(params).items() if n in tensor_names(arch)}}
    np.testing.assert_allclose(_session(switchable).run(None, feeds)[0], ref, atol=1e-5)


def test_switchable_graph_serves_heads_of_different_sizes():
    arch = preset("mlp")
    sess = _session(build_onnx(arch, weights_as_inputs=True))
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    for classes in (2, 10):
        feeds = {"x": x, **to_numpy(_random_params(arch, classes))}
        assert sess.run(None, feeds)[0].shape == (3, classes)
