"""MobileViTv2 through `from_torch`: ``attention_pool`` with ``patch`` (the context vector at each patch offset)
against timm's LinearSelfAttention on the unfolded map, ``layer_norm`` over the whole map against GroupNorm1, torch =
ONNX on random specs, the fields' validation and stored form, timm's MobileVitV2Block against the spec (depths, maps,
patches), refusals by name, and the full mobilevitv2_050 at 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from linear_nets import TinyMobileViTv2
from random_weights import random_params
from torch_nets import check_parity, randomise_batchnorm, spec_logits, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.later_fields import stored_form
from edgecl.arch.op_shapes import intermediates
from edgecl.arch.spec import node_shapes
from edgecl.errors import UsageError
from edgecl.train.attention_forms import patch_context
from edgecl.train.models import forward, from_numpy

mobilevit = timm.models.mobilevit


def _spec(shape=(2, 4, 6), patch=None, over=None, ch: int = 3) -> dict:
    pool = {"patch": patch} if patch is not None else {}
    norm = {"over": over} if over is not None else {}
    return {"name": "m", "input_shape": list(shape), "output": "f", "nodes": [
        {"name": "x", "op": "conv", "inputs": ["input"], "in": shape[0], "out": ch, "k": 1},
        {"name": "n", "op": "layer_norm", "inputs": ["x"], "ch": ch, **norm},
        {"name": "q", "op": "conv", "inputs": ["n"], "in": ch, "out": 1, "k": 1},
        {"name": "p", "op": "attention_pool", "inputs": ["n", "q"], **pool},
        {"name": "f", "op": "flatten", "inputs": ["p"]}]}



@pytest.mark.parametrize("patch", [[2, 2], [2, 3], [1, 1], [4, 6]])
def test_patch_context_is_timms_context_vector(patch):
    """timm's LinearSelfAttention (unfolded as MobileVitV2Block unfolds) gives relu(value) · context; the op's
    context times relu(value) on the map, folded back, is the same."""
    g = torch.Generator().manual_seed(sum(patch))
    attn = mobilevit.LinearSelfAttention(3).eval()
    x = torch.randn(2, 3, 4, 6, generator=g)
    (ph, pw), nh, nw = patch, 4 // patch[0], 6 // patch[1]
    unfolded = x.reshape(2, 3, nh, ph, nw, pw).permute(0, 1, 3, 5, 2, 4).reshape(2, 3, ph * pw, nh * nw)
    with torch.no_grad():
        want = attn(unfolded).reshape(2, 3, ph, pw, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(2, 3, 4, 6)
        q, k, v = attn.qkv_proj(x).split([1, 3, 3], dim=1)
        got = attn.out_proj(torch.relu(v) * patch_context(k, q, patch))
    assert torch.allclose(got, want, atol=1e-5)
    if patch != [1, 1]:  # 1×1 patches: one context for the whole map (GCNet's pool), another network
        with torch.no_grad():
            whole = attn.out_proj(torch.relu(v) * patch_context(k, q, [1, 1]))
        assert not torch.allclose(whole, want, atol=1e-3)


def test_map_norm_is_group_norm1():
    norm = timm.layers.GroupNorm1(3, eps=1e-5)
    randomise_batchnorm(norm)
    spec = validate({"name": "g", "input_shape": [3, 4, 5], "output": "f", "nodes": [
        {"name": "n", "op": "layer_norm", "inputs": ["input"], "ch": 3, "over": "map"},
        {"name": "f", "op": "flatten", "inputs": ["n"]}]})
    x = torch.randn(2, 3, 4, 5) * 3 + 1
    weights = {"n.weight": norm.weight.detach().numpy(), "n.bias": norm.bias.detach().numpy(),
               **random_params(spec, 3, 0)}
    weights.update({k: norm.state_dict()[k.split(".")[1]].numpy() for k in ("n.weight", "n.bias")})
    with torch.no_grad():
        assert np.abs(forward(spec, from_numpy(weights), x, head=False).numpy() - norm(x).reshape(2, -1).numpy()
                      ).max() < 1e-5
    spec_logits(spec, weights, x)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_patch_context_and_map_norm_torch_equals_onnx(data):
    height, width = data.draw(st.sampled_from([1, 2, 4, 6])), data.draw(st.sampled_from([1, 3, 4]))
    patch = [data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in (height, width)]
    spec = validate(_spec((2, height, width), patch, data.draw(st.sampled_from(["map", "channels"]))))
    spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, 2, height, width) * 2)


def test_fields_validate_store_and_bound():
    plain = validate(_spec())
    assert "patch" not in plain["nodes"][3] and "over" not in plain["nodes"][1]  # as before MobileViTv2
    assert validate(_spec(patch=None, over="channels")) == plain and node_shapes(plain)["p"] == [3, 1, 1]
    spec = validate(_spec(patch=[2, 3], over="map"))
    assert node_shapes(spec)["p"] == [3, 4, 6] and validate(stored_form(spec)) == spec
    assert stored_form(spec)["nodes"][3]["patch"] == [2, 3] and stored_form(spec)["nodes"][1]["over"] == "map"
    pool, norm = spec["nodes"][3], spec["nodes"][1]
    assert intermediates(pool, [[3, 4, 6], [1, 4, 6]]) == 2 * 24 + 3 * 72 > intermediates(plain["nodes"][3],
                                                                                         [[3, 4, 6], [1, 4, 6]])
    assert intermediates(norm, [[3, 4, 6]]) == 4 * 72 and intermediates(plain["nodes"][1], [[3, 4, 6]]) == 0
    for bad, words in [(dict(patch=[3, 3]), "patches that tile the map"), (dict(over="groups"), "'channels' or 'map'"),
                       (dict(patch=0), "an int ≥ 1")]:
        with pytest.raises(UsageError, match=words):
            validate(_spec(**bad))
    with pytest.raises(UsageError, match="layer_norm has 4 channels of a map"):
        validate({"name": "v", "input_shape": [4], "nodes": [
            {"name": "n", "op": "layer_norm", "inputs": ["input"], "ch": 4, "over": "map"}]})


class _Net(nn.Module):
    def __init__(self, patch: int = 2, depth: int = 2, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = mobilevit.MobileVitV2Block(width, 12, patch_size=patch, transformer_depth=depth)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("patch, depth, shape", [(2, 2, (3, 8, 8)), (2, 1, (3, 4, 6)), (4, 1, (3, 8, 4)),
                                                 (1, 1, (3, 3, 5))])
def test_mobilevit2_block_parity(patch, depth, shape):
    module = _Net(patch, depth).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, shape)
    pools = [n["patch"] for n in spec["nodes"] if n["op"] == "attention_pool"]
    assert pools == [[patch, patch]] * depth
    assert sum(n.get("over") == "map" for n in spec["nodes"] if n["op"] == "layer_norm") == 2 * depth + 1
    check_parity(module, spec, shape)


def test_tiny_mobilevit2_parity():
    module = TinyMobileViTv2(in_channels=3).eval()
    randomise_batchnorm(module)
    check_parity(module, from_torch(module, (3, 8, 8)), (3, 8, 8))


def _edited(edit) -> nn.Module:
    module = _Net(2, 1)
    edit(module.block)
    return module.eval()


@pytest.mark.parametrize("make, words", [
    (lambda: _edited(lambda b: setattr(b.transformer[0], "norm1", nn.GroupNorm(2, 8))), "GroupNorm of 2 groups"),
    (lambda: _edited(lambda b: setattr(b, "norm", nn.BatchNorm2d(8))), "'block.norm' is a BatchNorm2d"),
    (lambda: _edited(lambda b: setattr(b.transformer[0], "attn", nn.Identity())), "is a LinearTransformerBlock"),
    (lambda: _edited(lambda b: setattr(b.transformer[0].attn, "attn_drop", nn.ReLU())), "attn_drop is a ReLU"),
    (lambda: _edited(lambda b: setattr(b, "conv_1x1", nn.Sequential(nn.Conv2d(8, 8, 1)))), "conv_1x1' is a Sequential"),
    (lambda: _Net(3, 1), "3×3 patches do not tile the 8×8 map"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), (3, 8, 8))
    assert "MobileVitV2Block at 'block'" in str(info.value)


@pytest.mark.slow
def test_timm_mobilevitv2_050_at_64():
    module = timm.create_model("mobilevitv2_050", pretrained=False).eval()
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    patches = {tuple(n["patch"]) for n in spec["nodes"] if n["op"] == "attention_pool"}
    assert patches == {(2, 2)} and sum(n["op"] == "attention_pool" for n in spec["nodes"]) == 2 + 4 + 3
