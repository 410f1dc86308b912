"""Small forms `from_torch` follows: a position embedding added to a feature map (PiT, Visformer: a (1, C, H, W)
parameter, stored channels-first) — parity of the spec's torch forward and ONNX Runtime graph with the real module,
the module's tensors in and out, the channel map, old token specs reading as before; timm's BatchNormAct2d with
every activation edgecl has as a spec op (torch's and timm's modules: EfficientFormerV2's GELU); negative padding
that crops (NASNet's ZeroPad2d((-1, 1, -1, 1)), F.pad with negative sides; ONNX Pad in opset 17 on ONNX Runtime's
CPU provider), its constants rule and compaction; and refusals by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from layer_nets import TinyMapEmbed, vit_spec
from torch_nets import check_parity

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_shapes
from edgecl.arch.spec import frozen_tensors, node_by_name, node_shapes, param_shapes, token_tensors
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.graph.constants import channel_constants
from edgecl.train.models import forward, from_numpy, init_params, to_numpy
from edgecl.train.initial import starting_weights


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 12, 6)])
def test_map_position_embedding_parity_and_tensors(frozen, shape):
    torch.manual_seed(0)
    module = TinyMapEmbed(in_channels=shape[0], image=shape[1]).eval()
    if shape[1] != shape[2]:  # a map of unequal sides: the embedding's rows are row-major positions
        module.pos_embed = nn.Parameter(torch.randn(1, 8, shape[1] // 2, shape[2] // 2))
    module.pos_embed.requires_grad_(not frozen)
    spec = from_torch(module, shape)
    check_parity(module, spec, shape)
    node = next(n for n in spec["nodes"] if n["op"] == "pos_embed")
    h, w = shape[1] // 2, shape[2] // 2
    assert (node["ch"], node["tokens"], node["module_shape"], node["frozen"]) == (8, h * w, [1, 8, h, w], frozen)
    assert param_shapes(spec)["pos_embed.weight"] == (8, h * w)
    assert state_shapes(spec)["pos_embed.weight"] == (1, 8, h, w)
    ours = tensors_of(module, spec)["pos_embed.weight"]
    assert np.array_equal(ours, module.pos_embed.detach().numpy().reshape(8, h * w))
    start = starting_weights(module, spec)
    assert np.array_equal(start.values["pos_embed.weight"], ours)
    assert (frozen_tensors(spec), token_tensors(spec)) == ((["pos_embed.weight"], []) if frozen else
                                                          ([], ["pos_embed.weight"]))
    cm = channel_map(spec)  # the embedding's rows are the stem's output channels, like a bias
    assert {g for g, _ in cm.rows["pos_embed.weight"]} == {g for g, _ in cm.rows["stem.bias"]}
    assert validate(stored_form(spec)) == spec


def test_token_position_embeddings_read_as_before():
    """A ViT's embedding has no module_shape (stored (1, T, C) by its module): its spec and file form are unchanged."""
    spec = vit_spec((1, 8, 8))
    node = next(n for n in spec["nodes"] if n["op"] == "pos_embed")
    assert "module_shape" not in node and "module_shape" not in stored_form(spec)["nodes"][spec["nodes"].index(node)]
    assert state_shapes(spec)[f"{node['name']}.weight"] == (1, node["tokens"], node["ch"])


def _map_spec(**fields) -> dict:
    return {"name": "m", "input_shape": [2, 4, 6], "nodes": [
        {"name": "p", "op": "pos_embed", "inputs": ["input"], "ch": 2, "tokens": 24, **fields},
        {"name": "f", "op": "flatten", "inputs": ["p"]}]}


@pytest.mark.parametrize("fields, message", [
    ({"tokens": 23}, "pos_embed has 2 channels and 23 positions, gets [2, 4, 6]"),
    ({"module_shape": [1, 2, 4, 5]}, "of a position embedding must be (1, 2, H, W) with H·W = 24"),
    ({"module_shape": [2, 4, 6]}, "of a position embedding must be (1, 2, H, W)"),
    ({"module_shape": [1, 24, 2]}, "of a position embedding must be (1, 2, H, W)")])
