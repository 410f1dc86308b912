"""MobileNetV5 (timm's ``mobilenetv5_*``, Gemma 3n's vision encoder) through `from_torch`: timm's RmsNorm2d and
RmsNormAct2d as a ``layer_norm`` with ``rms`` (against timm's module, torch = ONNX, on maps and features, with and
without its weight), the field's validation and stored form (left out at false), its channels pinned, the
multi-query attention whose keys and values an RmsNorm2d normalises, the multi-scale fusion adapter (nearest
up-sampling, concat, average pooling or bilinear resizing to its output resolution), small MobileNetV5s with module
parity, refusals by name, and the library's mobilenetv5_base and mobilenetv5_300m at 64×64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets_mnv5 import GraphMNv5, timm, tiny_mnv5
from random_weights import random_params
from timm.layers import RmsNorm2d, RmsNorm2dFp32, RmsNormAct2d, RmsNormAct2dFp32
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, randomised_parity, spec_logits

from edgecl.arch import from_torch, validate
from edgecl.arch.channels import channel_map
from edgecl.arch.later_fields import stored_form
from edgecl.errors import UsageError
from edgecl.train.models import forward, from_numpy


def _spec(shape=(8, 4, 5), **norm) -> dict:
    """A conv, then a ``layer_norm`` with `norm`'s fields (an RMSNorm by default), flattened."""
    fields = {"rms": True, "bias": False, **norm}
    return {"name": "r", "input_shape": list(shape), "output": "f", "nodes": [
        {"name": "x", "op": "conv", "inputs": ["input"], "in": shape[0], "out": 8, "k": 1},
        {"name": "n", "op": "layer_norm", "inputs": ["x"], "ch": 8, "eps": 1e-6, **fields},
        {"name": "f", "op": "flatten", "inputs": ["n"]}]}


