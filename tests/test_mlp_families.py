"""ResMLP, gMLP and MambaOut in `from_torch`: ResMLP's Affine norm (``torch.addcmul(beta, alpha, x)``, the ``affine``
op: `edgecl.arch.fx_affine`), and channel splits and concatenations of channels-last values (gMLP's
``x.chunk(2, dim=-1)`` of tokens, MambaOut's ``torch.split(x, [g, i, c], dim=-1)`` and ``torch.cat((i, c), -1)`` of a
channels-last map: `edgecl.arch.fx_slices`): parity of tiny nets built from timm's blocks (torch forward and ONNX
Runtime = the module), the nodes they become, the affine's constants rule and spec checks, what is refused by name,
and timm's resmlp_12_224, gmlp_ti16_224 and mambaout_femto whole (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets_mixer import TinyGMLP, TinyMambaOut, TinyResMLP
from timm.models.mlp_mixer import Affine
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, randomised_parity

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.errors import UsageError
from edgecl.graph.constants import channel_constants


def test_tiny_resmlp_computes_the_module():
    spec = randomised_parity(TinyResMLP(in_channels=3), (3, 8, 8))
    affines = [n for n in spec["nodes"] if n["op"] == "affine"]
    assert [(n["name"], n["ch"], n["module_shape"]) for n in affines] == [
        ("block.norm1", 16, [1, 1, 16]), ("block.norm2", 16, [1, 1, 16]), ("norm", 16, [1, 1, 16])]
    keys, shapes = state_keys(spec), state_shapes(spec)
    assert keys["block.norm1.weight"] == "block.norm1.alpha" and keys["block.norm1.bias"] == "block.norm1.beta"
    assert shapes["norm.weight"] == shapes["norm.bias"] == (1, 1, 16)
    assert {n["name"] for n in spec["nodes"] if n["op"] == "layer_scale"} == {"block.ls1", "block.ls2"}
    assert [n["name"] for n in spec["nodes"] if n["op"] == "token_mix"] == ["block.linear_tokens"]
    cm = channel_map(spec)  # an affine's factor and offset are rows of the channels it scales
    assert cm.rows["block.norm1.weight"] == cm.rows["block.norm1.bias"] == cm.spaces["block.norm1"]


def test_tiny_gmlp_computes_the_module():
    spec = randomised_parity(TinyGMLP(in_channels=3), (3, 8, 8))
    slices = [(n["start"], n["stop"]) for n in spec["nodes"] if n["op"] == "slice"]
    assert slices == [(0, 16), (16, 32)]  # u and v: halves of fc1's 32 channels
    nodes = {n["name"]: n for n in spec["nodes"]}
    gate = next(n for n in spec["nodes"] if n["op"] == "mul")  # u times v's LayerNorm mixed over the tokens
    assert [nodes[i]["op"] for i in gate["inputs"]] == ["slice", "token_mix"]
    assert nodes[gate["inputs"][0]]["start"] == 0 and gate["inputs"][1] == "block.mlp_channels.gate.proj"
    assert nodes[nodes["block.mlp_channels.gate.norm"]["inputs"][0]]["start"] == 16


def test_tiny_mambaout_computes_the_module():
    spec = randomised_parity(TinyMambaOut(in_channels=3), (3, 8, 8))
    slices = [(n["start"], n["stop"]) for n in spec["nodes"] if n["op"] == "slice"]
    assert slices == [(0, 16), (16, 28), (28, 32), (0, 16), (16, 28), (28, 32)]  # g, i, c of each block
    cats = [n for n in spec["nodes"] if n["op"] == "cat"]
    assert len(cats) == 2 and all(len(n["inputs"]) == 2 for n in cats)  # (i, c)
    conv = next(n for n in spec["nodes"] if n["name"] == "block1.conv")
    assert conv["groups"] == conv["in"] == 4  # the depthwise conv on the permuted c part


def _affine_spec() -> dict:
    return validate({"name": "aff", "input_shape": [3, 2, 2], "nodes": [
        {"name": "a", "op": "affine", "inputs": ["input"], "ch": 3},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]})


def test_an_affine_keeps_a_constant_channel_constant_at_its_factor_and_offset():
    from edgecl.graph import constants

    spec = _affine_spec()
    params = {"a.weight": np.array([2.0, 0.0, -1.0], dtype=np.float32),
              "a.bias": np.array([0.5, 0.25, 0.0], dtype=np.float32)}
    cm = channel_map(spec)
    got = constants._node(spec["nodes"][0], [np.array([3.0, 7.0, np.nan])], params, cm)
    assert got[0] == 6.5 and got[1] == 0.25 and np.isnan(got[2])  # 2·3 + 0.5; a zero factor leaves the offset
    assert np.isnan(channel_constants(spec, params, cm)["a"]).all()  # the input varies


@pytest.mark.parametrize("node, match", [
    ({"ch": 4}, "affine has 4 channels, gets"),
    ({"ch": 3, "module_shape": [1, 1, 4]}, "module_shape"),
    ({"ch": 3, "bias": False}, "bias")])
def test_an_affine_spec_is_checked(node, match):
    nodes = [{"name": "a", "op": "affine", "inputs": ["input"], **node},
             {"name": "f", "op": "flatten", "inputs": ["a"]}]
    with pytest.raises(UsageError, match=match):
        validate({"name": "aff", "input_shape": [3, 2, 2], "nodes": nodes})


class _Tokens(nn.Module):
    """Tokens (B, 16, 8) of a 2×2-patch stem, then `how`, then the average token and a classifier."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(1, 8, 2, stride=2)
        self.square = nn.Conv2d(1, 4, 2, stride=2)  # (4, 4, 4): the same shape in either layout
        self.alpha, self.beta = nn.Parameter(torch.ones(1, 1, 8)), nn.Parameter(torch.zeros(1, 1, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if self.how == "cat_rows":  # channels-last maps joined along their rows, not their channels
            m = self.stem(x).permute(0, 2, 3, 1)
            return self.fc(torch.cat((m, m), dim=1).mean((1, 2)))
        if self.how == "cat_layouts":  # a channels-last map beside a channels-first one of the same shape
            m = self.square(x)
            return self.fc(torch.cat((m.permute(0, 2, 3, 1), m), dim=-1).mean((1, 2)))
        t = self.stem(x).flatten(2).transpose(1, 2)
        if self.how == "value":  # beta + 2·alpha·x
            t = torch.addcmul(self.beta, self.alpha, t, value=2)
        elif self.how == "own":  # the network's own parameters: no module to name the node by
            t = torch.addcmul(self.beta, self.alpha, t)
        elif self.how == "split_tokens":  # along the tokens, not the channels
            a, b = t.chunk(2, dim=1)
            t = a * b
        return self.fc(t.mean(dim=1))


class _Owned(nn.Module):
    """An Affine-like module whose parameters are not named alpha and beta."""

    def __init__(self):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(1, 1, 8)), nn.Parameter(torch.zeros(1, 1, 8))

    def forward(self, x):
        return torch.addcmul(self.shift, self.scale, x)


class _Named(_Tokens):
    def __init__(self):
        super().__init__("named")
        self.norm = _Owned()

    def forward(self, x):
        return self.fc(self.norm(self.stem(x).flatten(2).transpose(1, 2)).mean(dim=1))


@pytest.mark.parametrize("how, match", [
    ("value", r"addcmul.*MODULE.alpha and MODULE.beta .* with value 1"),
    ("own", r"addcmul.*gets 'alpha' and 'beta'"),
    ("split_tokens", r"chunk.*a split along dim 1; only along the last dim of a channels-last value"),
    ("cat_rows", r"cat.*concatenation of channels-last values along dim 1; only along their channels"),
    ("cat_layouts", r"'cat'.*it reads a channels-last tensor")])
def test_near_misses_are_refused_by_name(how, match):
    with pytest.raises(UsageError, match=match):
        from_torch(_Tokens(how), (1, 8, 8))


def test_an_affine_of_other_parameter_names_is_refused_naming_them():
    with pytest.raises(UsageError, match=r"addcmul.*gets 'norm.scale' and 'norm.shift'"):
        from_torch(_Named(), (1, 8, 8))


class _ChannelFirstSplit(nn.Module):
    """Channel splits that are not channels-last: of a map whose channels (8) outnumber its rows (4), whose first
    part is as wide as the map is high, and of a pooled feature vector (B, 8)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 8, 3, padding=1, stride=2)  # (8, 4, 4) from 8×8
        self.fc = nn.Linear(8 if how == "map_cat" else 4, 3)

    def forward(self, x):
        m = self.conv(x)
        if self.how == "map_add":  # parts (0, 4) and (4, 8): the first is not the whole map
            a, b = m.split([4, 4], 1)
            return self.fc((2 * a + b).mean((2, 3)))
        if self.how == "map_cat":
            return self.fc(torch.cat(m.chunk(2, 1)[::-1], 1).mean((2, 3)))
        a, b = m.mean((2, 3)).split([4, 4], 1)  # a feature vector
        return self.fc(a - b)


@pytest.mark.parametrize("how", ["map_add", "map_cat", "vector"])
def test_a_channels_first_split_is_read_off_the_channel_axis(how):
    """Before: a split read its channel count off the value's second axis (a map's rows): the (0, 4) part of 8
    channels over 4 rows was taken for the whole map, and a feature vector's split raised IndexError."""
    randomised_parity(_ChannelFirstSplit(how), (1, 8, 8))


