"""Anti-aliased downsampling (timm's BlurPool2d: a ``pad`` node in its mode, then a ``blur`` node) and padding by
reflection or replication (``F.pad``, ``ReflectionPad2d``, ``ReplicationPad2d``): torch and ONNX forms equal the
modules; a channel constant over the map stays that constant through a reflect pad and the normalised filter, so
compaction folds a dead channel through them; what the ops do not compute is refused by name with the source line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from layer_nets import TinyBlur
from torch_nets import check_parity, randomise_batchnorm

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.arch.ops import blur_filter
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.graph.constants import channel_constants
from edgecl.train.models import forward, from_numpy, init_params, to_numpy
from timm.layers.blur_pool import BlurPool2d, create_aa


class _Wrapped(nn.Module):
    """A conv, the layer under test, a mean and a Linear classifier."""

    def __init__(self, layer: nn.Module, channels: int = 6, in_channels: int = 2):
        super().__init__()
        self.conv, self.layer, self.fc = nn.Conv2d(in_channels, channels, 3), layer, nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(self.layer(self.conv(x)).mean((2, 3)))


def _blur_nodes(spec: dict) -> list[tuple]:
    return [(n["op"], n.get("mode"), n.get("pads"), n.get("k"), n.get("stride")) for n in spec["nodes"]
            if n["op"] in ("pad", "blur")]


@pytest.mark.parametrize("kwargs, shape", [
    ({}, (2, 11, 9)), ({"filt_size": 5}, (2, 10, 10)), ({"filt_size": 4}, (2, 9, 12)), ({"filt_size": 2}, (2, 7, 7)),
    ({"pad_mode": "constant"}, (2, 8, 8)), ({"pad_mode": "replicate", "filt_size": 5}, (2, 9, 8)),
    ({"stride": 1}, (2, 6, 7)), ({"stride": 3, "filt_size": 5}, (2, 13, 11)), ({"channels": None}, (2, 8, 9))])
def test_blur_pool_variants_equal_the_module(kwargs, shape):
    module = _Wrapped(BlurPool2d(**{"channels": 6, **kwargs}), in_channels=shape[0]).eval()
    spec = from_torch(module, shape)
    k, mode = kwargs.get("filt_size", 3), kwargs.get("pad_mode", "reflect")
    pad = module.layer.padding[0]
    assert _blur_nodes(spec) == [("pad", mode, [pad] * 4, None, None), ("blur", None, None, k, kwargs.get("stride", 2))]
    check_parity(module, spec, shape)


@pytest.mark.parametrize("aa_layer", ["blur", "blurpc", BlurPool2d])
def test_timm_create_aa_blur_layers_go_in(aa_layer):
    """timm's factory for resnet's ``aa_layer``: 'blur' (reflect) and 'blurpc' (zero padding)."""
    module = _Wrapped(create_aa(aa_layer, channels=6, stride=2)).eval()
    spec = from_torch(module, (2, 10, 10))
    assert _blur_nodes(spec)[0][1] == ("constant" if aa_layer == "blurpc" else "reflect")
    check_parity(module, spec, (2, 10, 10))


def test_the_blur_filter_is_timms():
    for k in (2, 3, 4, 5, 7):
        assert np.array_equal(blur_filter(k), BlurPool2d(1, filt_size=k).filt[0, 0].numpy())
        assert blur_filter(k).sum() == 1.0


@pytest.mark.parametrize("size", [8, 9])
def test_tiny_blur_network_equals_the_module(size):
    torch.manual_seed(0)
    module = TinyBlur(in_channels=3).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, size, size))
    assert [(n["mode"], n["pads"]) for n in spec["nodes"] if n["op"] == "pad"] == [
        ("reflect", [1] * 4), ("reflect", [1] * 4), ("replicate", [2] * 4), ("constant", [1] * 4)]
    check_parity(module, spec, (3, size, size))


@pytest.mark.parametrize("pad", [nn.ReflectionPad2d((1, 2, 0, 3)), nn.ReplicationPad2d(2),
                                 lambda x: F.pad(x, (2, 1, 1, 0), mode="reflect"),
                                 lambda x: F.pad(x, (0, 3, 4, 0), "replicate")])
def test_reflect_and_replicate_padding_equal_the_module(pad):
    """Every padded value reaches the classifier (the map flattened), so a border from the wrong rows would show."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pad = nn.Conv2d(2, 4, 1), pad
            self.fc = nn.Linear(self.pad(torch.zeros(1, 4, 6, 6)).numel(), 3)

        def forward(self, x):
            return self.fc(self.pad(self.conv(x)).flatten(1))

    module = Net().eval()
    check_parity(module, from_torch(module, (2, 6, 6)), (2, 6, 6))


def _edited(m: BlurPool2d) -> BlurPool2d:
    with torch.no_grad():
        m.filt[0, 0, 0, 0] += 0.1
    return m


def _before_timm_1(m: BlurPool2d) -> BlurPool2d:
    """timm 0.9's BlurPool2d: no pad_mode, a forward that always reflects (its class's, as timm 0.9 had it; a forward
    set on the instance is refused as such)."""
    del m.pad_mode

    def forward(self, x):
        return F.conv2d(F.pad(x, self.padding, "reflect"), self.filt, stride=self.stride, groups=self.channels)
    m.__class__ = type("BlurPool2d", (BlurPool2d,), {"forward": forward, "__module__": BlurPool2d.__module__})
    return m


