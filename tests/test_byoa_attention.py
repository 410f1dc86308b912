"""timm's attention ResNets ("bring your own attention", byobnet) through `from_torch`: BotNet's BottleneckAttn as an
``attention`` with relative position logits (`edgecl.arch.rel_pos`), HaloNet's HaloAttn as one over blocks and
haloed windows (`edgecl.arch.halo`) and the relative position LambdaLayer (``r=None``) as a ``lambda_layer`` with
``rel_pos``: the torch forms against timm's, torch = ONNX on random specs, the fields' validation, stored form,
state keys and channel map, small variants against the modules, refusals by name, and timm's BotNets, HaloNets and
lambda_resnet26rpt_256 (slow but botnet26t and lambda_resnet26rpt at 64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from byoa_nets import LambdaLayer, BottleneckAttn, HaloAttn, TinyBotNet, TinyHaloNet, deep_parity
from random_weights import random_params
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all, spec_logits, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.channels import channel_map
from edgecl.arch.halo import halo_index
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.arch.op_shapes import intermediates
from edgecl.arch.spec import rowless_tensors
from edgecl.errors import UsageError
from edgecl.train.halo_attention import halo_blocks
from edgecl.train.attention_forms import lambda_layer
from edgecl.train.rel_logits import rel_logits


def _spec(heads: int = 2, d: int = 3, dv: int = 4, shape=(2, 4, 5), **fields) -> dict:
    """q, k, v 1×1 convs of one map and their attention with relative position logits over it."""
    outs = {"q": heads * d, "k": heads * d, "v": heads * dv}
    nodes = [{"name": n, "op": "conv", "inputs": ["input"], "in": shape[0], "out": c, "k": 1} for n, c in outs.items()]
    nodes += [{"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": heads, "scale": 0.7,
               "rel_pos": list(shape[1:]), "rel_dim": d, **fields},
              {"name": "f", "op": "flatten", "inputs": ["a"]}]
    return {"name": "x", "input_shape": list(shape), "output": "f", "nodes": nodes}


@pytest.mark.parametrize("side", [(4, 4), (5, 3), (1, 6)])
def test_torch_form_is_timms_pos_embed_rel(side):
    """timm's PosEmbedRel (its pad-and-reshape trick) against the op's logits on the same q, the tables random."""
    layer = BottleneckAttn(8, 8, feat_size=side, num_heads=2, dim_head=3).eval()
    g = torch.Generator().manual_seed(sum(side))
    q = torch.randn(2, 6, *side, generator=g)  # (N, heads·d, H, W)
    timm_q = q.reshape(4, 3, -1).transpose(-1, -2)  # timm's (N·heads, H·W, d)
    node = {"heads": 2, "scale": 0.5, "rel_pos": list(side), "rel_dim": 3}
    with torch.no_grad():
        want = layer.pos_embed(timm_q).reshape(2, 2, side[0] * side[1], -1)
        got = rel_logits(q, node, layer.pos_embed.height_rel, layer.pos_embed.width_rel)
        scaled = rel_logits(q, {**node, "rel_scaled": True}, layer.pos_embed.height_rel, layer.pos_embed.width_rel)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(scaled, 0.5 * want, atol=1e-5)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_rel_pos_attention_torch_equals_onnx(data):
    """Random heads, depths and maps (one row or column too), scaled or not: torch = ONNX, finite."""
    shape = (2, data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
    spec = validate(_spec(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3)),
                          shape, rel_scaled=data.draw(st.booleans())))
    got = spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, *shape))
    assert np.isfinite(got).all()


def test_fields_shapes_bounds_state_and_channel_map():
    spec = validate(_spec())
    node = spec["nodes"][3]
    assert stored_form(spec)["nodes"][3] == {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2,
                                             "kv_heads": 2, "scale": 0.7, "rel_pos": [4, 5],
                                             "rel_dim": 3}  # rel_scaled false: left out
    assert stored_form(validate(_spec(rel_scaled=True)))["nodes"][3]["rel_scaled"] is True
    plain = _spec()
    for key in ("rel_pos", "rel_dim"):
        del plain["nodes"][3][key]
    assert "rel_pos" not in validate(plain)["nodes"][3] and not rowless_tensors(validate(plain))  # as before
    assert rowless_tensors(spec) == ["a.rel_h", "a.rel_w"]  # per task in every method that shares a trunk
    spec["nodes"][3]["module"] = "blocks.0.attn"
    spec = validate(spec)
    assert state_keys(spec)["a.rel_h"] == "blocks.0.attn.pos_embed.height_rel"
    assert state_keys(spec)["a.rel_w"] == "blocks.0.attn.pos_embed.width_rel"
    assert state_shapes(spec)["a.rel_h"] == (7, 3) and state_shapes(spec)["a.rel_w"] == (9, 3)
    t, plain_node = 20, validate(plain)["nodes"][3]
    ins = [[6, 4, 5], [6, 4, 5], [8, 4, 5]]
    extra = intermediates(node, ins) - intermediates(plain_node, ins)
    assert extra == 2 * 3 * t + (16 + 25) * 3 + 2 * t * 9 + 2 * t * t  # q, the tables, per-axis logits, their sum
    cm = channel_map(spec)
    for n in "qkv":
        assert {g for g, _ in cm.spaces[n]} <= cm.pinned & cm.ordered, n  # heads are blocks: nothing cut or moved


@pytest.mark.parametrize("fields, words", [
    ({"rel_dim": None}, "need rel_pos and rel_dim together"), ({"rel_pos": None}, "need rel_pos and rel_dim"),
    ({"rel_pos": None, "rel_dim": None, "rel_scaled": True}, "need rel_pos and rel_dim"),
    ({"rel_dim": 2}, "rel_dim 2 needs q"), ({"rel_pos": [4, 4]}, "needs q of 2 heads × 3 and q and k on a [4, 4] map"),
    ({"window": [2, 5]}, "needs q of 2 heads × 3 and windows of [2, 5]"),  # a window is the logits' extent (SAM)
    ({"window": [2, 5], "shift": [1, 1]}, "goes with no shifted or dilated window"),
    ({"talking_heads": True}, "goes with no shifted or dilated window, talking heads"),
    ({"bias_offsets": 1, "bias_index": [[0] * 20] * 20}, "bias table"),
    ({"rel_pos": 0}, "rel_pos = 0 must be"), ({"rel_pos": [4, 5, 1]}, "rel_pos"), ({"rel_dim": "3"}, "rel_dim"),
    ({"rel_dim": 0}, "rel_dim = 0 must be"), ({"rel_scaled": 1}, "rel_scaled = 1 must be true or false"),
])
def test_bad_fields_are_refused(fields, words):
    spec = _spec()
    for key, value in fields.items():
        if value is None:
            del spec["nodes"][3][key]
        else:
            spec["nodes"][3][key] = value
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("×", "×")):
        validate(spec)


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2}, {"heads": 2, "dim": 8, "scale_pos_embed": True},
                                    {"heads": 1, "side": (4, 4)}])
def test_tiny_botnet_parity(kwargs):
    torch.manual_seed(0)
    module = TinyBotNet(in_channels=3, **kwargs).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    attn = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["name"], n["heads"], n["rel_pos"], n.get("rel_scaled", False)) for n in attn] == [
        ("attn.attend", kwargs.get("heads", 4), [4, 4], kwargs.get("scale_pos_embed", False))]
    assert sum(n["op"] == "avgpool" for n in spec["nodes"]) == 2 * (kwargs.get("stride") == 2)
    check_parity(module, spec, (3, 8, 8))


class _Wide(nn.Module):
    """A BottleneckAttn on a 6 × 4 map with a qkv bias, all its weights random (a non-square map: rows and columns
    not swapped; q, k and v of other widths: dim_head 3, v 8 per head)."""

    def __init__(self, scale_pos_embed: bool = False, stride: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = BottleneckAttn(16, 24, feat_size=(6, 4), num_heads=3, dim_head=3, stride=stride, qkv_bias=True,
                                   scale_pos_embed=scale_pos_embed)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("scale_pos_embed, stride", [(False, 1), (True, 2)])
def test_non_square_map_parity(scale_pos_embed, stride):
    module = randomised_all(_Wide(scale_pos_embed, stride))
    check_parity(module, from_torch(module, (3, 6, 4)), (3, 6, 4))


def _edited(edit, stride: int = 1) -> nn.Module:
    module = TinyBotNet(in_channels=3, stride=stride)
    edit(module.attn)
    return module.eval()


class _Logits(nn.Module):
    """Absolute logits where timm's module has relative ones: the module runs, edgecl must not take it for
    PosEmbedRel."""

    def __init__(self):
        super().__init__()
        self.height, self.width = 4, 4
        self.table = nn.Parameter(torch.randn(16, 16))

    def forward(self, q):
        return self.table.expand(q.shape[0], -1, -1)


@pytest.mark.parametrize("make, words", [
    (lambda: _edited(lambda m: setattr(m, "pos_embed", _Logits())), "pos_embed is a _Logits"),
    (lambda: _edited(lambda m: setattr(m.pos_embed, "forward", lambda q: 0 * m.pos_embed.__class__.forward(
        m.pos_embed, q))), "a forward set on the instance"),
    (lambda: _edited(lambda m: setattr(m, "qkv", nn.Sequential(nn.Conv2d(16, 48, 1)))), "qkv is Sequential"),
    (lambda: _edited(lambda m: setattr(m, "pool", nn.MaxPool2d(2)), 2), "pool is a MaxPool2d"),
    (lambda: _edited(lambda m: setattr(m, "pool", nn.AvgPool2d(2, 2, divisor_override=3)), 2),
     "'attn.pool' is AvgPool2d"),
    (lambda: _edited(lambda m: m.pos_embed.register_forward_hook(lambda mod, i, o: 2 * o)), "1 forward hook"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), (3, 8, 8))
    assert "attn" in str(info.value)


def test_a_map_other_than_feat_size_is_refused():
    """timm asserts the map is its feat_size: the module does not run, refused naming the layer and the line."""
    assert_refused(TinyBotNet(in_channels=3), "does not run on inputs of shape (3, 12, 12)", "call_module attn",
                   "byoa_nets.py", input_shape=(3, 12, 12))


def test_timm_botnet26t_at_64():
    torch.manual_seed(0)
    module = timm.create_model("botnet26t_256", pretrained=False, img_size=64).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    attn = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["rel_pos"], n["heads"], n["rel_dim"]) for n in attn] == [([4, 4], 4, 64), ([4, 4], 4, 128),
                                                                        ([2, 2], 4, 128)]
    check_parity(module, spec, (3, 64, 64), batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, side", [("botnet26t_256", 256), ("sebotnet33ts_256", 64), ("botnet50ts_256", 64),
                                        ("eca_botnext26ts_256", 64)])
def test_timm_botnets(name, side):
    deep_parity(timm.create_model(name, pretrained=False, **({} if side == 256 else {"img_size": side})), side)


# -- HaloNet ----------------------------------------------------------------------------------------------------------
def _halo_spec(heads: int = 2, d: int = 3, dv: int = 4, shape=(2, 4, 6), blocks=(2, 2), halo: int = 1,
               stride: int = 1, rel: bool = True, **fields) -> dict:
    """q (strided by `stride`), k and v 1×1 convs of one map and their blocked attention with halos."""
    win = blocks[1] + 2 * halo
    nodes = [{"name": "q", "op": "conv", "inputs": ["input"], "in": shape[0], "out": heads * d, "k": 1,
              "stride": stride},
             {"name": "k", "op": "conv", "inputs": ["input"], "in": shape[0], "out": heads * d, "k": 1},
             {"name": "v", "op": "conv", "inputs": ["input"], "in": shape[0], "out": heads * dv, "k": 1},
             {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": heads, "scale": 0.7,
              "halo_blocks": list(blocks), "halo": halo,
              **({"rel_pos": [win, win], "rel_dim": d} if rel else {}), **fields},
             {"name": "f", "op": "flatten", "inputs": ["a"]}]
    return {"name": "x", "input_shape": list(shape), "output": "f", "nodes": nodes}


@pytest.mark.parametrize("height, width, block, halo", [(4, 6, 2, 1), (6, 6, 3, 2), (4, 4, 4, 0), (2, 4, 2, 3)])
def test_halo_windows_are_timms_unfold(height, width, block, halo):
    """The torch form's windows (timm's pad + unfold) and the ONNX form's constant index pick the same keys."""
    k = torch.arange(float(2 * height * width)).reshape(1, 2, height, width) + 1
    node = {"halo_blocks": [block, block], "halo": halo}
    _, windows, _ = halo_blocks(k, k, k, node)
    padded = torch.nn.functional.pad(k, [halo] * 4).reshape(1, 2, -1)
    gathered = padded[:, :, torch.from_numpy(halo_index(height, width, block, halo))]  # (1, 2, blocks, win²)
    assert torch.equal(windows.flatten(2), gathered.permute(0, 2, 1, 3).reshape(windows.shape[0], 2, -1))


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_halo_attention_torch_equals_onnx(data):
    """Random heads, blocks, halos, strided queries, with and without relative logits: torch = ONNX, finite."""
    bq, stride = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 2]))
    shape = (2, bq * stride * data.draw(st.integers(1, 3)), bq * stride * data.draw(st.integers(1, 2)))
    spec = validate(_halo_spec(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)),
                               data.draw(st.integers(1, 3)), shape, (bq, bq * stride), data.draw(st.integers(0, 3)),
                               stride, data.draw(st.booleans()), rel_scaled=False))
    got = spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, *shape))
    assert np.isfinite(got).all()


