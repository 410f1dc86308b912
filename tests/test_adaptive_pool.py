"""Adaptive average pooling to a size that neither divides the input nor is a multiple of it (torchvision VGG's 7×7
from a 2×2 map at 64×64): an ``adaptive_avgpool`` node, torch's own pooling in training and a fixed averaging
matrix per axis in ONNX (two MatMuls); both equal the module, a constant channel stays that constant, and what it
does not compute (max pooling of unequal windows, sizes past the bound) is refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_nets import check_parity, randomise_batchnorm

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.arch.op_shapes import intermediates
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.graph.constants import channel_constants
from edgecl.graph.onnx_spatial import adaptive_matrix
from edgecl.train.models import forward, from_numpy, init_params, to_numpy


class _Pooled(nn.Module):
    """A 1×1 conv, the pooling under test, flattened into a Linear classifier (every pooled value reaches it)."""

    def __init__(self, pool, shape: tuple[int, int, int], channels: int = 3):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(shape[0], channels, 1), pool
        self.fc = nn.Linear(self.pool(torch.zeros(1, channels, *shape[1:])).numel(), 4)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


@pytest.mark.parametrize("shape, size", [
    ((2, 2, 2), (7, 7)), ((2, 5, 5), 3), ((1, 7, 6), (5, 4)), ((2, 3, 5), (4, 2)), ((2, 6, 5), (4, None)),
    ((1, 4, 9), (3, 9)), ((2, 10, 3), (1, 2))])
def test_adaptive_average_pooling_of_unequal_windows_equals_the_module(shape, size):
    for pool in (nn.AdaptiveAvgPool2d(size), lambda x: F.adaptive_avg_pool2d(x, size)):
        module = _Pooled(pool, shape).eval()
        spec = from_torch(module, shape)
        node = next(n for n in spec["nodes"] if n["op"] == "adaptive_avgpool")
        assert node["size"] == [s if s is not None else d for s, d in zip(nn.modules.utils._pair(size), shape[1:])]
        check_parity(module, spec, shape)


@pytest.mark.parametrize("size, out", [(2, 7), (5, 3), (7, 5), (9, 4), (3, 3), (6, 2), (1, 5)])
def test_the_averaging_matrix_is_torchs_adaptive_pooling(size, out):
    x = torch.randn(2, 1, 1, size, generator=torch.Generator().manual_seed(size))
    want = F.adaptive_avg_pool2d(x, (1, out)).numpy()[:, 0, 0]
    got = x.numpy()[:, 0, 0] @ adaptive_matrix(size, out).T
    assert np.abs(got - want).max() < 1e-6
    assert np.allclose(adaptive_matrix(size, out).sum(axis=1), 1.0)


def test_the_width_pooled_map_between_the_matmuls_is_counted():
    """ONNX holds (N, C, H, w) between its two MatMuls: the runtime's activation estimate counts it."""
    assert intermediates({"op": "adaptive_avgpool", "size": [7, 5]}, [[16, 2, 3]]) == 16 * 2 * 5


def test_dividing_and_multiple_sizes_stay_plain_pools():
    for size, op in [((2, 2), "avgpool"), ((8, 8), "upsample"), (1, "gap")]:
        module = _Pooled(nn.AdaptiveAvgPool2d(size), (1, 4, 4)).eval()
        assert op in {n["op"] for n in from_torch(module, (1, 4, 4))["nodes"]}


@pytest.mark.parametrize("pool, shape, message", [
    (nn.AdaptiveMaxPool2d(3), (1, 5, 5), "adaptive max pooling to 3 is supported only"),
    (nn.AdaptiveAvgPool2d((65, 2)), (1, 4, 4), r"adaptive average pooling of \[4, 4\] to \[65, 2\]: at most"),
    # before: a raw ZeroDivisionError (torch pools to an empty map)
    (nn.AdaptiveAvgPool2d((0, 2)), (1, 5, 5), r"adaptive pooling to \(0, 2\): every output side must be an int ≥ 1"),
    (nn.AdaptiveMaxPool2d((3, 0)), (1, 4, 4), r"adaptive pooling to \(3, 0\): every output side must be an int ≥ 1"),
])
def test_adaptive_pooling_edgecl_cannot_follow_is_refused_by_name(pool, shape, message):
    with pytest.raises(UsageError, match=message) as e:
        from_torch(_Pooled(pool, shape).eval(), shape)
    assert "test_adaptive_pool.py" in str(e.value)


@pytest.mark.parametrize("shape, size, message", [
    ([2, 4, 4], [65, 3], "size of at most 64"), ([2, 5000, 1], [3, 1], "sides at most 4096"),
    ([8], [3, 3], r"\(channels, height, width\) map"), ([2, 4, 4], [0, 3], "size = \\[0, 3\\] must be")])
def test_spec_refuses_adaptive_pools_past_the_bound(shape, size, message):
    with pytest.raises(UsageError, match=message):
        validate({"name": "bad", "input_shape": shape, "nodes": [
            {"name": "p", "op": "adaptive_avgpool", "inputs": ["input"], "size": size},
            {"name": "f", "op": "flatten", "inputs": ["p"]}]})


def test_a_constant_channel_stays_constant_and_compaction_folds_it():
    """Channel 1 of c is its bias 0.75 everywhere: every adaptive window averages it to 0.75, so the 2×2 conv after
    the pooling takes it into its bias and it goes; the logits stay."""
    spec = validate({"name": "ad", "input_shape": [2, 5, 5], "nodes": [
        {"name": "c", "op": "conv", "inputs": ["input"], "in": 2, "out": 3, "k": 1},
        {"name": "p", "op": "adaptive_avgpool", "inputs": ["c"], "size": [3, 4]},
        {"name": "r", "op": "conv", "inputs": ["p"], "in": 3, "out": 2, "k": 2},
        {"name": "f", "op": "flatten", "inputs": ["r"]}]})
    params = to_numpy(init_params(spec, 2, torch.Generator().manual_seed(0)))
    params["c.weight"][1], params["c.bias"][1] = 0, 0.75
    values = channel_constants(spec, params, channel_map(spec))
    assert np.isnan(values["p"][[0, 2]]).all() and values["p"][1] == np.float32(0.75)
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    assert node_by_name(small)["r"]["in"] == 2
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 2, 5, 5)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5


@pytest.mark.slow
def test_torchvision_vgg11_goes_in_at_64_with_parity():
    from edgecl.arch.factories import build_module

    torch.manual_seed(0)
    module = build_module("torchvision.models:vgg11_bn").eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    assert node_by_name(spec)["avgpool"]["size"] == [7, 7]
    check_parity(module, spec, (3, 64, 64), batch=2)
