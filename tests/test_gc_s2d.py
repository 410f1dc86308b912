"""GCNet's global context (timm's GlobalContext: an ``attention_pool`` node, then its ConvMlp gate and/or add) and
TResNet's space-to-depth (timm's SpaceToDepth: a ``space_to_depth`` node): torch and ONNX forms equal the modules;
the channel map treats the pooled context as its map's channels and space-to-depth's output as block² copies of its
input's, so compaction of dead channels keeps the logits; variants the ops do not compute are refused by name with
the source line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from layer_nets import TinyGCNet, TinyS2D
from torch_nets import check_parity, randomise_batchnorm

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.train.models import forward, from_numpy, init_params, to_numpy
from timm.layers.global_context import GlobalContext
from timm.layers.norm import LayerNorm2d
from timm.layers.space_to_depth import SpaceToDepth


class _Wrapped(nn.Module):
    """A conv, the layer under test, a mean and a Linear classifier."""

    def __init__(self, layer: nn.Module, channels: int = 6, out: int | None = None, in_channels: int = 2):
        super().__init__()
        self.conv, self.layer = nn.Conv2d(in_channels, channels, 3), layer
        self.fc = nn.Linear(out or channels, 3)

    def forward(self, x):
        return self.fc(self.layer(self.conv(x)).mean((2, 3)))


def _randomised(module: nn.Module) -> nn.Module:
    """Every weight away from timm's init (mlp_add's fc2 starts at 0, LayerNorm at the identity)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return module.eval()


@pytest.mark.parametrize("kwargs", [
    {}, {"rd_ratio": 1 / 2}, {"fuse_add": True, "fuse_scale": False}, {"fuse_add": True, "rd_ratio": 1 / 3},
    {"use_attn": False}, {"rd_channels": 5, "gate_layer": "hard_sigmoid"}, {"act_layer": nn.GELU}])
def test_global_context_variants_equal_the_module(kwargs):
    module = _randomised(_Wrapped(GlobalContext(6, **kwargs)))
    spec = from_torch(module, (2, 9, 7))
    check_parity(module, spec, (2, 9, 7))
    nodes = node_by_name(spec)
    assert nodes["layer.pool"]["op"] == ("gap" if kwargs.get("use_attn") is False else "attention_pool")
    assert nodes["layer"]["op"] == ("add" if kwargs.get("fuse_add") else "mul")


def test_tiny_gcnet_equals_the_module():
    module = _randomised(TinyGCNet(in_channels=3))
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    check_parity(module, spec, (3, 8, 8))
    nodes = node_by_name(spec)
    assert nodes["block1.3.pool"]["inputs"] == ["block1_2", "block1.3.conv_attn"]
    assert nodes["block2.3"] == {**nodes["block2.3"], "op": "add",
                                 "inputs": ["block2.3.scaled", "block2.3.mlp_add.fc2"]}


@pytest.mark.parametrize("block, shape", [(2, (3, 8, 6)), (4, (2, 8, 12)), (3, (1, 9, 6)), (1, (2, 5, 5))])
def test_space_to_depth_equals_the_module(block, shape):
    layer = SpaceToDepth()
    layer.bs = block  # timm's constructor asserts 4; its forward computes any block
    module = _Wrapped(layer, 4, 4 * block * block, in_channels=shape[0])
    module.conv = nn.Conv2d(shape[0], 4, 1)  # keeps the map's sides, which the block divides
    spec = from_torch(module, shape)
    assert node_by_name(spec)["layer"] == {**node_by_name(spec)["layer"], "op": "space_to_depth", "block": block}
    check_parity(module, spec, shape)


def test_space_to_depth_of_the_input_keeps_every_copy():
    module = TinyS2D(in_channels=2).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (2, 8, 8))
    check_parity(module, spec, (2, 8, 8))
    cm = channel_map(spec)
    assert cm.spaces["s2d"] == [("input", 1)] * 4 and cm.cols["stem.0.weight"] == [("input", 1)] * 4


