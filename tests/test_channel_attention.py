"""EdgeNeXt's SDTA block through `from_torch`: the ``channel_attention`` op's torch form against timm's
CrossCovarianceAttn, the ``fourier_pos`` grid against timm's PositionalEncodingFourier, torch = ONNX on random specs,
the ops' validation, channel map, bounds and stored form, small SplitTransposeBlock variants (scales, heads, with and
without the position grid) against the module, refusals by name, and timm's edgenext_xx_small and
edgenext_x_small at 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from linear_nets import TinyEdgeNeXt
from random_weights import random_params
from torch_nets import check_parity, randomise_batchnorm, spec_logits, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.channels import channel_map
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.arch.op_shapes import intermediates
from edgecl.arch.sdta_ops import fourier_grid
from edgecl.arch.spec import node_shapes, rowless_tensors
from edgecl.errors import UsageError
from edgecl.train.attention_forms import channel_attention
from edgecl.train.models import init_params

XCA = timm.models.edgenext.CrossCovarianceAttn
Fourier = timm.models.edgenext.PositionalEncodingFourier


def _spec(heads: int = 2, shape=(2, 4, 6), hidden: int | None = None, **fields) -> dict:
    """q, k, v 1×1 convs of one map (4 channels per head), their channel attention; with `hidden`, a Fourier grid
    through a 1×1 conv added to it."""
    c = 4 * heads
    nodes = [{"name": n, "op": "conv", "inputs": ["input"], "in": shape[0], "out": c, "k": 1} for n in "qkv"]
    nodes.append({"name": "a", "op": "channel_attention", "inputs": ["q", "k", "v"], "heads": heads, **fields})
    if hidden:
        nodes += [{"name": "g", "op": "fourier_pos", "inputs": ["a"], "hidden": hidden},
                  {"name": "p", "op": "conv", "inputs": ["g"], "in": 2 * hidden, "out": c, "k": 1},
                  {"name": "s", "op": "add", "inputs": ["a", "p"]}]
    nodes.append({"name": "f", "op": "flatten", "inputs": [nodes[-1]["name"]]})
    return {"name": "x", "input_shape": list(shape), "output": "f", "nodes": nodes}



@pytest.mark.parametrize("heads, d", [(1, 4), (2, 3), (4, 2)])
def test_torch_form_is_timms_cross_covariance_attention(heads, d):
    """timm's forward on (B, N, C) tokens with an identity qkv (q = k = v = the tokens' three blocks) and proj,
    against the op's torch form on the channels-first map; random temperatures per head."""
    c, g = heads * d, torch.Generator().manual_seed(heads)
    xca = XCA(c, num_heads=heads).eval()
    with torch.no_grad():
        xca.qkv.weight.copy_(torch.eye(c).repeat(3, 1) * torch.rand(3 * c, 1, generator=g))
        xca.proj.weight.copy_(torch.eye(c))
        xca.proj.bias.zero_()
        xca.temperature.copy_(torch.rand(heads, 1, 1, generator=g) * 3)
    x = torch.randn(2, c, 3, 5, generator=g)
    want = xca(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    scale = xca.qkv.weight.sum(1).reshape(3, c, 1, 1)
    got = channel_attention(x * scale[0], x * scale[1], x * scale[2], xca.temperature.detach().reshape(-1), 1e-12)
    assert torch.allclose(got, want, atol=1e-5)
    if heads > 1:  # the heads are contiguous blocks with their own temperatures: one head is another network
        one = channel_attention(x * scale[0], x * scale[1], x * scale[2], torch.ones(1), 1e-12)
        assert not torch.allclose(got, one, atol=1e-3)


@pytest.mark.parametrize("hidden, temperature, side", [(32, 10000.0, (4, 4)), (8, 100.0, (3, 7)), (2, 10.0, (1, 5))])
def test_fourier_grid_is_timms_encoding(hidden, temperature, side):
    """timm's PositionalEncodingFourier with an identity projection is the grid, to float32 rounding."""
    pos = Fourier(hidden_dim=hidden, dim=2 * hidden, temperature=temperature).eval()
    with torch.no_grad():
        pos.token_projection.weight.copy_(torch.eye(2 * hidden).reshape(2 * hidden, 2 * hidden, 1, 1))
        pos.token_projection.bias.zero_()
        want = pos((1, *side))[0].numpy()
    grid = fourier_grid(hidden, temperature, *side)
    assert grid.dtype == np.float32 and grid.shape == (2 * hidden, *side)
    assert np.abs(grid - want).max() <= 1e-6


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_channel_attention_torch_equals_onnx(data):
    """Random heads, maps, eps, temperatures and (sometimes) a Fourier grid added: torch = ONNX, finite."""
    heads = data.draw(st.sampled_from([1, 2, 3]))
    shape = (2, data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
    hidden = data.draw(st.sampled_from([None, 2, 4]))
    spec = validate(_spec(heads, shape, hidden, eps=data.draw(st.sampled_from([1e-12, 1e-3]))))
    got = spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, *shape))
    assert np.isfinite(got).all()