def test_halo_fields_stored_form_and_state():
    spec = validate(_halo_spec(module="blocks.0.attn"))
    assert {k: v for k, v in stored_form(spec)["nodes"][3].items() if k.startswith(("halo", "rel"))} == {
        "halo_blocks": [2, 2], "halo": 1, "rel_pos": [4, 4], "rel_dim": 3}
    assert state_keys(spec)["a.rel_h"] == "blocks.0.attn.pos_embed.height_rel"
    assert state_shapes(spec)["a.rel_w"] == (7, 3) and rowless_tensors(spec) == ["a.rel_h", "a.rel_w"]
    assert intermediates(spec["nodes"][3], [[6, 4, 6], [6, 4, 6], [8, 4, 6]]) > 3 * 2 * 24 * 16  # the scores


@pytest.mark.parametrize("fields, words", [
    ({"halo": None}, "halo_blocks [2, 2] and halo None go together"),
    ({"window": [2, 2]}, "halo goes with no window"),
    ({"talking_heads": True}, "goes with no shifted or dilated window, talking heads"),
    ({"halo_blocks": [3, 3]}, "in whole 3 × 3 blocks"), ({"halo_blocks": [2, 4]}, "as many 4 × 4 blocks"),
    ({"halo": 65, "rel_pos": [132, 132]}, "a halo of at most 64"), ({"halo": -1}, "halo = -1 must be"),
    ({"halo_blocks": [0, 2]}, "halo_blocks"), ({"rel_pos": [5, 5]}, "a haloed window of 4 × 4"),
])
def test_bad_halo_fields_are_refused(fields, words):
    spec = _halo_spec()
    for key, value in fields.items():
        if value is None:
            del spec["nodes"][3][key]
        else:
            spec["nodes"][3][key] = value
    with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("]", r"\]")):
        validate(spec)


