"""An attention's ``rel_mvit`` relative positions with q and k on maps of different sizes (MViTv2's pooled queries
and keys: timm's ``mvitv2.cal_rel_pos_type``): the spec's torch form and its ONNX graph against timm's own function
on the same q, k, v and tables; ``rel_pos`` the larger map; validate refuses another ``rel_pos``, and keeps refusing
q and k of different sizes without ``rel_mvit`` (BotNet's logits need them alike)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch_nets import spec_logits

from edgecl.arch import validate
from edgecl.arch.factories import ensure_torchvision_imports
from edgecl.errors import UsageError

ensure_torchvision_imports()
from timm.models.mvitv2 import cal_rel_pos_type  # noqa: E402

HEADS, D = 2, 3


def _spec(side: int, q_stride: int, k_stride: int, rel_pos: list[int], mvit: bool = True) -> dict:
    """q, k and v: 1×1-or-strided convs of the input (q of `q_stride`, k and v of `k_stride`), attention over them
    with decomposed relative positions of `rel_pos`; the attention's output is the spec's output."""
    def conv(name: str, out: int, stride: int) -> dict:
        return {"name": name, "op": "conv", "inputs": ["input"], "in": 2, "out": out, "k": stride, "stride": stride}

    return {"name": "mvit_rel", "input_shape": [2, side, side], "output": "f", "nodes": [
        conv("q", HEADS * D, q_stride), conv("k", HEADS * D, k_stride), conv("v", HEADS * 2, k_stride),
        {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": HEADS, "scale": 0.6,
         "rel_pos": rel_pos, "rel_dim": D, **({"rel_mvit": True} if mvit else {})},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]}


def _weights(spec: dict, rows: list[int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for node in spec["nodes"][:3]:
        out[f"{node['name']}.weight"] = rng.normal(0, 0.5, (node["out"], 2, node["k"], node["k"])).astype(np.float32)
        out[f"{node['name']}.bias"] = rng.normal(0, 0.5, node["out"]).astype(np.float32)
    out["a.rel_h"] = rng.normal(0, 1.0, (rows[0], D)).astype(np.float32)
    out["a.rel_w"] = rng.normal(0, 1.0, (rows[1], D)).astype(np.float32)
    side = spec["input_shape"][1] // spec["nodes"][0]["k"]
    out["head.weight"] = np.eye(HEADS * 2 * side * side, dtype=np.float32)  # the attention's output itself
    out["head.bias"] = np.zeros(HEADS * 2 * side * side, np.float32)
    return out


def _timm(x: torch.Tensor, w: dict[str, np.ndarray], scale: float) -> torch.Tensor:
    """What MViTv2's attention computes from these q, k, v maps (its forward after pooling): the scores, timm's
    cal_rel_pos_type, softmax, times v, as (N, heads·dv, A, B)."""
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    q, k, v = (torch.nn.functional.conv2d(x, t[f"{n}.weight"], t[f"{n}.bias"], stride=t[f"{n}.weight"].shape[-1])
               for n in "qkv")
    n, (qh, qw), (kh, kw) = x.shape[0], q.shape[2:], k.shape[2:]

    def heads(m: torch.Tensor) -> torch.Tensor:  # (N, h·d, H, W) → (N, h, H·W, d)
        return m.reshape(n, HEADS, m.shape[1] // HEADS, -1).transpose(2, 3)

    qs, ks, vs = heads(q), heads(k), heads(v)
    attn = (qs * scale) @ ks.transpose(-2, -1)
    attn = cal_rel_pos_type(attn, qs, False, [qh, qw], [kh, kw], t["a.rel_h"], t["a.rel_w"])
    out = attn.softmax(dim=-1) @ vs  # (N, h, A·B, dv)
    return out.transpose(2, 3).reshape(n, -1, qh, qw)


@pytest.mark.parametrize("side,q_stride,k_stride", [(8, 1, 4), (8, 1, 2), (8, 2, 2), (8, 2, 1), (8, 4, 1), (6, 1, 2),
                                                    (8, 2, 4)],
                         ids=["k_quarter", "k_half", "both_half", "q_half", "q_quarter", "6_k_half",
                              "q_half_k_quarter"])
def test_pooled_q_and_k_match_timm(side, q_stride, k_stride):
    """The spec (torch form and ONNX, `spec_logits`) computes timm's attention with its decomposed relative
    positions for q and k on maps of different sizes (q on the larger: MViTv2's first stage; q on the smaller:
    a strided query), the tables of 2·max − 1 rows."""
    big = side // min(q_stride, k_stride)
    raw = _spec(side, q_stride, k_stride, [big, big])
    spec, weights = validate(raw), _weights(raw, [2 * big - 1] * 2, side + q_stride * 10 + k_stride)
    x = torch.randn(2, 2, side, side, generator=torch.Generator().manual_seed(1))
    got = spec_logits(spec, weights, x)
    want = _timm(x, weights, 0.6).flatten(1).numpy()
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    stored = json.loads(json.dumps(spec))
    assert validate(stored) == spec


def test_rel_pos_must_be_the_larger_map():
    """q 8×8 and k 2×2: rel_pos [8, 8] goes; the smaller map, another size, or the pair without rel_mvit (BotNet's
    logits need q and k on one map) are refused with a UsageError naming rel_pos."""
    validate(_spec(8, 1, 4, [8, 8]))
    for rel, mvit, word in [([2, 2], True, "larger"), ([4, 4], True, "larger"), ([8, 2], True, "larger"),
                            ([8, 8], False, "on a [8, 8] map")]:
        with pytest.raises(UsageError, match=re.escape(word)):
            validate(_spec(8, 1, 4, rel, mvit))