@pytest.mark.parametrize("affine", [True, False])
def test_rms_layer_norm_is_timms_rms_norm2d(affine):
    """The spec's torch forward and its ONNX graph against timm's RmsNorm2d (a random weight, or none) on a map of
    channels of different scales and means (a mean subtracted, or a bias added, would show)."""
    norm = RmsNorm2d(8, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(-1.5, 1.5)
    spec = validate({"name": "r", "input_shape": [8, 4, 5], "output": "f", "nodes": [
        {"name": "n", "op": "layer_norm", "inputs": ["input"], "ch": 8, "eps": 1e-6, "rms": True, "affine": affine,
         **({"bias": False} if affine else {})},
        {"name": "f", "op": "flatten", "inputs": ["n"]}]})
    weights = {**random_params(spec, 3, 0), **({"n.weight": norm.weight.detach().numpy()} if affine else {})}
    x = torch.randn(2, 8, 4, 5) * torch.arange(1.0, 9.0).reshape(1, 8, 1, 1) + 2
    with torch.no_grad():
        got = forward(spec, from_numpy(weights), x, head=False).numpy()
        assert np.abs(got - norm(x).reshape(2, -1).numpy()).max() < 1e-5
    spec_logits(spec, weights, x)


def test_rms_layer_norm_of_features_is_torchs_rms_norm():
    """On (N, C) features: torch's F.rms_norm over the channels, in the spec's torch forward and its ONNX graph."""
    spec = validate({"name": "r", "input_shape": [8], "output": "n", "nodes": [
        {"name": "n", "op": "layer_norm", "inputs": ["input"], "ch": 8, "eps": 1e-6, "rms": True, "bias": False}]})
    weights = random_params(spec, 3, 1)
    x = torch.randn(5, 8) * 3 + 1
    with torch.no_grad():
        got = forward(spec, from_numpy(weights), x, head=False).numpy()
        want = torch.nn.functional.rms_norm(x, (8,), torch.from_numpy(weights["n.weight"]), 1e-6).numpy()
    assert np.abs(got - want).max() < 1e-5
    spec_logits(spec, weights, x)


def test_rms_validates_stores_and_refuses():
    plain = validate(_spec(rms=False, bias=True))
    assert "rms" not in plain["nodes"][1] and validate({**_spec(), "nodes": [
        *_spec()["nodes"][:1], {**_spec(rms=False, bias=True)["nodes"][1]}, _spec()["nodes"][2]]}) == plain
    rms = validate(_spec())
    assert rms["nodes"][1]["rms"] is True and stored_form(rms)["nodes"][1]["rms"] is True
    assert validate(stored_form(rms)) == rms
    assert "x" in channel_map(rms).pinned  # every channel enters each position's mean of squares
    for bad, words in [(dict(bias=True), "without a bias"), (dict(over="map"), "over the channels"),
                       (dict(over="map", groups=2), "over the channels"), (dict(rms=1), "rms"),
                       (dict(rms="yes"), "rms")]:
        with pytest.raises(UsageError, match=words):
            validate(_spec(**bad))


def test_graph_mnv5_goes_in_with_parity():
    """MobileNetV5's layers at 8×8: the RMSNorms (with GELU: RmsNormAct2d), the attention's key/value RmsNorm2d after
    its strided depthwise conv, the MSFA's nearest ×2, concat and bilinear ×2."""
    spec = randomised_parity(GraphMNv5(), (1, 8, 8))
    nodes = {n["name"]: n for n in spec["nodes"]}
    assert nodes["stem.bn"]["rms"] and nodes["stem.bn.act"]["op"] == "gelu"
    assert nodes["attn.attn.key.norm"]["rms"] and nodes["attn.attn.key.norm"]["inputs"] == ["attn.attn.key.down_conv"]
    assert nodes["attn.attn.attend"]["kv_heads"] == 1
    assert [(n["mode"], n["scale"]) for n in spec["nodes"] if n["op"] == "upsample"] == [("nearest", [2, 2]),
                                                                                        ("bilinear", [2, 2])]
    assert all(n.get("rms") for n in spec["nodes"] if n["op"] == "layer_norm")


@pytest.mark.parametrize("resolution, resize", [(2, "avgpool"), (8, "upsample"), (4, None)])
def test_tiny_mobilenetv5_goes_in_with_parity(resolution, resize):
    """timm's MobileNetV5 class, small, at 64×64: its MSFA pools (2), resizes bilinearly (8) or keeps (4) the fused
    4×4 map."""
    spec = randomised_parity(tiny_mnv5(msfa_output_resolution=resolution), (3, 64, 64))
    after = spec["nodes"][[n["name"] for n in spec["nodes"]].index("msfa.ffn.pw_proj.bn") + 1]
    assert after["op"] == (resize or "layer_norm")


def test_tensorflow_same_padding_in_the_attention_goes_in_with_parity():
    """``pad_type="same"`` (mobilenetv5_300m_enc's): the attention's strided key/value convs are timm's Conv2dSame,
    which pads an even map by one row and column at the bottom and right only; a pad node before each, parity."""
    net = tiny_mnv5(pad_type="same")
    assert type(net.blocks[2][1].attn.key.down_conv).__name__ == "Conv2dSame"
    spec = randomised_parity(net, (3, 64, 64))
    pads = {n["name"]: n["pads"] for n in spec["nodes"] if n["op"] == "pad"}
    assert pads["blocks.2.1.attn.key.down_conv.same_pad"] == pads["blocks.2.1.attn.value.down_conv.same_pad"] == \
        [0, 0, 1, 1]


class _Edited(nn.Module):
    """A conv and an RMSNorm (`norm`) of 8 channels, then pooled features."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 8, 3), norm, nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


def _with(norm: nn.Module, **attrs) -> nn.Module:
    for k, v in attrs.items():
        setattr(norm, k, v)
    return _Edited(norm)


@pytest.mark.parametrize("make, act", [(lambda: RmsNorm2d(8), None), (lambda: RmsNorm2dFp32(8), None),
                                       (lambda: RmsNormAct2d(8, act_layer=nn.SiLU), "silu"),
                                       (lambda: RmsNormAct2dFp32(8, act_layer=nn.GELU), "gelu"),
                                       (lambda: RmsNorm2d(8, eps=1e-3, affine=False), None)])
def test_each_rms_norm_class_goes_in_with_parity(make, act):
    """timm's four RMSNorm classes of a map (the Fp32 forms compute in float32, as edgecl does), their eps and a norm
    without weight: one ``layer_norm`` {rms}, then the activation."""
    net = _Edited(make())
    spec = randomised_parity(net, (3, 8, 8))
    norm = next(n for n in spec["nodes"] if n["op"] == "layer_norm")
    assert norm["rms"] and norm["eps"] == net.norm.eps and norm["affine"] == (net.norm.weight is not None)
    assert spec["nodes"][spec["nodes"].index(norm) + 1]["op"] == (act or "gap")


@pytest.mark.parametrize("make, words", [
    (lambda: _with(RmsNormAct2d(8, act_layer=nn.Mish)), r"RmsNormAct2d at 'norm'.*activation Mish at 'norm.act'"),
    (lambda: _with(RmsNormAct2d(8), drop=nn.ReLU()), r"RmsNormAct2d at 'norm'.*drop is a ReLU, not a dropout"),
    (lambda: _with(RmsNorm2d(8), normalized_shape=(4,)), r"RmsNorm2d at 'norm'.*normalises over \(4,\)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), RmsNorm2d(288)), r"needs a \(channels, height, width\)"),
])
def test_rms_norms_edgecl_does_not_compute_are_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words):
        from_torch(make().eval(), (3, 8, 8))


def test_a_hooked_rms_norm_is_refused():
    net = _Edited(RmsNorm2d(8))
    net.norm.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(UsageError, match=r"RmsNorm2d at 'norm' has 1 forward hook"):
        from_torch(net.eval(), (3, 8, 8))


def test_an_attention_key_norm_of_another_kind_is_refused():
    net = GraphMNv5()
    net.attn.attn.key.norm = nn.GroupNorm(1, 8)
    with pytest.raises(UsageError, match=r"'attn.attn.key.norm' is a GroupNorm; edgecl converts a BatchNorm2d or "
                                         r"timm's RmsNorm2d there"):
        from_torch(net.eval(), (1, 8, 8))


@pytest.mark.parametrize("side, resolution, words", [
    (80, 2, r"mobilenetv5.py:\d+: img = F.interpolate\(img, size=high_resolution.*\[24, 3, 3\] to \[24, 5, 5\]; only "
            "by integer factors"),
    (64, 3, r"F.interpolate\(img, size=self.output_resolution.*\[32, 4, 4\] to \[32, 3, 3\]"),
])
def test_msfa_resizing_by_no_integer_factor_is_refused(side, resolution, words):
    """The MSFA's nearest resize of a 3×3 map to 5×5 (an 80×80 input) and a bilinear 4×4 → 3×3 are other networks
    than an integer up-sampling: refused, with timm's source line."""
    with pytest.raises(UsageError, match=words):
        from_torch(tiny_mnv5(msfa_output_resolution=resolution).eval(), (3, side, side))


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes", [("mobilenetv5_base", 320), ("mobilenetv5_300m", 721)])
def test_library_mobilenetv5_goes_in_with_parity_at_64(name, nodes):
    """The library's models at 64×64 (its MSFA resizes the 4×4 map bilinearly ×4 to its 16×16), every RMSNorm weight
    and layer scale drawn at random; mobilenetv5_300m's parity takes about 45 s and 7.6 GB of memory."""
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=10).eval()
    randomise_batchnorm(net)
    spec = from_torch(net, (3, 64, 64))
    assert len(spec["nodes"]) == nodes
    check_parity(net, spec, (3, 64, 64), batch=2)
