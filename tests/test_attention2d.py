"""Attention over a feature map's positions through `from_torch`: timm's MultiQueryAttention2d (MobileNetV4-hybrid:
one key/value head shared by every query head, keys and values optionally down-sampled by a strided depthwise
conv), Attention2d and Visformer's Attention — parity of the spec's torch forward and its ONNX graph with the real
modules, the channel map that keeps every method correct (each query head tied to the one key head; v's channels
once per query head), the ``kv_heads`` field and the score bound, refusals by name, and timm's
mobilenetv4_hybrid_medium and visformer_tiny (slow)."""
from __future__ import annotations

import pytest
import torch
from layer_nets import TinyMNv4Hybrid
from torch import nn
from torch_nets import randomised_parity, timm

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.op_shapes import intermediates
from edgecl.errors import UsageError
from edgecl.runtime.costs import activation_bytes


class _Wrapped(nn.Module):
    """A stem conv, an attention on its map, average pooling and a Linear classifier."""

    def __init__(self, attention: nn.Module, width: int = 12):
        super().__init__()
        self.stem, self.attn = nn.Conv2d(3, width, 3, padding=1), attention
        self.fc = nn.Linear(attention_out(attention), 2)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean([2, 3]))


def attention_out(m: nn.Module) -> int:
    return (m.output.proj if hasattr(m, "output") else m.proj).out_channels


def _multi_query(**kwargs) -> nn.Module:
    return timm.layers.attention2d.MultiQueryAttention2d(12, **kwargs)




@pytest.mark.parametrize("kwargs", [
    dict(num_heads=1), dict(num_heads=4, key_dim=8, value_dim=6), dict(num_heads=3, kv_stride=2, dim_out=10),
    dict(num_heads=2, key_dim=5, value_dim=7, kv_stride=2, dw_kernel_size=5)])
