"""MViTv2 with a class token (timm's ``use_cls_token``, `edgecl.arch.fx_mvit`: the token split off before each
pooling and joined back after it, normed with the pooled map) and the attention's ``rel_prefix`` / ``rel_query`` /
``rel_key`` fields (prefix tokens that get no relative logits, timm's ``cal_rel_pos_type`` adding them to the map
queries × map keys only), their torch and ONNX forms against timm's own function, their stored form and their
validation."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from edgecl.arch import from_torch, validate
from edgecl.arch.factories import build_module
from edgecl.arch.later_fields import stored_form
from edgecl.errors import UsageError
from mvit_nets import MultiScaleVit, MultiScaleVitCfg, tiny_mvit
from torch_nets import assert_refused, check_parity, randomised_all, spec_logits

from timm.models.mvitv2 import cal_rel_pos_type  # noqa: E402

HEADS, D = 2, 3


def _prefixed_spec(k_map: list[int]) -> dict:
    """q: the input's 1 + 4·4 tokens (a class token, then a 4 × 4 map); k and v: its first 1 + kh·kw tokens, read as
    a kh × kw map (as a pooled key map would be)."""
    keys = 1 + k_map[0] * k_map[1]
    return {"name": "prefixed", "input_shape": [HEADS * D, 17, 1], "output": "f", "nodes": [
        {"name": "k", "op": "token", "inputs": ["input"], "index": 0, "count": keys},
        {"name": "a", "op": "attention", "inputs": ["input", "k", "k"], "heads": HEADS, "scale": 0.5,
         "rel_pos": [max(4, k_map[0]), max(4, k_map[1])], "rel_dim": D, "rel_mvit": True, "rel_prefix": 1,
         "rel_query": [4, 4], "rel_key": list(k_map)},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]}


def _timm_attention(x: torch.Tensor, k_map: list[int], rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """timm's MultiScaleAttention core on the same q, k, v: scores, ``cal_rel_pos_type`` with the class token,
    softmax, times v; flattened as the spec's (N, heads·d·tokens)."""
    n, keys = x.shape[0], 1 + k_map[0] * k_map[1]
    q = x[..., 0].reshape(n, HEADS, D, 17).transpose(2, 3)  # (N, h, T, d)
    k = q[:, :, :keys]
    attn = cal_rel_pos_type((q * 0.5) @ k.transpose(-2, -1), q, True, [4, 4], list(k_map), rel_h, rel_w)
    out = attn.softmax(dim=-1) @ k  # (N, h, T, d)
    return out.transpose(2, 3).reshape(n, -1)


@pytest.mark.parametrize("k_map", [[4, 4], [2, 2], [1, 1]])
def test_prefix_tokens_get_no_relative_logits_as_timm(k_map):
    """Torch forward and ONNX graph of the spec = timm's ``cal_rel_pos_type`` path, with keys on the query's map
    and pooled to a smaller one."""
    spec = validate(_prefixed_spec(k_map))
    g = torch.Generator().manual_seed(0)
    rel_h, rel_w = (torch.randn(7, D, generator=g) for _ in range(2))
    x = torch.randn(3, HEADS * D, 17, 1, generator=g)
    width = HEADS * D * 17  # an identity head: the logits are the attention's output
    head = {"head.weight": np.eye(width, dtype=np.float32), "head.bias": np.zeros(width, np.float32)}
    got = spec_logits(spec, {"a.rel_h": rel_h.numpy(), "a.rel_w": rel_w.numpy(), **head}, x)
    with torch.no_grad():
        want = _timm_attention(x, k_map, rel_h, rel_w).numpy()
        plain = _timm_attention(x, k_map, rel_h * 0, rel_w * 0).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.abs(plain - want).max() > 1e-3  # the logits matter