def _spec() -> dict:
    """a (6 channels) → s2d (block 2: 24) → b (1×1, 4) → global context on b (attention pool, add) → gap."""
    return validate({"name": "gcs2d", "input_shape": [1, 8, 8], "nodes": [
        {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 6, "k": 3, "pad": 1},
        {"name": "s", "op": "space_to_depth", "inputs": ["a"], "block": 2},
        {"name": "b", "op": "conv", "inputs": ["s"], "in": 24, "out": 4, "k": 1},
        {"name": "logits", "op": "conv", "inputs": ["b"], "in": 4, "out": 1, "k": 1},
        {"name": "p", "op": "attention_pool", "inputs": ["b", "logits"]},
        {"name": "fc", "op": "conv", "inputs": ["p"], "in": 4, "out": 4, "k": 1},
        {"name": "sum", "op": "add", "inputs": ["b", "fc"]},
        {"name": "g", "op": "gap", "inputs": ["sum"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})


def test_compaction_removes_dead_channels_through_both_ops():
    """Channel 1 of `a` is read by no copy (b's columns 1, 7, 13, 19 are zero) and goes from every copy; channel 2
    of `b` is produced dead (zero rows and bias) and is read by the logits conv, the pooled context's fc and the
    head only as the constant 0: it goes too, and the logits stay the dense ones."""
    spec = _spec()
    params = to_numpy(init_params(spec, 3, torch.Generator().manual_seed(0)))
    params["b.weight"][:, 1::6] = 0
    params["b.weight"][2], params["b.bias"][2] = 0, 0
    params["fc.weight"][2], params["fc.bias"][2] = 0, 0
    cm = channel_map(spec)
    assert cm.spaces["p"] == cm.spaces["b"] and cm.cols["b.weight"] == [("a", 1)] * 4
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    nodes = node_by_name(small)
    assert (nodes["a"]["out"], nodes["b"]["in"], nodes["b"]["out"], nodes["logits"]["in"]) == (5, 20, 3, 3)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5


@pytest.mark.parametrize("nodes, message", [
    ([{"name": "p", "op": "attention_pool", "inputs": ["a", "a"]}], r"\(1, height, width\) logits"),
    ([{"name": "p", "op": "space_to_depth", "inputs": ["a"], "block": 3}], "block=3 divides"),
    ([{"name": "p", "op": "gap", "inputs": ["a"]}, {"name": "q", "op": "add", "inputs": ["p", "l"]}],
     "equal shapes or spatial axes of 1")])
def test_spec_refuses_what_the_ops_do_not_compute(nodes, message):
    with pytest.raises(UsageError, match=message):
        validate({"name": "bad", "input_shape": [1, 4, 4], "nodes": [
            {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 1},
            {"name": "l", "op": "conv", "inputs": ["input"], "in": 1, "out": 1, "k": 1}, *nodes,
            {"name": "f", "op": "flatten", "inputs": [nodes[-1]["name"]]}]})


def test_unsupported_variants_are_refused_by_name():
    gc = GlobalContext(6)
    gc.mlp_scale.norm = nn.BatchNorm2d(gc.mlp_scale.fc1.out_channels)
    with pytest.raises(UsageError, match=r"GlobalContext at 'layer' \(call_module layer, at .*test_gc_s2d.py:\d+: "
                                         r".*\): norm BatchNorm2d at layer.mlp_scale.norm is not supported"):
        from_torch(_Wrapped(gc), (2, 7, 7))
    gc = GlobalContext(6, fuse_add=True, fuse_scale=False)
    gc.mlp_add.norm = LayerNorm2d(gc.mlp_add.fc1.out_channels, bias=False)  # its module has no bias to read
    with pytest.raises(UsageError, match=r"GlobalContext at 'layer' \(call_module layer, at .*test_gc_s2d.py:\d+: "
                                         r".*\): layer.mlp_add.norm has a weight but no bias"):
        from_torch(_Wrapped(gc), (2, 7, 7))
    gc = GlobalContext(6, act_layer=nn.Softplus)
    with pytest.raises(UsageError, match=r"GlobalContext at 'layer' .*activation Softplus"):
        from_torch(_Wrapped(gc), (2, 7, 7))
    gc = GlobalContext(6)
    gc.conv_attn = nn.Conv2d(6, 1, 3, padding=1)
    with pytest.raises(UsageError, match=r"GlobalContext at 'layer' .*conv_attn must be a 1×1 conv"):
        from_torch(_Wrapped(gc), (2, 7, 7))

    class DepthToSpaceStem(nn.Module):  # the inverse, written out in forward: not a layer edgecl follows
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 8, 1), nn.Linear(2, 3)

        def forward(self, x):
            n, c, h, w = x.shape
            y = self.conv(x).view(n, 2, 2, 2, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, 2, 2 * h, 2 * w)
            return self.fc(y.mean((2, 3)))

    with pytest.raises(UsageError, match=r"'permute' \(call_method permute, at .*test_gc_s2d.py:\d+"):
        from_torch(DepthToSpaceStem(), (2, 4, 4))
