"""GroupNorm of G groups (nn.GroupNorm, timm's GroupNormAct: BiT) as a ``layer_norm`` over the map with ``groups``:
against torch's GroupNorm, torch = ONNX on random specs, the field's validation and stored form (one group left
out), the channel map (a group's channels pinned and ordered), from_torch of TinyGroupNormNet and its refusals, and
the full resnetv2_50x1_bit (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_nets_nf import TinyGroupNormNet
from random_weights import random_params
from torch import nn
from torch_nets import check_parity, spec_logits

from edgecl.arch import from_torch, validate
from edgecl.arch.channels import channel_map
from edgecl.arch.factories import build_module
from edgecl.arch.later_fields import stored_form
from edgecl.errors import UsageError
from edgecl.train.models import forward, from_numpy


def _spec(ch: int = 8, groups=None, over="map", shape=(8, 4, 5)) -> dict:
    norm = {"over": over, **({"groups": groups} if groups is not None else {})}
    return {"name": "g", "input_shape": list(shape), "output": "f", "nodes": [
        {"name": "x", "op": "conv", "inputs": ["input"], "in": shape[0], "out": ch, "k": 1},
        {"name": "n", "op": "layer_norm", "inputs": ["x"], "ch": ch, **norm},
        {"name": "f", "op": "flatten", "inputs": ["n"]}]}


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_map_norm_of_groups_is_torchs_group_norm(groups):
    """The spec's torch forward and its ONNX graph against nn.GroupNorm with a random affine."""
    norm = nn.GroupNorm(groups, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    spec = validate({"name": "g", "input_shape": [8, 4, 5], "output": "f", "nodes": [
        {"name": "n", "op": "layer_norm", "inputs": ["input"], "ch": 8, "over": "map", "groups": groups},
        {"name": "f", "op": "flatten", "inputs": ["n"]}]})
    weights = {**random_params(spec, 3, 0), "n.weight": norm.weight.detach().numpy(),
               "n.bias": norm.bias.detach().numpy()}
    x = torch.randn(2, 8, 4, 5) * 3 + torch.arange(8.0).reshape(1, 8, 1, 1)  # groups of different means
    with torch.no_grad():
        got = forward(spec, from_numpy(weights), x, head=False).numpy()
        assert np.abs(got - norm(x).reshape(2, -1).numpy()).max() < 1e-5
    spec_logits(spec, weights, x)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_group_norms_torch_equals_onnx(data):
    """Groups of at least two values: a group of one normalises to 0 / √eps, where torch's fused kernel and ONNX's
    Sub differ by the rounding of x·w/√eps (beyond 1e-4 of the logits in one run of 3 under load), not by the op."""
    ch, side = data.draw(st.sampled_from([2, 4, 6, 12])), data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.sampled_from([g for g in range(1, ch + 1) if ch % g == 0 and ch // g * side * side > 1]))
    spec = validate(_spec(ch, groups, shape=(3, side, side)))
    spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, 3, side, side) * 2)


def test_groups_validate_store_and_refuse():
    one = validate(_spec(groups=1))
    assert one == validate(_spec()) and "groups" not in stored_form(one)["nodes"][1]  # older readers read it
    four = validate(_spec(groups=4))
    assert four["nodes"][1]["groups"] == 4 and validate(stored_form(four)) == four
    for bad, words in [(dict(groups=3), "8 channels that the groups divide"),
                       (dict(groups=2, over="channels"), "needs over 'map'"), (dict(groups=0), "an int from 1")]:
        with pytest.raises(UsageError, match=words):
            validate(_spec(**bad))


def test_a_groups_channels_are_pinned_and_ordered():
    """Every channel shifts its group's mean and variance, and the groups are contiguous blocks: none may go or
    move. One group (GroupNorm1, a LayerNorm over the map) pins them but any order keeps its statistics."""
    grouped, single = channel_map(validate(_spec(groups=4))), channel_map(validate(_spec(groups=1)))
    assert "x" in grouped.pinned and "x" in grouped.ordered
    assert "x" in single.pinned and "x" not in single.ordered


def test_tiny_group_norm_net_goes_in_with_parity():
    net = TinyGroupNormNet(in_channels=3).eval()
    spec = from_torch(net, (3, 8, 8))
    norms = {n["name"]: (n.get("groups"), n["affine"]) for n in spec["nodes"] if n["op"] == "layer_norm"}
    assert norms == {"norm": (4, True), "norm1": (2, True), "norm2": (2, False)}
    check_parity(net, spec, (3, 8, 8))


class _Functional(nn.Module):
    """F.group_norm written in forward: with a bias but no weight, with the network's own weight (no layer to name
    the node by), or on a channels-last map."""

    def __init__(self, last: bool = False, bias: bool = True):
        super().__init__()
        self.conv, self.fc, self.last, self.use_bias = nn.Conv2d(3, 8, 3), nn.Linear(8, 2), last, bias
        self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        h = self.conv(x)
        if self.last:
            h = F.group_norm(h.permute(0, 2, 3, 1), 2).permute(0, 3, 1, 2)
        else:
            h = F.group_norm(h, 2, None, self.bias) if self.use_bias else F.group_norm(h, 2, self.weight, None)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("make, words", [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.GroupNorm(2, 8 * 36), nn.Linear(8 * 36, 2)),
     r"group_norm of 2 groups of a tensor of shape \[288\].*channels-first"),
    (lambda: _Functional(), r"test_group_norm.py:\d+: h = F.group_norm.*a GroupNorm with a bias but no weight"),
    (lambda: _Functional(bias=False), r"F.group_norm.*its weight and bias must be a GroupNorm's own parameters .*a "
                                      r"bias-less one's LAYER.weight"),
    (lambda: _Functional(last=True), r"group_norm of 2 groups of a tensor of shape \[6, 6, 8\].*channels-first"),
])
def test_group_norms_edgecl_does_not_compute_are_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words):
        from_torch(make().eval(), (3, 8, 8))


@pytest.mark.slow
def test_bit_resnetv2_goes_in_with_parity():
    """resnetv2_50x1_bit: StdConv2d and 49 GroupNormActs of 32 groups (the pre-activation norms and the final one)."""
    torch.manual_seed(0)
    net = build_module("timm:resnetv2_50x1_bit").eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    spec = from_torch(net, (3, 32, 32))
    assert [n.get("groups") for n in spec["nodes"] if n["op"] == "layer_norm"] == [32] * 49
    check_parity(net, spec, (3, 32, 32), batch=2)