def test_fields_shapes_bounds_state_and_channel_map():
    spec = validate(_spec(hidden=4))
    node = spec["nodes"][3]
    assert node["eps"] == 1e-12 and node_shapes(spec)["a"] == [8, 4, 6] and node_shapes(spec)["g"] == [8, 4, 6]
    assert intermediates(node, [[8, 4, 6]] * 3) == 8 * 8 * 24 + 2 * 8 + 3 * 8 * 4
    assert intermediates(spec["nodes"][4], [[8, 4, 6]]) == 2 * 8 * 24
    stored = stored_form(spec)["nodes"]
    assert stored[3] == {"name": "a", "op": "channel_attention", "inputs": ["q", "k", "v"], "heads": 2, "eps": 1e-12}
    assert stored[4] == {"name": "g", "op": "fourier_pos", "inputs": ["a"], "hidden": 4, "temperature": 10000.0}
    assert "g.weight" not in random_params(spec)  # the grid is a function of the map's shape, never a tensor
    assert rowless_tensors(spec) == ["a.temperature"]  # per task in every method that shares a trunk
    assert state_keys(spec)["a.temperature"] == "a.temperature" and state_shapes(spec)["a.temperature"] == (2, 1, 1)
    assert (init_params(spec)["a.temperature"] == 1).all()  # timm's start
    cm = channel_map(spec)
    groups = [{g for g, _ in cm.spaces[n]} for n in "qkv"]
    assert groups[0] == groups[1] == groups[2] and groups[0] <= cm.pinned and groups[0] <= cm.ordered
    assert cm.spaces["a"] == [("a", 1)] and "a" in cm.pinned  # its output mixes a head's v channels: its own
    assert cm.spaces["g"] == [("g", 1)] and "g" in cm.pinned  # the grid: its own channels, never cut
    for bad, words in [(dict(eps=0), r"number in \(0, 1\)"), (dict(hidden=600), "hidden at most 512"),
                       (dict(eps=1e-300), "at least 1.18e-38")]:  # float32's 0: a zero q channel's 0 / 0 was NaN
        with pytest.raises(UsageError, match=words):
            validate(_spec(**bad))
    for temperature in (0.0, -1.0, 1e-300):  # were accepted: a grid of NaN or inf, and every output with it
        hostile = _spec(hidden=4)
        hostile["nodes"][4]["temperature"] = temperature
        with pytest.raises(UsageError, match="node 4 \\(g\\): fourier_pos temperature=.* not finite"):
            validate(hostile)
    for field, value, words in [("heads", 3, "whose channels 3 heads divide"),
                                ("inputs", ["q", "k", "input"], "of one shape")]:
        wrong = _spec()
        wrong["nodes"][3][field] = value
        with pytest.raises(UsageError, match=words):
            validate(wrong)


@pytest.mark.parametrize("kwargs", [
    {},  # three parts (two hierarchical convs), the grid, 2 heads
    {"scales": 4, "heads": 4},  # four parts of 4 (three hierarchical convs), 4 heads
    {"scales": 2, "heads": 1, "pos": False},  # two parts, no grid, one head
    {"width": 20, "scales": 3},  # parts of 7, 7, 6 channels (torch's chunk)
    {"heads": 8},  # heads of 2 channels
])
def test_sdta_block_parity(kwargs):
    torch.manual_seed(0)
    module = TinyEdgeNeXt(in_channels=3, **kwargs).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    attends = [n["heads"] for n in spec["nodes"] if n["op"] == "channel_attention"]
    assert attends == [kwargs.get("heads", 2)]
    assert any(n["op"] == "fourier_pos" for n in spec["nodes"]) == kwargs.get("pos", True)
    assert sum(n["op"] == "layer_scale" for n in spec["nodes"]) == 2  # gamma_xca and gamma
    check_parity(module, spec, (3, 8, 8))


def _edited(edit) -> nn.Module:
    module = TinyEdgeNeXt(in_channels=3)
    edit(module.block)
    return module.eval()


@pytest.mark.parametrize("make, words", [
    (lambda: _edited(lambda m: setattr(m, "xca", nn.Identity())), "its xca is a Identity"),
    (lambda: _edited(lambda m: setattr(m.mlp, "norm", nn.LayerNorm(32))), "its mlp has a LayerNorm norm"),
    (lambda: _edited(lambda m: setattr(m.xca, "attn_drop", nn.ReLU())), "attn_drop is a ReLU"),
    (lambda: _edited(lambda m: setattr(m.pos_embd, "scale", 1.0)), "PositionalEncodingFourier"),
    (lambda: _edited(lambda m: setattr(m, "norm_xca", nn.RMSNorm(16))), "'block.norm_xca' is a RMSNorm"),
    # raw AttributeErrors before: a conv, the temperature, a layer scale or the mlp that is not timm's kind
    (lambda: _edited(lambda m: m.convs.__setitem__(0, nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6)))),
     "its convs.0 is a Sequential"),
    (lambda: _edited(lambda m: m.convs.__setitem__(1, nn.Identity())), "its convs.1 is a Identity"),
    (lambda: _edited(lambda m: (delattr(m.xca, "temperature"), setattr(m.xca, "temperature", 1.0))),
     "a temperature of float"),
    (lambda: _edited(lambda m: (delattr(m, "gamma"), setattr(m, "gamma", 0.5))), "its gamma is a float"),
    (lambda: _edited(lambda m: setattr(m, "mlp", nn.Identity())), "its mlp is a Identity"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), (3, 8, 8))
    assert "SplitTransposeBlock at 'block'" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes", [("edgenext_xx_small", 143), ("edgenext_x_small", 185)])
def test_timm_edgenext_at_64(name, nodes):
    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval()
    spec = from_torch(module, (3, 64, 64))
    assert len(spec["nodes"]) == nodes
    assert sum(n["op"] == "fourier_pos" for n in spec["nodes"]) == 1  # stage 2's first SDTA block, as timm's
    randomise_batchnorm(module)
    check_parity(module, spec, (3, 64, 64), batch=2)