def _attr(m: nn.Module, **values) -> nn.Module:
    for k, v in values.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("layer, shape, message", [
    (BlurPool2d(6, pad_mode="circular"), (2, 8, 8), "mode 'circular'"),
    # torch's own reflect refuses a reflection as large as the map while shapes are traced
    (BlurPool2d(6, filt_size=5), (2, 4, 4), "Padding size should be less than the corresponding input dimension"),
    (_edited(BlurPool2d(6)), (2, 8, 8), "not the binomial filter of size 3"),
    (_edited(BlurPool2d(None)), (2, 8, 8), "not the binomial filter of size 3"),
    (_attr(BlurPool2d(6), filt_size=40), (2, 8, 8), "filt_size 40 must be an int from 2 to 16"),
    (_attr(BlurPool2d(6), stride=(2, 2)), (2, 8, 8), r"stride \(2, 2\) an int ≥ 1"),
    (_before_timm_1(BlurPool2d(6)), (2, 8, 8), r"without pad_mode \(timm before 1.0\)"),
])
def test_blur_pools_edgecl_cannot_follow_are_refused_by_name(layer, shape, message):
    module = _Wrapped(layer, in_channels=shape[0]).eval()
    with pytest.raises(UsageError, match=message) as e:
        from_torch(module, shape)
    assert "layer" in str(e.value) and "test_blur.py" in str(e.value)


@pytest.mark.parametrize("pad, message", [
    (lambda x: F.pad(x, (1, 1), mode="circular"), "mode 'circular'"),
    (lambda x: F.pad(x, (0, 0, 4, 0), mode="reflect"), "Padding size should be less than"),  # torch's own
    (nn.ReflectionPad2d(4), "Padding size should be less than"),
    (lambda x: F.pad(x, (1, 1), mode="replicate", value=2.0), "only mode 'constant' has a value")])
def test_reflect_padding_edgecl_cannot_follow_is_refused_by_name(pad, message):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pad, self.fc = nn.Conv2d(2, 4, 1), pad, nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pad(self.conv(x)).mean((2, 3)))

    with pytest.raises(UsageError, match=message):
        from_torch(Net().eval(), (2, 4, 4))


@pytest.mark.parametrize("fields, message", [
    ({"op": "pad", "pads": [0, 0, 4, 0], "mode": "reflect"}, r"reflect pad \[0, 0, 4, 0\].*smaller"),
    ({"op": "pad", "pads": [1, 1, 1, 1], "mode": "circular"}, "mode = 'circular' must be 'constant' or 'reflect'"),
    ({"op": "pad", "pads": [1, 1, 1, 1], "mode": "edge"}, "must be 'constant' or 'reflect' or 'replicate'"),
    ({"op": "pad", "pads": [1, 1, 1, 1], "mode": "reflect", "value": 1.0}, "takes no value"),
    ({"op": "pad", "pads": [1, 1, 1, 1], "mode": "replicate", "value": "-inf"}, "takes no value"),
    ({"op": "blur", "k": 17}, "k from 2 to 16"), ({"op": "blur", "k": 1}, "k from 2 to 16"),
    ({"op": "blur", "k": 5}, r"at least k × k"), ({"op": "blur", "k": 3, "stride": 0}, "stride = 0 must be")])
def test_spec_refuses_pads_and_blurs_the_ops_do_not_compute(fields, message):
    with pytest.raises(UsageError, match=message):
        validate({"name": "bad", "input_shape": [2, 4, 4], "nodes": [
            {"name": "p", "inputs": ["input"], **fields}, {"name": "f", "op": "flatten", "inputs": ["p"]}]})


def _spec(mode: str) -> dict:
    """c (3 channels) → a BlurPool (pad in `mode`, blur 3 at stride 2) → r (3×3, no padding) → gap."""
    return validate({"name": "blur", "input_shape": [2, 8, 8], "nodes": [
        {"name": "c", "op": "conv", "inputs": ["input"], "in": 2, "out": 3, "k": 1},
        {"name": "p", "op": "pad", "inputs": ["c"], "pads": [1, 1, 1, 1], "mode": mode},
        {"name": "b", "op": "blur", "inputs": ["p"], "k": 3},
        {"name": "r", "op": "conv", "inputs": ["b"], "in": 3, "out": 2, "k": 3},
        {"name": "g", "op": "gap", "inputs": ["r"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant"])
def test_a_constant_channel_stays_constant_through_a_mirroring_pad_and_the_blur(mode):
    """Channel 1 of c holds its bias 1.5 everywhere: through a reflect or replicate pad and the normalised filter it
    is still 1.5, so compaction folds it into r's bias and removes it (the logits stay); zero padding mixes in 0 at
    the border, so there it is kept."""
    spec = _spec(mode)
    params = to_numpy(init_params(spec, 2, torch.Generator().manual_seed(0)))
    params["c.weight"][1], params["c.bias"][1] = 0, 1.5
    values = channel_constants(spec, params, channel_map(spec))
    if mode == "constant":
        assert np.isnan(values["b"]).all()
    else:
        assert np.isnan(values["b"][[0, 2]]).all() and values["b"][1] == 1.5
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    assert node_by_name(small)["r"]["in"] == (3 if mode == "constant" else 2)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 2, 8, 8)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm:resnetblur18", "timm:tresnet_m"])
def test_timm_blur_networks_go_in_with_parity(name):
    from edgecl.arch.factories import build_module

    torch.manual_seed(0)
    module = build_module(name).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    assert {"pad", "blur"} <= {n["op"] for n in spec["nodes"]}
    check_parity(module, spec, (3, 64, 64), batch=2)