def test_map_position_embedding_specs_refused_by_field(fields, message):
    with pytest.raises(UsageError, match=r"node 0 \(p\).*" + _escaped(message)):
        validate(_map_spec(**fields))
    assert validate(_map_spec())["nodes"][0]["tokens"] == 24  # no module_shape: a hand-written spec's embedding


def _escaped(text: str) -> str:
    import re
    return re.escape(text)


class _BiasPerChannel(nn.Module):
    """A (1, C, 1, 1) parameter added to a (B, C, H, W) map: a broadcast, not one vector per position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.offset = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x):
        return (self.conv(x) + self.offset).mean([2, 3])


def test_parameter_of_another_shape_added_to_a_map_refused_by_name():
    """Only a parameter of the map's own shape is a position embedding; a broadcast one keeps its refusal."""
    with pytest.raises(UsageError, match=r"the parameter 'offset' is used directly in forward"):
        from_torch(_BiasPerChannel(), (1, 8, 8))


class _ConvBnAct(nn.Module):
    """timm's BatchNormAct2d with the activation `act` (a class or a create_act_layer name), after a conv."""

    def __init__(self, act):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = BatchNormAct2d(6, act_layer=act)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean([2, 3]))


@pytest.mark.parametrize("act, op, fields", [
    ("gelu", "gelu", {"approximate": "none"}), ("gelu_tanh", "gelu", {"approximate": "tanh"}),
    ("swish", "silu", {}), ("sigmoid", "sigmoid", {}), ("tanh", "tanh", {}), ("relu6", "relu6", {}),
    ("hard_swish", "hardswish", {}), ("hard_sigmoid", "hardsigmoid", {}), ("leaky_relu", "leaky_relu", {}),
    ("timm.layers.activations.HardSwish", "hardswish", {}), ("timm.layers.activations.HardSigmoid", "hardsigmoid", {}),
    ("timm.layers.activations.Swish", "silu", {}), ("timm.layers.activations_me.SwishMe", "silu", {}),
    ("timm.layers.activations_me.HardSwishMe", "hardswish", {})])
def test_batchnorm_act_with_every_spec_activation_parity(act, op, fields):
    """torch's and timm's activation modules inside a BatchNormAct2d (kept whole): the spec op of the same function."""
    import importlib

    if act.startswith("timm."):
        module_name, _, cls = act.rpartition(".")
        act = getattr(importlib.import_module(module_name), cls)
    torch.manual_seed(0)
    module = _ConvBnAct(act).eval()
    with torch.no_grad():  # statistics away from the identity, so each activation sees negative and large values
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.running_var.uniform_(0.2, 2)
        module.bn.weight.uniform_(0.5, 3)
    spec = from_torch(module, (2, 6, 6))
    check_parity(module, spec, (2, 6, 6))
    node = next(n for n in spec["nodes"] if n["name"] == "bn.act")
    assert node["op"] == op and {k: node[k] for k in fields} == fields


@pytest.mark.parametrize("act, name", [("mish", "Mish"), ("elu", "ELU"), ("quick_gelu", "QuickGELU"),
                                       ("prelu", "PReLU"), ("hard_mish", "HardMish(Me)?")])
def test_batchnorm_act_with_another_activation_refused_by_name(act, name):
    with pytest.raises(UsageError, match=rf"activation {name} at 'bn.act' is not one edgecl has as a spec op \(it "
                                         r"has relu, .*\).*test_small_forms.py:\d+"):
        from_torch(_ConvBnAct(act).eval(), (2, 6, 6))


class _ClampedReLU(nn.ReLU):
    """A subclass of a torch activation that computes something else: its own forward."""

    def forward(self, x):
        return x.clamp(-1.0, 1.0)