def test_multi_query_attention_parity(kwargs):
    torch.manual_seed(0)
    spec = randomised_parity(_Wrapped(_multi_query(**kwargs)))
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    heads = kwargs["num_heads"]
    assert attend["heads"] == heads and attend["kv_heads"] == 1
    assert attend["scale"] == pytest.approx(kwargs.get("key_dim", 12 // heads) ** -0.5)
    ops = [n["op"] for n in spec["nodes"]]
    assert ops.count("bn") == (2 if kwargs.get("kv_stride") else 0)  # the key and value paths' norms


def test_attention2d_parity():
    spec = randomised_parity(_Wrapped(timm.layers.attention2d.Attention2d(12, num_heads=3)))
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert (attend["heads"], attend["kv_heads"]) == (3, 3) and attend["scale"] == pytest.approx(4 ** -0.5)


@pytest.mark.parametrize("kwargs", [dict(num_heads=3), dict(num_heads=2, head_dim_ratio=0.5)])
def test_visformer_attention_parity(kwargs):
    """Visformer's Attention packs q, k and v as blocks of heads (reshape(B, 3, heads, head_dim, -1)); with
    head_dim_ratio its heads are narrower than dim / heads."""
    spec = randomised_parity(_Wrapped(timm.models.visformer.Attention(12, **kwargs)))
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    head_dim = round(12 // kwargs["num_heads"] * kwargs.get("head_dim_ratio", 1.0))
    assert attend["heads"] == kwargs["num_heads"] and attend["scale"] == pytest.approx(head_dim ** -0.5)
    assert [n["out"] for n in spec["nodes"] if n["name"] == "attn.qkv"] == [3 * kwargs["num_heads"] * head_dim]


def _visformer_with(**parts) -> nn.Module:
    m = timm.models.visformer.Attention(12, num_heads=3)
    for name, layer in parts.items():
        setattr(m, name, layer)
    return _Wrapped(m)


def test_tiny_mnv4_hybrid_parity():
    randomised_parity(TinyMNv4Hybrid(in_channels=3), (3, 8, 8))


def test_channel_map_ties_every_query_head_to_the_one_key_head():
    spec = from_torch(_Wrapped(_multi_query(num_heads=3, key_dim=4, value_dim=5, kv_stride=2)), (3, 8, 8))
    cm = channel_map(spec)
    q, k, v = (cm.spaces[f"attn.{p}.proj"] for p in ("query", "key", "value"))
    assert len(k) == len(v) == 1 and q == k * 3  # query head i meets the key head channel by channel
    assert cm.rows["attn.query.proj.weight"] == k * 3
    assert cm.spaces["attn.attend"] == v * 3 == cm.cols["attn.output.proj.weight"]  # v once per query head
    assert {g for g, _ in q + v} <= cm.pinned & cm.ordered
    assert cm.spaces["stem"][0][0] not in cm.ordered  # the map the keys are computed from stays free


def _spec(q: list[int], k: list[int], v: list[int], **fields) -> dict:
    inputs = [{"name": n, "op": "conv", "inputs": ["input"], "in": 4, "out": s[0], "k": 1,
               "stride": 8 // s[1]} for n, s in zip("qkv", (q, k, v))]
    return {"name": "mqa", "input_shape": [4, 8, 8], "output": "f", "nodes": [
        *inputs, {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "scale": 0.5, **fields},
        {"name": "p", "op": "gap", "inputs": ["a"]}, {"name": "f", "op": "flatten", "inputs": ["p"]}]}


def test_kv_heads_field_shapes_and_costs():
    old = validate(_spec([8, 8, 8], [8, 8, 8], [6, 8, 8], heads=2))
    assert old["nodes"][3]["kv_heads"] == 2 and old["feature_dim"] == 6  # the default: one k/v head per q head
    mqa = validate(_spec([8, 8, 8], [4, 4, 4], [3, 4, 4], heads=2, kv_heads=1))
    assert mqa["feature_dim"] == 6  # heads × dv at the queries' positions
    node = mqa["nodes"][3]
    assert intermediates(node, [[8, 8, 8], [4, 4, 4], [3, 4, 4]]) == \
        2 * 2 * 64 * 16 + 2 * (8 * 64 + 4 * 16) + 2 * (3 * 16 + 6 * 64)
    assert activation_bytes(mqa, 1, 4) > 4 * 2 * 2 * 64 * 16
    for bad in (dict(heads=2, kv_heads=3), dict(heads=4, kv_heads=2)):  # 3 ∤ 2; k is 1 head of d = 2, not 2
        with pytest.raises(UsageError, match="attention needs maps q of"):
            validate(_spec([8, 8, 8], [4, 4, 4], [3, 4, 4], **bad))
    with pytest.raises(UsageError, match="attention needs maps"):  # v not at the keys' positions
        validate(_spec([8, 8, 8], [4, 4, 4], [3, 8, 8], heads=2, kv_heads=1))


def _edited(edit, **kwargs) -> nn.Module:
    """A MultiQueryAttention2d whose key/value path `edit` changed (its layers are read in timm's order)."""
    m = _multi_query(num_heads=2, **kwargs)
    edit(m)
    return _Wrapped(m)


def _attention_2d_with(**parts) -> nn.Module:
    m = timm.layers.attention2d.Attention2d(12, num_heads=3)
    for name, layer in parts.items():
        setattr(m, name, layer)
    return m


@pytest.mark.parametrize("module, words", [
    # query strides with another up-sampling than timm's bilinear one (nearest would run as another network)
    (lambda: _edited(lambda m: setattr(m.output, "upsample", nn.Upsample(scale_factor=2)), query_strides=2),
     "output.upsample is Upsample"),
    (lambda: _Wrapped(timm.layers.attention2d.Attention2d(12, num_heads=3, head_first=True)), "head_first"),
    # a norm after the key projection (was silently left out), a strided value path without its norm (a raw error)
    (lambda: _edited(lambda m: m.key.add_module("norm", nn.BatchNorm2d(6))), r"key has layers \['proj', 'norm'\]"),
    (lambda: _edited(lambda m: delattr(m.value, "norm"), kv_stride=2), r"value has layers \['down_conv', 'proj'\]"),
    (lambda: _edited(lambda m: setattr(m.output, "drop", nn.ReLU())), "output.drop is a ReLU"),
    (lambda: _Wrapped(_attention_2d_with(proj_drop=nn.Hardswish())), "proj_drop is a Hardswish"),
    # Visformer: a spatial qkv conv (its positions would move), an attention dropout that is no dropout
    (lambda: _visformer_with(qkv=nn.Conv2d(12, 36, 3, padding=1, bias=False)), r"qkv is a Conv2d \(3, 3\)"),
    (lambda: _visformer_with(attn_drop=nn.ReLU()), "attn_drop is a ReLU"),
])
def test_unsupported_variants_are_refused_by_name(module, words):
    with pytest.raises(UsageError, match=words) as err:
        from_torch(module(), (3, 8, 8))
    assert any(f in str(err.value) for f in ("attention2d.py:", "test_attention2d.py:", "visformer.py:"))
    assert "'attn'" in str(err.value)


@pytest.mark.slow
def test_mobilenetv4_hybrid_medium_at_64():
    randomised_parity(timm.create_model("mobilenetv4_hybrid_medium"), (3, 64, 64))


@pytest.mark.slow
def test_visformer_tiny_at_64():
    randomised_parity(timm.create_model("visformer_tiny", img_size=64), (3, 64, 64))


def test_channel_map_follows_a_thousand_query_heads():
    """Each query head is a cut of q's group: 1100 heads (one channel each) over one k/v head nest 1100 cuts, which
    a recursive resolve of the group's parts did not survive (a raw RecursionError from a five-node spec file)."""
    heads = 1100
    spec = validate({"name": "many", "input_shape": [1, 1, 1], "output": "f", "nodes": [
        *({"name": n, "op": "conv", "inputs": ["input"], "in": 1, "out": c, "k": 1} for n, c in
          (("q", heads), ("k", 1), ("v", 1))),
        {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": heads, "kv_heads": 1, "scale": 1.0},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]})
    cm = channel_map(spec)
    assert cm.spaces["q"] == cm.spaces["k"] * heads and cm.spaces["a"] == cm.spaces["v"] * heads