def test_halo_scores_are_bounded():
    spec = _halo_spec(heads=1, d=1, dv=1, shape=(1, 512, 512), blocks=(64, 64), halo=64)
    with pytest.raises(UsageError, match="scores per sample"):
        validate(spec)


class _Halo(nn.Module):
    """A HaloAttn with a qkv bias on a non-square map, all its weights random."""

    def __init__(self, **kwargs):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = HaloAttn(16, 24, num_heads=3, dim_head=4, qkv_bias=True, **kwargs)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kwargs, shape", [
    ({"block_size": 4, "halo_size": 1}, (3, 12, 8)), ({"block_size": 4, "halo_size": 1, "stride": 2}, (3, 12, 8)),
    ({"block_size": 4, "halo_size": 1, "stride": 2, "avg_down": True}, (3, 12, 8)),
    ({"block_size": 3, "halo_size": 2, "scale_pos_embed": True}, (3, 6, 9)),
    ({"block_size": 4, "halo_size": 0}, (3, 12, 8)), ({"block_size": 3, "halo_size": 1, "stride": 2}, (3, 6, 9)),
])
def test_halo_attn_parity(kwargs, shape):
    """Strided queries (block 4, stride 2: q blocks of 2 over key blocks of 4), an average pool where the stride
    does not divide the block (3) or avg_down, a scaled position embedding, no halo."""
    module = randomised_all(_Halo(**kwargs))
    spec = from_torch(module, shape)
    attn = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert len(attn) == 1 and attn[0]["halo"] == kwargs["halo_size"]
    check_parity(module, spec, shape)


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2}, {"heads": 2, "dim": 8, "halo_size": 2}])
def test_tiny_halonet_parity(kwargs):
    torch.manual_seed(0)
    module = TinyHaloNet(in_channels=3, **kwargs).eval()
    randomise_batchnorm(module)
    check_parity(module, from_torch(module, (3, 8, 8)), (3, 8, 8))


