"""Padding decided in forward (`edgecl.arch.fx_padding`) and the ``pad`` op: TensorFlow's "same" padding of timm's
``Conv2dSame`` / ``AvgPool2dSame`` / ``MaxPool2dSame`` and torch's ``padding="same"`` for even kernels, ``F.pad``,
``ZeroPad2d`` and ``ConstantPad2d`` become ``pad`` nodes whose torch and ONNX forms equal the module at every input
size; a pad changes which channels are constant (compaction may not fold through it); the rest is refused by name.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.fx_padding import same_padding
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.graph.constants import channel_constants
from edgecl.train.models import forward, from_numpy
from layer_nets import Conv2dSame, TinyTF, create_pool2d
from torch_nets import check_parity, randomise_batchnorm


def _ops(spec: dict) -> list[str]:
    return [n["op"] for n in spec["nodes"]]


@pytest.mark.parametrize("size", [7, 8, 9, 10])
def test_tiny_tf_network_equals_the_module_at_every_size(size):
    module = TinyTF(in_channels=2).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (2, size, size))
    assert _ops(spec).count("pad") in (2, 3)  # stride-2 stem (odd sizes need none), F.pad, the max pool's
    check_parity(module, spec, (2, size, size))


@pytest.mark.parametrize("k, stride, dilation", [(3, 2, 1), (4, 1, 1), (5, 2, 1), (3, 1, 2), (2, 2, 1), (1, 2, 1)])
@pytest.mark.parametrize("size", [(9, 12), (16, 7)])
def test_conv2d_same_equals_timm_for_kernels_strides_and_dilations(k, stride, dilation, size):
    conv = Conv2dSame(3, 4, k, stride=stride, dilation=dilation, groups=1)
    module = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    spec = from_torch(module, (3, *size))
    pads = [n["pads"] for n in spec["nodes"] if n["op"] == "pad"]
    conv_node = next(n for n in spec["nodes"] if n["op"] == "conv")
    (top, bottom), (left, right) = (same_padding(s, k, stride, dilation) for s in size)
    assert conv_node["pad"] == [top, left]  # the symmetric part stays in the conv
    assert pads == ([[0, 0, bottom - top, right - left]] if (bottom, right) != (top, left) else [])
    check_parity(module, spec, (3, *size))


def test_same_padding_gives_tensorflow_output_sizes():
    for size in range(1, 20):
        for k, s, d in [(3, 2, 1), (4, 3, 1), (3, 1, 3), (1, 2, 1), (5, 1, 1)]:
            before, after = same_padding(size, k, s, d)
            assert after - before in (0, 1)
            assert (size + before + after - d * (k - 1) - 1) // s + 1 == -(-size // s)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_same_padded_pools_read_a_pad_node_and_feed_a_global_pool_exactly(kind):
    """Before fx_padding, a same-padded pool ran as the plain pool: here (a global pool after it) the spec's shapes
    agreed and the network was silently another one."""
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), create_pool2d(kind, 3, stride=2, padding="same"),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    spec = from_torch(module, (3, 10, 10))
    pad = next(n for n in spec["nodes"] if n["op"] == "pad")
    assert pad["value"] == ("-inf" if kind == "max" else 0.0) and pad["pads"] == [0, 0, 1, 1]
    check_parity(module, spec, (3, 10, 10))


def test_torch_same_padding_with_an_even_kernel():
    module = nn.Sequential(nn.Conv2d(3, 4, (4, 3), padding="same"), nn.Conv2d(4, 4, 2, padding="same", dilation=3),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    spec = from_torch(module, (3, 9, 8))
    assert [n["pads"] for n in spec["nodes"] if n["op"] == "pad"] == [[0, 0, 1, 0], [0, 0, 1, 1]]
    check_parity(module, spec, (3, 9, 8))


class _Padded(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.conv, self.pad, self.fc = nn.Conv2d(3, 4, 3), pad, nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pad(self.conv(x)).amax((2, 3)))


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((1, 0, 2, 3)), nn.ConstantPad2d(1, -0.5), nn.ConstantPad2d((0, 2), 3.0),
                                 lambda x: F.pad(x, (2, 1, 0, 1), "constant", 0.25), lambda x: F.pad(x, [1, 1]),
                                 lambda x: F.pad(x, (1, 1, 1, 1), value=float("-inf"))])
def test_explicit_padding_equals_the_module(pad):
    module = _Padded(pad if isinstance(pad, nn.Module) else _Lambda(pad))
    spec = from_torch(module, (3, 6, 7))
    assert _ops(spec).count("pad") == 1
    check_parity(module, spec, (3, 6, 7))


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("pad, message", [
    (lambda x: F.pad(x, (1, 1, 1, 1), mode="circular"), "mode 'circular'"),
    (lambda x: F.pad(x, (-1, 1, 0, 0), value=float("-inf")), "crops .* with mode .constant. and value -inf"),
    (lambda x: F.pad(x, (1, 1, 1, 1, 0, 0)), "two or four ints"),
    (lambda x: F.pad(x, (x.shape[0] - 1, 0)), "given in the code"),  # the batch size: not folded
    (lambda x: F.pad(x, (1, 1), value=float("nan")), "a finite number or -inf"),
])
def test_padding_edgecl_cannot_follow_is_refused_by_name(pad, message):
    module = _Padded(pad if isinstance(pad, nn.Module) else _Lambda(pad))
    with pytest.raises(UsageError, match=message) as info:
        from_torch(module, (3, 6, 7))
    assert "test_padding.py" in str(info.value) or "pad" in str(info.value)


def test_padding_a_feature_vector_is_refused():
    module = nn.Sequential(nn.Flatten(), _Lambda(lambda x: F.pad(x, (1, 1))), nn.Linear(3 * 4 * 4 + 2, 2))
    with pytest.raises(UsageError, match="padding is supported on a .channels, height, width. map"):
        from_torch(module, (3, 4, 4))


class _OwnPool(nn.MaxPool2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_pooling_subclass_with_its_own_forward_is_refused_by_name():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), _OwnPool(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
    with pytest.raises(UsageError, match="_OwnPool at '1' overrides MaxPool2d.forward"):
        from_torch(module, (3, 6, 6))


def _pad_spec(pads: list, value) -> dict:
    return {"name": "p", "input_shape": [2, 3, 4], "nodes": [
        {"name": "c", "op": "conv", "inputs": ["input"], "in": 2, "out": 3, "k": 1},
        {"name": "p", "op": "pad", "inputs": ["c"], "pads": pads, "value": value},
        {"name": "r", "op": "conv", "inputs": ["p"], "in": 3, "out": 2, "k": 2},
        {"name": "g", "op": "gap", "inputs": ["r"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]}


def test_pad_spec_fields_are_validated():
    spec = validate(_max_after_pad([0, 1, 1, 1], {"k": 2}))
    assert spec["nodes"][1]["value"] == "-inf"
    assert validate(_pad_spec([0, 0, 1, 1], 2))["nodes"][1]["value"] == 2.0
    for pads, value, message in [([0, 1, 2], 0.0, "four ints"), ([0, -4, 0, 0], 0.0, "crops the whole 3×4 map away"),
                                 ([0, 0, 1, 1], "inf", "or \"-inf\""), ([0, 0, 1, 1], float("nan"), "finite"),
                                 ([0, 0, 1, 1], True, "finite"), ([0, 0, 0.5, 1], 0.0, "four ints")]:
        with pytest.raises(UsageError, match=message):
            validate(_pad_spec(pads, value))


def test_a_pad_keeps_a_constant_channel_constant_only_where_its_value_is_the_pad_value():
    spec = validate(_pad_spec([0, 0, 1, 1], 0.5))
    rng = np.random.default_rng(0)
    params = {"c.weight": rng.standard_normal((3, 2, 1, 1)).astype(np.float32),
              "c.bias": np.array([0.0, 0.5, 2.0], np.float32),
              "r.weight": rng.standard_normal((2, 3, 2, 2)).astype(np.float32),
              "r.bias": rng.standard_normal(2).astype(np.float32)}
    params["c.weight"][:] = 0  # every channel of c is its bias: 0, 0.5 (the pad value) and 2
    values = channel_constants(spec, params, channel_map(spec))
    assert np.isnan(values["p"][[0, 2]]).all() and values["p"][1] == 0.5


def test_compaction_does_not_fold_a_constant_channel_through_a_pad():
    spec = validate(_pad_spec([0, 0, 1, 1], 0.0))
    rng = np.random.default_rng(1)
    params = {"c.weight": rng.standard_normal((3, 2, 1, 1)).astype(np.float32),
              "c.bias": rng.standard_normal(3).astype(np.float32),
              "r.weight": rng.standard_normal((2, 3, 2, 2)).astype(np.float32),
              "r.bias": rng.standard_normal(2).astype(np.float32),
              "head.weight": rng.standard_normal((2, 2)).astype(np.float32),
              "head.bias": rng.standard_normal(2).astype(np.float32)}
    params["c.weight"][1] = 0  # channel 1 holds its bias, 0 only in the padded border
    params["c.bias"][1] = 1.5
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    x = torch.from_numpy(rng.standard_normal((3, 2, 3, 4)).astype(np.float32))
    with torch.no_grad():
        want, got = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    assert torch.allclose(want, got, atol=1e-5)


@pytest.mark.parametrize("size", [32, 35])
def test_timm_tensorflow_port_goes_in_with_parity(size):
    from edgecl.arch.factories import build_module

    torch.manual_seed(0)
    module = build_module("timm:tf_mobilenetv3_small_minimal_100").eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, size, size))
    assert "pad" in _ops(spec)
    check_parity(module, spec, (3, size, size), batch=2)


def test_conv2d_same_export_keeps_the_padding_of_its_first_call():
    """timm's ``Conv2dSameExport`` fixes its padding at its first call: run at 7×7 first (1 row and column each side),
    it pads 8×8 inputs alike, not as "same" at 8 would (0 and 1); same output size, so only the values told."""
    from timm.layers.conv2d_same import Conv2dSameExport

    module = nn.Sequential(nn.Conv2d(2, 4, 1), Conv2dSameExport(4, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        module(torch.zeros(1, 2, 7, 7))
    spec = from_torch(module, (2, 8, 8))
    assert "pad" not in _ops(spec) and spec["nodes"][1]["pad"] == [1, 1]
    check_parity(module, spec, (2, 8, 8))
    fresh = nn.Sequential(nn.Conv2d(2, 4, 1), Conv2dSameExport(4, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    spec = from_torch(fresh, (2, 8, 8))
    assert [n["pads"] for n in spec["nodes"] if n["op"] == "pad"] == [[0, 0, 1, 1]]
    check_parity(fresh, spec, (2, 8, 8))


def _max_after_pad(pads: list, pool: dict, reader: str = "maxpool") -> dict:
    spec = _pad_spec(pads, "-inf")
    spec["nodes"][2] = {"name": "r", "op": reader, "inputs": ["p"], **pool}
    return spec


@pytest.mark.parametrize("pads, pool, reader, message", [
    ([0, 1, 2, 3], {"in": 3, "out": 2, "k": 2}, "conv", "only a maxpool may .a conv"),
    ([1, 1, 1, 1], {"k": 2}, "avgpool", "only a maxpool may .a avgpool"),
    ([2, 0, 0, 0], {"k": 2}, "maxpool", "axis 2 holds only padding"),  # the first window: two rows of -inf
    ([0, 0, 0, 3], {"k": 2, "stride": 1}, "maxpool", "axis 3 holds only padding"),  # the last ones
    ([1, 0, 1, 1], {"k": 2, "dilation": 4}, "maxpool", "axis 2 holds only padding"),  # taps 0, 4 skip rows 1-3
])
def test_minus_inf_padding_feeds_only_max_pool_windows_holding_a_real_value(pads, pool, reader, message):
    """A -inf border read by anything but a max-pool window that also holds a real value gives ±inf or NaN (in
    torch, ONNX and every task alike): a spec from a file could make every output of the runtime NaN."""
    with pytest.raises(UsageError, match=message):
        validate(_max_after_pad(pads, pool, reader))
    for pads, pool in [([0, 1, 1, 1], {"k": 2}), ([1, 1, 1, 1], {"k": 3, "stride": 2}),
                       ([0, 0, 1, 0], {"k": 2, "stride": 2, "ceil_mode": True})]:
        validate(_max_after_pad(pads, pool))
