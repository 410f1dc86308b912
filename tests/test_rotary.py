"""The ``rotary`` op (RoPE, `edgecl.arch.rotary_ops`) and EVA's / the RoPE ViTs' attentions with it through
`from_torch`: against timm's own rotation, the module (torch form and ONNX), over prefix tokens, both of timm's pair
layouts and grouped-query keys; the op's table validated; what stays refused by name; the library's RoPE ViT and
EVA-02 tiny as built (q, k, v as rows of its fused qkv) and with separate projections at 64 and 56 (slow)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all
from vit_bias_nets import tiny_eva

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import to_module_state
from edgecl.arch.rotary_ops import rotary_constants
from edgecl.arch.spec import validate
from edgecl.errors import UsageError
from edgecl.train.initial import starting_weights


@pytest.mark.parametrize("half", [False, True])
def test_constants_rotate_as_timm(half):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    heads, d, t, prefix = 2, 4, 5, 1
    g = torch.Generator().manual_seed(0)
    emb = torch.rand(t - prefix, 2 * d, generator=g) * 2 - 1
    x = torch.randn(3, heads, t, d, generator=g)  # timm's (B, heads, T, d)
    want = torch.cat([x[:, :, :prefix], apply_rot_embed_cat(x[:, :, prefix:], emb, half=half)], dim=2)
    node = {"heads": heads, "prefix": prefix, "half": half, "table": emb.tolist()}
    cos, sin, partners = rotary_constants(node, [heads * d, t, 1])
    h = x.permute(0, 1, 3, 2).reshape(3, heads * d, t, 1)  # the spec's (N, C, T, 1), heads contiguous
    got = h * torch.from_numpy(cos) + h[:, partners] * torch.from_numpy(sin)
    assert torch.allclose(got.reshape(3, heads, d, t).permute(0, 1, 3, 2), want, atol=1e-6)


_KINDS = {"eva_as_built": {}, "eva_separate": dict(qkv_fused=False), "eva_no_qkv_bias": dict(qkv_bias=False),
          "eva_no_class_token": dict(qkv_fused=False, class_token=False, global_pool="avg"),
          "rope_vit": dict(attn_type="rope"), "rope_vit_registers": dict(attn_type="rope", num_reg_tokens=2),
          "rope_vit_grouped": dict(attn_type="rope", qkv_fused=False, num_kv_heads=1),
          "rope_vit_dinov3": dict(attn_type="rope", rope_type="dinov3"),
          "eva_12px": dict(qkv_fused=False, image=12)}


@pytest.mark.parametrize("kind", list(_KINDS))
def test_tiny_parity(kind):
    kwargs = dict(_KINDS[kind])
    image = kwargs.get("image", 8)
    module = randomised_all(tiny_eva(use_rot_pos_emb=True, **kwargs))
    spec = from_torch(module, (1, image, image))
    rotary = [n for n in spec["nodes"] if n["op"] == "rotary"]
    assert len(rotary) == 4 and rotary[0]["name"] == "blocks.0.attn.q_rope"
    check_parity(module, spec, (1, image, image))


def _rope_spec(**kwargs) -> dict:
    return copy.deepcopy(from_torch(tiny_eva(use_rot_pos_emb=True, **{"qkv_fused": False, **kwargs}), (1, 8, 8)))


def test_fused_qkv_under_rope_is_three_convs_of_its_rows():
    """EVA-02's fused qkv with q/v biases: q, k, v each a conv of its rows of qkv.weight; q's and v's biases the
    module's q_bias and v_bias; back to the module as they were."""
    module = randomised_all(tiny_eva(use_rot_pos_emb=True))
    spec = from_torch(module, (1, 8, 8))
    nodes = {n["name"]: n for n in spec["nodes"]}
    q, k, v = (nodes[f"blocks.0.attn.{p}"] for p in "qkv")
    assert [n["weight_rows"] for n in (q, k, v)] == [[0, 3], [1, 3], [2, 3]]
    assert (q["bias_parts"], k["bias"], v["bias_parts"], q["module"]) == (["q_bias"], False, ["v_bias"],
                                                                          "blocks.0.attn.qkv")
    weights = tensors_of(module, spec)
    attn = module.blocks[0].attn
    assert np.array_equal(weights["blocks.0.attn.k.weight"].reshape(8, 8), attn.qkv.weight[8:16].detach().numpy())
    assert np.array_equal(weights["blocks.0.attn.v.bias"], attn.v_bias.detach().numpy())
    state = to_module_state(spec, weights)
    assert "blocks.0.attn.qkv.bias" not in state and "blocks.0.attn.q.bias" not in state
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"):
        assert np.array_equal(state[key], module.state_dict()[key].numpy()), key
    assert starting_weights(module, spec).sha256 == starting_weights(state, spec).sha256
    assert validate(stored_form(spec)) == spec