class _OwnActivation(nn.Module):
    """A conv and `_ClampedReLU`, as a plain layer of the forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(2, 6, 3), _ClampedReLU(), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean([2, 3]))


@pytest.mark.parametrize("module, path", [(_OwnActivation, "act"), (lambda: _ConvBnAct(_ClampedReLU), "bn.act")])
def test_an_activation_subclass_with_its_own_forward_refused_by_name(module, path):
    """Before: read as relu by its base class, a network that computes another function (parity failed)."""
    with pytest.raises(UsageError, match=rf"_ClampedReLU at '{path}' overrides ReLU.forward"):
        from_torch(module().eval(), (2, 6, 6))


class _Crop(nn.Module):
    """A conv, a cropping pad (a ZeroPad2d, or F.pad with `pads` and `value`), a conv reading it (unless `read` is
    False: torch's conv fails on an empty map, its mean does not), the mean."""

    def __init__(self, pads, value=None, read: bool = True):
        super().__init__()
        self.conv, self.pads, self.value = nn.Conv2d(2, 4, 3), pads, value
        self.pad = nn.ZeroPad2d(pads) if value is None else None
        self.after, self.fc = nn.Conv2d(4, 4, 1) if read else nn.Identity(), nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        x = self.pad(x) if self.pad is not None else F.pad(x, self.pads, value=self.value)
        return self.fc(self.after(x).mean((2, 3)))


@pytest.mark.parametrize("pads, value, out", [((-1, 1, -1, 1), None, [4, 6, 6]), ((-2, 0, -1, -3), None, [4, 2, 4]),
                                              ((1, -2, 0, -1), 2.5, [4, 5, 5]), ((0, 0, -5, 0), 0.0, [4, 1, 6])])
def test_cropping_pad_parity(pads, value, out):
    """torch's negative padding crops; the spec's pad node does the same in torch and in ONNX Runtime's Pad."""
    torch.manual_seed(0)
    module = _Crop(pads, value).eval()
    spec = from_torch(module, (2, 8, 8))
    check_parity(module, spec, (2, 8, 8))
    node = next(n for n in spec["nodes"] if n["op"] == "pad")
    left, right, top, bottom = pads
    assert node["pads"] == [top, left, bottom, right] and node_shapes(spec)[node["name"]] == out


def test_a_crop_keeps_a_constant_channel_and_compacts():
    """A crop adds no border: a dead channel stays constant through it (and folds away); a shift's zero row does not
    keep a constant ≠ 0."""
    for pads, constant in (((-1, 0, -2, 0), True), ((-1, 1, -1, 1), False)):
        spec = from_torch(_Crop(pads).eval(), (2, 8, 8))
        params = to_numpy(init_params(spec, 2, torch.Generator().manual_seed(0)))
        params["conv.weight"][1], params["conv.bias"][1] = 0, 1.5
        pad = next(n["name"] for n in spec["nodes"] if n["op"] == "pad")
        values = channel_constants(spec, params, channel_map(spec))[pad]
        assert bool(values[1] == 1.5) is constant and np.isnan(values[[0, 2, 3]]).all()
        small, kept, _ = compact_task(spec, params, channel_multiple=1)
        assert node_by_name(small)["after"]["in"] == (3 if constant else 4)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 2, 8, 8)).astype(np.float32))
        with torch.no_grad():
            dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
        assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5


@pytest.mark.parametrize("pads, value, message", [
    ((-3, -3, 0, 0), None, r"pad \[0, -3, 0, -3\] \(top, left, bottom, right\) crops the whole 6×6 map away"),
    ((0, 0, -6, 1), None, r"crops the whole 6×6 map away"),
    ((-1, 0, 0, 0), float("-inf"), r"crops \(negative sides\) with mode 'constant' and value -inf")])
def test_crops_refused_by_name(pads, value, message):
    with pytest.raises(UsageError, match=r"test_small_forms.py:\d+.*" + message):
        from_torch(_Crop(pads, value, read=False).eval(), (2, 8, 8))


@pytest.mark.parametrize("pads, mode, message", [
    ([0, -6, 0, 1], "constant", r"node 0 \(p\): pad \[0, -6, 0, 1\] .* crops the whole 6×6 map away"),
    ([-1, 0, 0, 0], "reflect", r"node 0 \(p\): pad \[-1, 0, 0, 0\] crops \(negative sides\) with mode 'reflect'"),
    ([-1, 0, 2 ** 40, 0], "constant", r"node 0 \(p\): pads .* four ints")])
def test_cropping_specs_refused_by_field(pads, mode, message):
    spec = {"name": "c", "input_shape": [2, 6, 6], "nodes": [
        {"name": "p", "op": "pad", "inputs": ["input"], "pads": pads, "mode": mode},
        {"name": "f", "op": "flatten", "inputs": ["p"]}]}
    with pytest.raises(UsageError, match=message):
        validate(spec)
