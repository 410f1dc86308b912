"""The ``rotary`` op (RoPE, `edgecl.arch.rotary_ops`) and EVA's / the RoPE ViTs' attentions with it through
`from_torch`: against timm's own rotation, the module (torch form and ONNX), over prefix tokens, both of timm's pair
layouts and grouped-query keys; the op's table validated; what stays refused by name; the library's RoPE ViT and
EVA-02 tiny (separate projections) at 64 and another size (slow)."""
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
from edgecl.arch.later_fields import stored_form
from edgecl.arch.rotary_ops import rotary_constants
from edgecl.arch.spec import validate
from edgecl.errors import UsageError


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


_KINDS = {"eva_separate": dict(qkv_fused=False), "eva_no_qkv_bias": dict(qkv_bias=False),
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


def _rope_spec() -> dict:
    return copy.deepcopy(from_torch(tiny_eva(use_rot_pos_emb=True, qkv_fused=False), (1, 8, 8)))


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
    module = tiny_eva(use_rot_pos_emb=True)  # fused qkv with q/v biases: its k part would be trained under RoPE
    assert_refused(module, "EvaAttention", "blocks.0.attn", "qkv_fused=False")
    module = tiny_eva(use_rot_pos_emb=True, attn_type="rope", rope_type="mixed")  # learned per-block frequencies
    assert_refused(module, "pos_embed_sincos.py")


@pytest.mark.slow
@pytest.mark.parametrize("name, size, kwargs", [
    ("vit_small_patch16_rope_224", 64, {}), ("vit_small_patch16_rope_224", 96, {}),
    ("vit_small_patch16_rope_ape_224", 64, {}),
    ("eva02_tiny_patch14_224", 56, {"qkv_fused": False, "num_classes": 10}),
    ("eva02_tiny_patch14_224", 64, {"qkv_fused": False, "num_classes": 10})])
def test_library_models(name, size, kwargs):
    torch.manual_seed(0)
    module = build_module(f"timm:{name}", {"img_size": size, **kwargs}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, size, size))
    assert any(n["op"] == "rotary" for n in spec["nodes"])
    check_parity(module, spec, (3, size, size), batch=2)