@pytest.mark.parametrize("change, words", [
    (lambda n: n["blocks.0.attn.k"].update(weight_rows=[3, 3]), "needs part < parts"),
    (lambda n: n["blocks.0.attn.k"].update(bias=True), "needs part < parts and, with a bias, its bias_parts"),
    (lambda n: n["blocks.0.attn.k"].update(weight_rows=[0, 3]), "one weight cannot be two"),  # q's rows
    (lambda n: n["blocks.0.attn.k"].update(weight_rows=[1, 4]), "different shapes"),
    (lambda n: n["blocks.0.attn.k"].update(module="blocks.0.attn.kk"), "row 8 of it is no node's"),
])
def test_validation_refuses_bad_weight_rows(change, words):
    spec = copy.deepcopy(from_torch(tiny_eva(use_rot_pos_emb=True), (1, 8, 8)))
    change({n["name"]: n for n in spec["nodes"]})
    with pytest.raises(UsageError, match=words):
        validate(spec)


@pytest.mark.parametrize("change, words", [
    (lambda n: n.update(table=n["table"][1:]), "table of tokens − 1 rows"),
    (lambda n: n.update(prefix=0), "table of tokens − 0 rows"),
    (lambda n: n.update(heads=3), "rotary needs"),
    (lambda n: n.update(table=[row[:-1] for row in n["table"]]), "2·head size"),
    (lambda n: n.update(table=[[float("nan")] * len(row) for row in n["table"]]), "finite numbers"),
    (lambda n: n.update(table=[[2e4] * len(row) for row in n["table"]]), "finite numbers"),
    (lambda n: n.update(table=[n["table"][0], n["table"][1][:2]]), "equally long"),
    (lambda n: n.update(half=1), "true or false"),
])
def test_validation_refuses_bad_tables(change, words):
    spec = _rope_spec()
    change(next(n for n in spec["nodes"] if n["op"] == "rotary"))
    with pytest.raises(UsageError, match=words):
        validate(spec)


def test_a_file_stores_each_table_once():
    spec = validate(_rope_spec())
    stored = stored_form(spec)
    rotary = [n for n in stored["nodes"] if n["op"] == "rotary"]
    assert "table" in rotary[0] and all(n["table_from"] == rotary[0]["name"] for n in rotary[1:])
    assert validate(stored) == spec
    assert json.dumps(stored).count('"table":') == 1 and json.dumps(spec).count('"table":') == 4


@pytest.mark.parametrize("source, words", [
    ("nope", "earlier rotary node"), ("blocks.1.attn.q_rope", "earlier rotary node"),  # unknown; a later node
    ("blocks.0.attn.q_proj", "earlier rotary node"),  # not a rotary node
    (None, "earlier rotary node")])
def test_table_from_must_name_an_earlier_table(source, words):
    stored = copy.deepcopy(stored_form(validate(_rope_spec())))
    node = next(n for n in stored["nodes"] if n["name"] == "blocks.0.attn.k_rope")
    node["table_from"] = source
    with pytest.raises(UsageError, match=words):
        validate(stored)
    node["table_from"] = "blocks.0.attn.q_rope"
    node["table"] = [[0.0]]  # a table beside it
    with pytest.raises(UsageError, match="no table beside it"):
        validate(stored)


def test_refused_by_name():
    module = tiny_eva(use_rot_pos_emb=True, attn_type="rope", rope_type="mixed")  # learned per-block frequencies
    assert_refused(module, "pos_embed_sincos.py")


@pytest.mark.slow
@pytest.mark.parametrize("name, size, kwargs", [
    ("vit_small_patch16_rope_224", 64, {}), ("vit_small_patch16_rope_224", 96, {}),
    ("vit_small_patch16_rope_ape_224", 64, {}),
    ("eva02_tiny_patch14_224", 56, {"num_classes": 10}), ("eva02_tiny_patch14_224", 64, {"num_classes": 10}),
    ("eva02_tiny_patch14_224", 64, {"qkv_fused": False, "num_classes": 10})])
def test_library_models(name, size, kwargs):
    torch.manual_seed(0)
    module = build_module(f"timm:{name}", {"img_size": size, **kwargs}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, size, size))
    assert any(n["op"] == "rotary" for n in spec["nodes"])
    check_parity(module, spec, (3, size, size), batch=2)
