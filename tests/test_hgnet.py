"""PP-HGNetV2's learnable affine block (timm's LearnableAffineBlock, `scale * x + bias` with one number each): a
``scalar_affine`` node whose torch and ONNX forms equal the module; its two tensors belong to no channel, so every
method keeps them by its rule for such tensors and earlier tasks stay as they were; a dead channel is the bias after
it, which compaction folds (or keeps where a padded convolution reads it); near misses are refused by name with the
source line; timm's hgnetv2_b0 goes in with parity."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from layer_nets import ScalarAffine, TinyHGNet
from torch_nets import check_parity, randomise_batchnorm

from edgecl.arch import channel_map, from_torch, node_by_name, param_shapes, validate
from edgecl.arch.module_state import state_keys
from edgecl.arch.spec import rowless_tensors
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.graph.compact import compact_task
from edgecl.graph.constants import channel_constants
from edgecl.train.models import forward, from_numpy, init_params


def test_tiny_hgnet_equals_the_module():
    module = TinyHGNet(in_channels=3).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    check_parity(module, spec, (3, 8, 8))
    nodes = node_by_name(spec)
    affines = [n["name"] for n in spec["nodes"] if n["op"] == "scalar_affine"]
    assert affines == ["stem.3", "layers.0.3", "layers.1.3", "aggregation.3"]
    assert nodes["layers.0.3"]["inputs"] == ["layers_0_2"] and nodes["layers_0_2"]["op"] == "relu"
    assert state_keys(spec)["layers.0.3.weight"] == "layers.0.3.scale"
    assert state_keys(spec)["stem.3.bias"] == "stem.3.bias"
    assert rowless_tensors(spec) == [f"{a}.{k}" for a in affines for k in ("weight", "bias")]
    assert not any(k in channel_map(spec).rows for k in rowless_tensors(spec))


def test_fresh_values_are_the_starting_values():
    """A module built with other starting numbers keeps them in the spec; `init_params` starts from them."""
    module = nn.Sequential(nn.Conv2d(2, 4, 3), ScalarAffine(0.5, -0.25), nn.Flatten(), nn.Linear(4 * 9, 3))
    spec = from_torch(module, (2, 5, 5))
    assert node_by_name(spec)["1"] == {"name": "1", "op": "scalar_affine", "inputs": ["0"], "init": 0.5,
                                       "init_bias": -0.25}
    params = init_params(spec)
    assert params["1.weight"].tolist() == [0.5] and params["1.bias"].tolist() == [-0.25]
    check_parity(module, spec, (2, 5, 5))


def test_scalar_affine_is_a_times_x_plus_b():
    """On a map and on a feature vector, in torch and in ONNX Runtime."""
    rng = np.random.default_rng(0)
    for shape in ([3, 4, 4], [6]):
        spec = validate({"name": "sa", "input_shape": shape, "nodes": [
            {"name": "sa", "op": "scalar_affine", "inputs": ["input"]},
            {"name": "f", "op": "flatten", "inputs": ["sa"]}]})
        n = int(np.prod(shape))
        params = {"sa.weight": np.array([1.7], np.float32), "sa.bias": np.array([-0.3], np.float32),
                  "head.weight": np.eye(n, dtype=np.float32), "head.bias": np.zeros(n, np.float32)}
        x = rng.standard_normal((2, *shape)).astype(np.float32)
        want = (x * np.float32(1.7) + np.float32(-0.3)).reshape(2, -1)
        with torch.no_grad():
            got = forward(spec, from_numpy(params), torch.from_numpy(x)).numpy()
        session = ort.InferenceSession(build_onnx(spec, params).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        assert np.abs(got - want).max() < 1e-6
        assert np.abs(session.run(None, {"x": x})[0] - want).max() < 1e-5


class _Net(nn.Module):
    """conv → ReLU → `affine` (a callable of the net and the map) → classifier."""

    def __init__(self, affine, **parameters: nn.Parameter):
        super().__init__()
        self.conv, self.fc, self.affine = nn.Conv2d(2, 4, 3), nn.Linear(4, 3), affine
        for name, p in parameters.items():
            self.register_parameter(name, p)

    def forward(self, x):
        return self.fc(self.affine(self, torch.relu(self.conv(x))).mean((2, 3)))


def _one() -> nn.Parameter:
    return nn.Parameter(torch.ones(1))


@pytest.mark.parametrize("net, message", [
    (lambda: _Net(lambda s, x: s.gain * x + s.shift, gain=_one(), shift=_one()), r"parameters 'gain' and 'shift'; "
     "their module must hold them as `scale` and `bias`"),
    (lambda: _Net(lambda s, x: s.scale * x + s.bias, scale=nn.Parameter(torch.ones(1, 1, 1)), bias=_one()),
     r"'scale' has shape \(1, 1, 1\); edgecl needs \(1,\)"),
    # the product read twice is a scalar affine without bias (a learned gain, `fx_affine._gain`); the bias alone not
    (lambda: _Net(lambda s, x: (lambda y: y + s.bias + y)(s.scale * x), scale=_one(), bias=_one()),
     r"the parameter 'bias' is used directly in forward"),
    (lambda: _Net(lambda s, x: x + s.bias, bias=_one()), r"the parameter 'bias' is used directly in forward; .* as a "
     r"learnable affine \(scale \* x \+ bias"),
    # the network's own scale and bias: the node (named after the product) read 'mul.scale', which no module holds
    (lambda: _Net(lambda s, x: s.scale * x + s.bias, scale=_one(), bias=_one()), "the network's own parameters "
     "'scale' and 'bias'; edgecl reads them from the submodule that holds them"),
])
def test_near_misses_are_refused_by_name(net, message):
    with pytest.raises(UsageError, match=message) as info:
        from_torch(net(), (2, 6, 6))
    assert "test_hgnet.py:" in str(info.value)


def test_a_block_used_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lab, self.fc = nn.Conv2d(2, 4, 3), ScalarAffine(), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.lab(self.lab(self.conv(x))).mean((2, 3)))

    with pytest.raises(UsageError, match=r"'lab.scale' is used twice \(shared weights\)"):
        from_torch(Twice(), (2, 6, 6))


def _dead_channel_spec(k: int) -> dict:
    """a (4 channels) → ReLU → scalar affine → b (a k×k conv reading them, padded when k > 1)."""
    return validate({"name": "lab", "input_shape": [1, 5, 5], "nodes": [
        {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 3, "pad": 1},
        {"name": "r", "op": "relu", "inputs": ["a"]},
        {"name": "lab", "op": "scalar_affine", "inputs": ["r"]},
        {"name": "b", "op": "conv", "inputs": ["lab"], "in": 4, "out": 3, "k": k, "pad": k // 2},
        {"name": "g", "op": "gap", "inputs": ["b"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})


@pytest.mark.parametrize("k, kept", [(1, 3), (3, 4)])
def test_a_dead_channel_is_the_bias_after_the_affine(k, kept):
    """Channel 2 of `a` is dead (zero row and bias): 0 after the ReLU, b = 0.7 after the affine. A 1×1 reader folds
    0.7 × its column into its bias and the channel goes; a padded 3×3 reader sees zeros at the border instead of 0.7,
    so the channel stays. Either way the logits are the dense ones."""
    spec = _dead_channel_spec(k)
    rng = np.random.default_rng(0)
    params = {key: rng.standard_normal(s).astype(np.float32) for key, s in param_shapes(spec, 2).items()}
    params["a.weight"][2], params["a.bias"][2] = 0, 0
    params["lab.weight"], params["lab.bias"] = np.array([1.5], np.float32), np.array([0.7], np.float32)
    constants = channel_constants(spec, params, channel_map(spec))
    assert constants["r"][2] == 0 and constants["lab"][2] == pytest.approx(0.7)
    assert np.isnan(np.delete(constants["lab"], 2)).all()
    small, compact, _ = compact_task(spec, params, channel_multiple=1)
    assert node_by_name(small)["a"]["out"] == kept
    assert compact["lab.weight"] == params["lab.weight"] and compact["lab.bias"] == params["lab.bias"]
    x = torch.from_numpy(rng.standard_normal((4, 1, 5, 5)).astype(np.float32))
    with torch.no_grad():
        dense, small_out = forward(spec, from_numpy(params), x), forward(small, from_numpy(compact), x)
    assert np.abs(dense.numpy() - small_out.numpy()).max() < 1e-5


@pytest.mark.slow
def test_timm_hgnetv2_b0_equals_the_module():
    """The RT-DETR backbone family's smallest member at 64×64: stem with F.pad and a ceil-mode pool, light blocks
    (1×1 then depthwise), ESE gates, a LearnableAffineBlock after every activation."""
    import timm

    module = timm.create_model("hgnetv2_b0", pretrained=False, num_classes=5).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    affines = [n for n in spec["nodes"] if n["op"] == "scalar_affine"]
    assert len(affines) > 30 and affines[0]["name"] == "stem.stem1.lab"
    check_parity(module, spec, (3, 64, 64), batch=2)
