"""LambdaNetworks' lambda layer through `from_torch`: the ``lambda_layer`` op's torch form against timm's
LambdaLayer, torch = ONNX on random specs, the op's validation, channel map, bounds and stored form, small
LambdaLayer variants (heads, key depth, r, stride 2, qkv bias) against the module, refusals by name, and timm's
lambda_resnet26t at 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from linear_nets import LambdaLayer, TinyLambdaNet
from random_weights import random_params
from torch_nets import check_parity, randomise_batchnorm, spec_logits, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.channels import channel_map
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import from_module, state_keys, state_shapes
from edgecl.arch.op_shapes import intermediates
from edgecl.arch.spec import node_shapes, rowless_tensors
from edgecl.errors import UsageError
from edgecl.train.attention_forms import lambda_layer


def _spec(heads: int = 2, dim: int = 3, dv: int = 4, r: int = 3, shape=(2, 4, 5)) -> dict:
    """q, k, v 1×1 convs of one map and their lambda layer."""
    outs = {"q": heads * dim, "k": dim, "v": dv}
    nodes = [{"name": n, "op": "conv", "inputs": ["input"], "in": shape[0], "out": c, "k": 1} for n, c in outs.items()]
    nodes += [{"name": "a", "op": "lambda_layer", "inputs": ["q", "k", "v"], "heads": heads, "dim": dim, "r": r},
              {"name": "f", "op": "flatten", "inputs": ["a"]}]
    return {"name": "x", "input_shape": list(shape), "output": "f", "nodes": nodes}


@pytest.mark.parametrize("heads, dim, dv, r", [(4, 4, 4, 3), (2, 8, 3, 5), (1, 2, 6, 1), (3, 2, 2, 9)])
def test_torch_form_is_timms_lambda_layer(heads, dim, dv, r):
    """timm's forward against the op's torch form on its q, k, v (the qkv conv's three blocks, q and v through the
    module's BatchNorms, their statistics random); the position filters' bias random."""
    g = torch.Generator().manual_seed(heads + r)
    layer = LambdaLayer(heads * dv, heads * dv, num_heads=heads, dim_head=dim, r=r).eval()
    randomise_batchnorm(layer)
    with torch.no_grad():
        layer.conv_lambda.bias.copy_(torch.randn(dim, generator=g))
    x = torch.randn(2, heads * dv, 5, 3, generator=g)  # H ≠ W: the filters' axes are not swapped
    with torch.no_grad():
        want = layer(x)
        q, k, v = layer.qkv(x).split([heads * dim, dim, dv], dim=1)
        got = lambda_layer(layer.norm_q(q), k, layer.norm_v(v), heads, layer.conv_lambda.weight[..., 0],
                           layer.conv_lambda.bias)
    assert torch.allclose(got, want, atol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_lambda_layer_torch_equals_onnx(data):
    """Random heads, key depth, value width, r and maps (r larger than the map too): torch = ONNX, finite."""
    shape = (2, data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
    spec = validate(_spec(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5)),
                          data.draw(st.sampled_from([1, 3, 5, 9])), shape))
    got = spec_logits(spec, random_params(spec, 3, data.draw(st.integers(0, 9))), torch.randn(3, *shape))
    assert np.isfinite(got).all()


def test_fields_shapes_bounds_state_and_channel_map():
    spec = validate(_spec())
    node = spec["nodes"][3]
    assert node_shapes(spec)["a"] == [8, 4, 5]  # heads × dv
    t = 20
    assert intermediates(node, [[6, 4, 5], [3, 4, 5], [4, 4, 5]]) == 3 * t + 12 + 9 * t + 12 * t + 2 * 12 * t + 2 * 8 * t
    assert stored_form(spec)["nodes"][3] == {"name": "a", "op": "lambda_layer", "inputs": ["q", "k", "v"],
                                             "heads": 2, "dim": 3, "r": 3}
    assert rowless_tensors(spec) == ["a.weight", "a.bias"]  # per task in every method that shares a trunk
    assert state_keys(spec)["a.weight"] == "a.weight" and state_shapes(spec)["a.weight"] == (3, 1, 3, 3, 1)
    stored = np.arange(27, dtype=np.float32).reshape(3, 1, 3, 3, 1)  # timm's Conv3d (dim, 1, r, r, 1)
    assert np.array_equal(from_module(spec, "a.weight", stored), stored[..., 0])
    cm = channel_map(spec)
    for n in "qkva":
        assert {g for g, _ in cm.spaces[n]} <= cm.pinned & cm.ordered, n  # nothing cut, nothing moved
    assert cm.spaces["a"] == [("a", 1)]  # its output mixes every q channel of a head: channels of its own
    for field, value, words in [("r", 2, "odd r"), ("r", 33, "at most 31"), ("dim", 2, "k of 2"),
                                ("inputs", ["q", "q", "v"], "k of 3"), ("heads", 3, "q of 3 heads")]:
        wrong = _spec()
        wrong["nodes"][3][field] = value
        with pytest.raises(UsageError, match=words):
            validate(wrong)


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2}, {"heads": 2, "dim": 8, "r": 5, "qkv_bias": True},
                                    {"r": 1}, {"heads": 1, "r": 7}])
def test_lambda_layer_parity(kwargs):
    torch.manual_seed(0)
    module = TinyLambdaNet(in_channels=3, **kwargs).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    lam = [n for n in spec["nodes"] if n["op"] == "lambda_layer"]
    assert [(n["name"], n["heads"], n["r"]) for n in lam] == [("attn.conv_lambda", kwargs.get("heads", 4),
                                                               kwargs.get("r", 3))]
    assert sum(n["op"] == "avgpool" for n in spec["nodes"]) == 2 * (kwargs.get("stride") == 2)
    check_parity(module, spec, (3, 8, 8))


def _edited(edit, stride: int = 1) -> nn.Module:
    module = TinyLambdaNet(in_channels=3, stride=stride)
    edit(module.attn)
    return module.eval()


@pytest.mark.parametrize("make, words", [
    (lambda: _edited(lambda m: setattr(m, "conv_lambda", nn.Conv3d(1, 4, 3, padding=1))), "conv_lambda is Conv3d"),
    (lambda: _edited(lambda m: setattr(m, "conv_lambda", nn.Conv3d(1, 4, (3, 3, 1), padding=(1, 1, 0),
                                                                   padding_mode="circular"))), "of zeros"),
    (lambda: _edited(lambda m: setattr(m, "conv_lambda", nn.Conv3d(1, 4, (3, 3, 1), padding=(1, 1, 0),
                                                                   bias=False))), "with bias"),
    (lambda: _edited(lambda m: setattr(m, "norm_q", nn.Identity())), "'attn.norm_q' is a Identity"),
    (lambda: _edited(lambda m: setattr(m, "qkv", nn.Sequential(nn.Conv2d(16, 24, 1)))), "qkv is a Sequential"),
    (lambda: _edited(lambda m: setattr(m, "pool", nn.MaxPool2d(2)), 2), "pool is a MaxPool2d"),
    (lambda: _edited(lambda m: setattr(m, "pool", nn.AvgPool2d(2, 2, ceil_mode=True)), 2), "'attn.pool' is AvgPool2d"),
    (lambda: _edited(lambda m: setattr(m, "pool", nn.AvgPool2d(2, 2, divisor_override=3)), 2),
     "'attn.pool' is AvgPool2d"),  # was converted as a plain average: outputs 4/3 of the module's
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), (3, 8, 8))
    assert "LambdaLayer at " in str(info.value)


@pytest.mark.slow
def test_timm_lambda_resnet26t_at_64():
    torch.manual_seed(0)
    module = timm.create_model("lambda_resnet26t", pretrained=False).eval()
    spec = from_torch(module, (3, 64, 64))
    assert len(spec["nodes"]) == 119
    assert [n["r"] for n in spec["nodes"] if n["op"] == "lambda_layer"] == [9, 9, 9]
    randomise_batchnorm(module)
    check_parity(module, spec, (3, 64, 64), batch=2)


def test_a_small_spec_asking_for_huge_lambda_work_is_refused():
    """Three 1×1 convs of 4096 outputs over a 64×64 map, averaged to a head (33 K trunk weights in all): q times the
    position lambdas would be heads × dim × dv × T = 4096³ products per sample (550 GB of float32) — refused at
    validation, as an attention's scores are; timm's lambda_resnet26t at 224 stays far under the bound."""
    hostile = _spec(1, 4096, 4096, 1, (1, 64, 64))
    hostile["nodes"][-1:] = [{"name": "g", "op": "gap", "inputs": ["a"]},
                             {"name": "f", "op": "flatten", "inputs": ["g"]}]
    with pytest.raises(UsageError, match="products per sample"):
        validate(hostile)
    assert node_shapes(validate(_spec(4, 16, 128, 9, (1, 28, 28))))["a"] == [512, 28, 28]
