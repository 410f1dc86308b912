"""EfficientViT's (MIT) ReLU linear attention (``linear_attention``) and timm's LiteMLA through `from_torch`: the op's
torch form against timm's own ``_attn`` (v padded with ones), torch = ONNX on random specs, the op's validation,
channel map and bound, small LiteMLA variants (scales, dims, norms, eps) against the module, refusals by name, and
timm's efficientvit_b0 at 64 (slow)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from linear_nets import TinyEfficientViT
from random_weights import random_params
from torch_nets import check_parity, randomise_batchnorm, spec_logits, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.channels import channel_map
from edgecl.arch.op_shapes import intermediates
from edgecl.arch.spec import node_shapes
from edgecl.errors import UsageError
from edgecl.train.attention_forms import linear_attention

LiteMLA = timm.models.efficientvit_mit.LiteMLA


def _spec(heads: int = 2, channels: tuple[int, int, int] = (4, 4, 6), shape=(2, 4, 6), **fields) -> dict:
    convs = [{"name": n, "op": "conv", "inputs": ["input"], "in": shape[0], "out": c, "k": 1}
             for n, c in zip("qkv", channels)]
    return {"name": "l", "input_shape": list(shape), "output": "f", "nodes": [
        *convs, {"name": "a", "op": "linear_attention", "inputs": ["q", "k", "v"], "heads": heads, **fields},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]}



@pytest.mark.parametrize("heads, d, eps", [(1, 4, 1e-5), (3, 2, 1e-5), (2, 8, 0.5)])
def test_torch_form_is_timms_attention(heads, d, eps):
    """timm's _attn on (B, heads, T, d) views with relu'd q, k and v padded by ones, against the op's torch form on
    head-major maps; about half of q's values negative, so some positions have a denominator of just eps."""
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(2, heads * d, 3, 5, generator=g) for _ in range(3))
    mla = LiteMLA(8, 8, dim=d, eps=eps)

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2, heads, d, 15).transpose(2, 3)

    want = mla._attn(torch.relu(heads_of(q)), torch.relu(heads_of(k)),
                     nn.functional.pad(heads_of(v), (0, 1), value=1.0)).transpose(2, 3).reshape(q.shape)
    assert torch.allclose(linear_attention(q, k, v, heads, eps), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(linear_attention(q, k, v, heads, eps), linear_attention(q, k, v, 1, eps), atol=1e-3) \
        or heads == 1  # the heads are contiguous blocks: one head over all channels is another network


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_linear_attention_torch_equals_onnx(data):
    """Random heads, head widths (v's may differ from q's), maps and eps: torch = ONNX."""
    heads, d, dv = data.draw(st.sampled_from([1, 2, 3])), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    shape = (2, data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
    eps = data.draw(st.sampled_from([1e-5, 0.1]))
    spec = validate(_spec(heads, (heads * d, heads * d, heads * dv), shape, eps=eps))
    got = spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, *shape))
    assert np.isfinite(got).all()


def test_fields_shape_bound_and_channel_map():
    spec = validate(_spec())
    node = spec["nodes"][3]
    assert node["eps"] == 1e-5 and node["kernel"] == "relu" and node_shapes(spec)["a"] == [6, 4, 6]
    # q, k relu'd and reshaped, v reshaped, the 2 heads' 3 × 2 sums, numerator, denominator: counted, not zero
    assert intermediates(node, [[4, 4, 6], [4, 4, 6], [6, 4, 6]]) == 2 * 8 * 24 + 3 * 6 * 24 + 6 * 2 + 4 + 2 * 2 * 24
    cm = channel_map(spec)
    q, k = cm.spaces["q"], cm.spaces["k"]
    assert [g for g, _ in q] == [g for g, _ in k] and {g for g, _ in q} <= cm.ordered  # channel i of q meets k's
    for bad, words in [(dict(heads=3), "q and k of 3 heads"), (dict(kernel="exp"), "'relu' or 'softmax'"),
                       (dict(eps=0), r"number in \(0, 1\)"), (dict(channels=(4, 2, 6)), "same positions"),
                       (dict(heads=2, channels=(4, 4, 5)), "v of 2 heads")]:
        channels = bad.pop("channels", (4, 4, 6))
        with pytest.raises(UsageError, match=words):
            validate(_spec(channels=channels, **bad))


class _Net(nn.Module):
    """A conv stem to a map and one timm LiteMLA, then the mean and a Linear."""

    def __init__(self, width: int = 16, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.attn = LiteMLA(width, 12, **kwargs)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kwargs, heads", [
    ({"dim": 4}, 8),  # 4 heads, twice with the 5×5 aggregation
    ({"dim": 8, "scales": (3, 5)}, 6),  # two aggregation scales
    ({"dim": 4, "scales": ()}, 4),  # no aggregation: the qkv conv alone
    ({"dim": 4, "heads_ratio": 0.5, "norm_layer": (nn.BatchNorm2d, nn.BatchNorm2d), "eps": 1e-3,
      "act_layer": (nn.Hardswish, None), "use_bias": True}, 4),
])
def test_lite_mla_parity(kwargs, heads):
    module = _Net(**kwargs).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 6, 5))
    attends = [n for n in spec["nodes"] if n["op"] == "linear_attention"]
    assert [(n["heads"], n["eps"]) for n in attends] == [(heads, kwargs.get("eps", 1e-5))]
    check_parity(module, spec, (3, 6, 5))


def test_tiny_efficientvit_parity():
    module = TinyEfficientViT(in_channels=3).eval()
    randomise_batchnorm(module)
    check_parity(module, from_torch(module, (3, 8, 8)), (3, 8, 8))


def _edited(edit) -> nn.Module:
    module = _Net(dim=4)
    edit(module.attn)
    return module.eval()


@pytest.mark.parametrize("make, words", [
    (lambda: _Net(dim=4, kernel_func=nn.ReLU6), "kernel_func is a ReLU6"),
    (lambda: _edited(lambda m: m.aggreg[0].append(nn.ReLU())), r"aggreg\.0 must be an nn\.Sequential"),
    (lambda: _edited(lambda m: setattr(m.qkv, "dropout", nn.Dropout2d())), "'attn.qkv' is a ConvNormAct"),
    (lambda: _edited(lambda m: setattr(m.proj, "norm", nn.GroupNorm(2, 12))), "'attn.proj.norm' is a GroupNorm"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), (3, 6, 5))
    assert "LiteMLA at 'attn'" in str(info.value)


@pytest.mark.slow
def test_timm_efficientvit_b0_at_64():
    module = timm.create_model("efficientvit_b0", pretrained=False).eval()
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    attends = [(n["heads"], math.prod(node_shapes(spec)[n["inputs"][0]][1:]))
               for n in spec["nodes"] if n["op"] == "linear_attention"]
    assert attends == [(8, 16), (8, 16), (16, 4), (16, 4)]  # 64 and 128 channels of 16 per head, doubled by scale 5