def test_stored_form_and_refusals():
    """The fields are left out where absent (files without them are byte-identical), kept where set; bad values,
    a partial set, and a set without rel_mvit or with shapes that do not fit are refused by name."""
    spec = validate(_prefixed_spec([2, 2]))
    stored = json.loads(json.dumps(stored_form(spec)))
    assert validate(stored) == spec and stored["nodes"][1]["rel_prefix"] == 1
    plain = _prefixed_spec([2, 2])
    for key in ("rel_prefix", "rel_query", "rel_key"):
        plain["nodes"][1].pop(key)
    plain["nodes"][0]["count"] = 16
    plain["input_shape"] = [HEADS * D, 4, 4]
    plain["nodes"][0] = {"name": "k", "op": "maxpool", "inputs": ["input"], "k": [2, 2], "stride": [2, 2]}
    assert "rel_prefix" not in stored_form(validate(plain))["nodes"][1]
    for fields, word in [({"rel_prefix": 0}, "rel_prefix"), ({"rel_prefix": "1"}, "rel_prefix"),
                         ({"rel_query": [0, 4]}, "rel_query"), ({"rel_key": [2, 2, 2]}, "rel_key"),
                         ({"rel_key": None}, "go together"), ({"rel_mvit": False}, "rel_mvit"),
                         ({"rel_query": [2, 8]}, "prefix tokens"), ({"rel_key": [3, 1]}, "prefix tokens"),
                         ({"rel_prefix": 2}, "prefix tokens"), ({"rel_pos": [3, 3]}, "prefix tokens"),
                         ({"window": [4, 1]}, "no window")]:
        bad = _prefixed_spec([2, 2])
        bad["nodes"][1].update(fields)
        bad["nodes"][1] = {k: v for k, v in bad["nodes"][1].items() if v is not None}
        with pytest.raises(UsageError, match=re.escape(word)):
            validate(bad)


@pytest.mark.parametrize("cfg,image", [
    ({}, 16), ({"num_heads": 1}, 16), ({"num_heads": 3, "embed_dim": 6}, 16), ({"mode": "max"}, 16),
    ({"mode": "avg"}, 16), ({"use_abs_pos": True}, 16), ({"rel_pos_type": ""}, 20), ({"residual_pooling": False}, 16),
    ({"expand_attn": True}, 16), ({"qkv_bias": False, "kernel_qkv": (5, 5)}, 16),
    ({"depths": (1, 1, 1), "stride_q": ((1, 1), (2, 2), (2, 2))}, 32),
    ({"rel_pos_type": "", "num_heads": 3, "embed_dim": 6}, (12, 20)), ({"kernel_qkv": (1, 1)}, 16)],
    ids=["conv", "one_head", "three_heads", "max", "avg", "abs_pos", "odd_map_no_tables", "no_residual",
         "expand_attn", "no_qkv_bias_kernel5", "three_stages", "6x10_map_no_tables", "kernel1_subsampling"])
def test_tiny_mvit_with_class_token_parity(cfg, image):
    """Torch forward and ONNX graph of the converted tiny MViTv2 with a class token = the module (every tensor
    drawn at random: the class token, the pooling LayerNorms that norm it with the map, the tables), over the
    configurations tests/test_mvit.py runs without it; its pooled attentions carry the class token as one prefix
    token, q's and k's maps beside it."""
    side = tuple(image) if isinstance(image, tuple) else (image, image)
    module = randomised_all(tiny_mvit(image=image, use_cls_token=True, **cfg)).eval()
    spec = from_torch(module, (1, *side))
    check_parity(module, spec, (1, *side), batch=2)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    if cfg.get("rel_pos_type") == "":
        assert all("rel_prefix" not in n for n in attends)
    elif image == 16 and "depths" not in cfg:  # keys pooled by 4 in stage 0 (8 × 8 → 2 × 2), by 2 in stage 1,
        assert [(n["rel_prefix"], n["rel_query"], n["rel_key"]) for n in attends] == \
            [(1, [8, 8], [2, 2]), (1, [4, 4], [4, 4]), (1, [4, 4], [2, 2])]  # its first block's q by 2 (→ 4 × 4)


def test_class_token_with_average_pooled_head():
    """``global_pool='avg'`` with a class token: the head averages the map's tokens past it (timm's
    ``x[:, num_prefix_tokens:].mean(1)``)."""
    cfg = MultiScaleVitCfg(depths=(1, 2), embed_dim=8, num_heads=2, patch_kernel=(3, 3), patch_stride=(2, 2),
                           patch_padding=(1, 1), stride_q=((1, 1), (2, 2)), stride_kv_adaptive=(4, 4),
                           use_cls_token=True)
    module = randomised_all(MultiScaleVit(cfg, img_size=16, in_chans=1, num_classes=3, global_pool="avg")).eval()
    check_parity(module, from_torch(module, (1, 16, 16)), (1, 16, 16), batch=2)


def test_class_token_refusals_name_the_block():
    """Tables built for another map are refused with the class token as without it."""
    assert_refused(tiny_mvit(image=16, use_cls_token=True), "MultiScaleBlock", "stages.0.blocks.0", "rel_pos_h",
                   "img_size", input_shape=(1, 12, 12))


@pytest.mark.slow
def test_library_mvitv2_small_cls_at_64():
    module = randomised_all(build_module("timm:mvitv2_small_cls", {"img_size": 64, "num_classes": 5}))
    spec = from_torch(module.eval(), (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