def _edited_halo(edit) -> nn.Module:
    module = TinyHaloNet(in_channels=3)
    edit(module.attn)
    return module.eval()


@pytest.mark.parametrize("make, words", [
    (lambda: _edited_halo(lambda m: setattr(m, "kv", nn.Sequential(nn.Conv2d(16, 32, 1)))), "Sequential"),
    (lambda: _edited_halo(lambda m: setattr(m, "pool", nn.MaxPool2d(1))), "pool is a MaxPool2d"),
    (lambda: _edited_halo(lambda m: m.pos_embed.register_forward_pre_hook(lambda mod, i: i)), "forward pre-hook"),
])
def test_what_edgecl_does_not_follow_in_halo_attn_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), (3, 8, 8))
    assert "attn" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("name, side", [("halonet26t", 256), ("sehalonet33ts", 256), ("eca_halonext26ts", 256),
                                        ("halonet50ts", 256), ("haloregnetz_b", 224)])
def test_timm_halonets(name, side):
    deep_parity(timm.create_model(name, pretrained=False), side)


# -- the relative position lambda layer ----------------------------------------------------------------------------
def _lambda_spec(heads: int = 2, dim: int = 3, dv: int = 4, shape=(2, 4, 5), **fields) -> dict:
    """q, k, v 1×1 convs of one map and their lambda layer with a relative embedding over it."""
    outs = {"q": heads * dim, "k": dim, "v": dv}
    nodes = [{"name": n, "op": "conv", "inputs": ["input"], "in": shape[0], "out": c, "k": 1} for n, c in outs.items()]
    nodes += [{"name": "a", "op": "lambda_layer", "inputs": ["q", "k", "v"], "heads": heads, "dim": dim,
               "rel_pos": list(shape[1:]), **fields}, {"name": "f", "op": "flatten", "inputs": ["a"]}]
    return {"name": "x", "input_shape": list(shape), "output": "f", "nodes": nodes}