class _TokenParts(nn.Module):
    """Tokens (B, 16, 8) whose channel parts are joined again by a list, as a list of computed tokens is."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(1, 8, 2, stride=2)
        self.norm = Affine(4)  # timm's: alpha, beta (1, 1, 4)
        self.fc = nn.Linear({"reordered": 8, "affine": 8, "gated": 5, "doubled": 16}[how], 3)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        if self.how == "reordered":
            parts = t.split([2, 6], -1)
            t = torch.cat([parts[-1], parts[-2]], -1)
        elif self.how == "affine":  # an Affine on one half only
            u, v = t.chunk(2, dim=-1)
            t = torch.cat([self.norm(u), v], dim=-1)
        elif self.how == "gated":  # uneven chunks: 3, 3, 2
            a, b, c = t.chunk(3, dim=-1)
            t = torch.cat([a * b, c], dim=2)
        else:
            t = torch.cat([t, 2 * t], dim=-1)
        return self.fc(t.mean(dim=1))


@pytest.mark.parametrize("how", ["reordered", "affine", "gated", "doubled"])
def test_a_list_of_token_parts_joined_along_the_channels_computes_the_module(how):
    """Before: refused as 'a concatenation of tokens ... edgecl supports tokens joined along the tokens (dim=1)',
    while the same parts joined as the split's own tuple converted."""
    spec = randomised_parity(_TokenParts(how), (1, 8, 8))
    assert sum(n["op"] == "cat" for n in spec["nodes"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name, args, ops", [
    ("resmlp_12_224", {"img_size": 64}, {"affine": 25, "token_mix": 12}),
    ("gmlp_ti16_224", {"img_size": 64}, {"token_mix": 30, "slice": 60}),
    ("mambaout_femto", {}, {"cat": 18, "slice": 54})])  # 3 + 3 + 9 + 3 blocks
def test_timm_mlp_families_compute_the_module(name, args, ops):
    import timm

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False, num_classes=10, **args).eval()
    spec = from_torch(module, (3, 64, 64))
    randomise_batchnorm(module)  # gMLP's token mixing (std 1e-6), ResMLP's Affine and layer scales drawn
    check_parity(module, spec, (3, 64, 64), batch=2)
    for op, count in ops.items():
        assert sum(n["op"] == op for n in spec["nodes"]) == count, op