@pytest.mark.parametrize("heads, side", [(1, (4, 4)), (3, (5, 3)), (2, (1, 6))])
def test_torch_form_is_timms_relative_lambda_layer(heads, side):
    """timm's forward (``r=None``: pos_emb gathered by its rel_pos_indices) against the op's torch form on its q, k,
    v (the qkv conv's three blocks, q and v through the module's BatchNorms, their statistics random)."""
    g = torch.Generator().manual_seed(heads)
    layer = LambdaLayer(4 * heads, 4 * heads, feat_size=side, r=None, num_heads=heads, dim_head=3).eval()
    randomise_batchnorm(layer)
    with torch.no_grad():
        layer.pos_emb.copy_(torch.randn(layer.pos_emb.shape, generator=g))
    x = torch.randn(2, 4 * heads, *side, generator=g)
    with torch.no_grad():
        want = layer(x)
        q, k, v = layer.qkv(x).split([heads * 3, 3, 4], dim=1)
        got = lambda_layer(layer.norm_q(q), k, layer.norm_v(v), heads, pos_emb=layer.pos_emb)
    assert torch.allclose(got, want, atol=1e-5)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_relative_lambda_torch_equals_onnx(data):
    shape = (2, data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5)))
    spec = validate(_lambda_spec(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)),
                                 data.draw(st.integers(1, 4)), shape))
    got = spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, *shape))
    assert np.isfinite(got).all()


def test_relative_lambda_fields_state_and_refusals():
    spec = validate(_lambda_spec(module="blocks.0.attn"))
    assert {k: v for k, v in stored_form(spec)["nodes"][3].items() if k in ("r", "rel_pos")} == {"rel_pos": [4, 5]}
    assert state_keys(spec)["a.pos_emb"] == "blocks.0.attn.pos_emb" and state_shapes(spec)["a.pos_emb"] == (7, 9, 3)
    assert rowless_tensors(spec) == ["a.pos_emb"]
    local = _lambda_spec()
    local["nodes"][3].pop("rel_pos")
    local["nodes"][3]["r"] = 3
    assert stored_form(validate(local))["nodes"][3]["r"] == 3 and "rel_pos" not in validate(local)["nodes"][3]
    for fields, words in [({"r": 3}, "needs one of r"), ({"rel_pos": None}, "needs one of r"),
                          ({"rel_pos": [4, 4]}, "rel_pos the map"), ({"rel_pos": [0, 4]}, "rel_pos")]:
        wrong = _lambda_spec()
        for key, value in fields.items():
            if value is None:
                del wrong["nodes"][3][key]
            else:
                wrong["nodes"][3][key] = value
        with pytest.raises(UsageError, match=words):
            validate(wrong)


class _RelLambda(nn.Module):
    def __init__(self, side=(4, 6), heads: int = 2, stride: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = LambdaLayer(16, 16, feat_size=side, r=None, num_heads=heads, dim_head=4, stride=stride)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kwargs", [{}, {"heads": 4, "stride": 2}])
def test_relative_lambda_parity(kwargs):
    module = randomised_all(_RelLambda(**kwargs))
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 4, 6))
    assert [(n["name"], n["rel_pos"]) for n in spec["nodes"] if n["op"] == "lambda_layer"] == [("attn.lambda", [4, 6])]
    check_parity(module, spec, (3, 4, 6))


def test_an_edited_relative_index_is_refused():
    module = _RelLambda()
    module.attn.rel_pos_indices[1] = module.attn.rel_pos_indices[1].flip(-1)
    with pytest.raises(UsageError, match="with its rel_pos_indices"):
        from_torch(module.eval(), (3, 4, 6))


def test_timm_lambda_resnet26rpt_at_64():
    deep_parity(timm.create_model("lambda_resnet26rpt_256", pretrained=False, img_size=64), 64)


@pytest.mark.slow
def test_timm_lambda_resnet26rpt_at_256():
    deep_parity(timm.create_model("lambda_resnet26rpt_256", pretrained=False), 256)
