"""LeViT through `from_torch`: timm's LinearNorm, Attention (learned per-head attention biases, q/k/v packed per head)
and AttentionDownsample (queries from strided tokens) — parity of the spec's torch forward and ONNX graph with the
real modules (biases randomised: timm starts them at 0), the attention bias as the op's table + fixed index (trained
tied, no channel rows, bounded), its validation and the converter's refusals by name, and timm's levit_128s at 64×64
(slow)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from layer_nets import TinyLeViT
from torch import nn
from random_weights import random_params
from torch_nets import classifier_of, randomised_parity, tensors_of, timm

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.op_shapes import intermediates
from edgecl.arch.spec import param_shapes, rowless_tensors
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.train.models import forward, from_numpy




def test_tiny_levit_parity_and_its_attention_biases():
    torch.manual_seed(0)  # the module's starting weights: the size of the bias's effect must not hang on test order
    module = TinyLeViT(in_channels=3)
    spec = randomised_parity(module)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["name"], n["heads"], n["bias_offsets"]) for n in attends] == [("attn.attend", 2, 16),
                                                                             ("down.attend", 2, 16)]
    assert np.array_equal(attends[0]["bias_index"], module.attn.attention_bias_idxs.numpy())
    assert np.array(attends[1]["bias_index"]).shape == (4, 16)  # 2×2 strided queries over 4×4 keys
    assert rowless_tensors(spec) == ["attn.attend.bias", "down.attend.bias"]
    assert param_shapes(spec)["attn.attend.bias"] == (2, 16)
    assert not set(rowless_tensors(spec)) & set(channel_map(spec).rows)  # the table belongs to no channel
    # the bias is read by both forms: without it neither gives the same logits (biases and head of normal weights:
    # LeViT's small starting weights would hide the change in rounding)
    weights, rng = {**tensors_of(module, spec), **classifier_of(module)}, np.random.default_rng(0)
    for name in ["head.weight", *rowless_tensors(spec)]:
        weights[name] = 2 * rng.standard_normal(weights[name].shape, np.float32)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for name in ["", *rowless_tensors(spec)]:
        zeroed = {**weights, **({name: np.zeros_like(weights[name])} if name else {})}
        with torch.no_grad():
            got = forward(spec, from_numpy(zeroed), x).numpy()
        session = ort.InferenceSession(build_onnx(spec, zeroed).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        assert np.abs(session.run(None, {"x": x.numpy()})[0] - got).max() < 1e-4
        if not name:
            want = got
        else:
            assert np.abs(got - want).max() > 1e-2, name


def test_the_bias_table_trains_through_its_fixed_index():
    """Head i's score of query t and key s reads table[i, index[t][s]]: the table's gradient is the sum over the
    pairs at each offset (LeViT's tied parametrisation) and 0 at offsets no pair reads; the torch and ONNX forms
    add the same numbers."""
    index = [[2 * ((i + j) % 3) for j in range(6)] for i in range(6)]  # offsets 0, 2, 4 of 6
    spec = validate(_spec(bias_offsets=6, bias_index=index))
    params = {k: v.requires_grad_() for k, v in from_numpy(random_params(spec, 3, 0)).items()}
    x = torch.randn(3, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    forward(spec, params, x, train=True).square().sum().backward()
    grad = params["a.bias"].grad
    assert grad.shape == (2, 6) and (grad[:, 1::2] == 0).all() and (grad[:, ::2] != 0).all()
    weights = {k: v.detach().numpy() for k, v in params.items()}
    session = ort.InferenceSession(build_onnx(spec, weights).SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = forward(spec, from_numpy(weights), x).numpy()
    assert np.abs(session.run(None, {"x": x.numpy()})[0] - want).max() < 1e-5


def _spec(**fields) -> dict:
    conv = {"op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1}
    return {"name": "b", "input_shape": [2, 2, 3], "output": "f", "nodes": [
        *({"name": n, **conv} for n in "qkv"),
        {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 0.5, **fields},
        {"name": "p", "op": "gap", "inputs": ["a"]}, {"name": "f", "op": "flatten", "inputs": ["p"]}]}


def test_bias_fields_validate_and_count():
    index = [[abs(i - j) for j in range(6)] for i in range(6)]
    spec = validate(_spec(bias_offsets=6, bias_index=index))
    node = spec["nodes"][3]
    assert param_shapes(spec)["a.bias"] == (2, 6) and node["bias_index"] == index
    plain = validate(_spec())
    assert "bias_offsets" not in plain["nodes"][3]  # specs without a bias are as before
    ins = [[4, 2, 3]] * 3
    assert intermediates(node, ins) - intermediates(plain["nodes"][3], ins) == 2 * 6 * 6
    for bad, words in [(dict(bias_offsets=6), "needs bias_offsets"), (dict(bias_index=index), "needs bias_offsets"),
                       (dict(bias_offsets=37, bias_index=index), "at most T_q·T_kv = 36"),
                       (dict(bias_offsets=5, bias_index=index), "each below bias_offsets 5"),
                       (dict(bias_offsets=6, bias_index=index[:5]), "must be 6 rows"),
                       (dict(bias_offsets=6, bias_index=[r + [0] for r in index]), "of 6 offsets"),
                       (dict(bias_offsets=6, bias_index=[[-1] * 6] * 6), "lists of ints ≥ 0"),
                       (dict(bias_offsets=6, bias_index="x"), "lists of ints ≥ 0")]:
        with pytest.raises(UsageError, match=words):
            validate(_spec(**bad))


class _Tokens(nn.Module):
    """A stem to a 4×4 map, tokens, one LeViT layer, the mean token and a Linear."""

    def __init__(self, layer: nn.Module, out: int = 8):
        super().__init__()
        self.stem, self.layer, self.fc = nn.Conv2d(3, 8, 3, stride=2, padding=1), layer, nn.Linear(out, 2)

    def forward(self, x):
        return self.fc(self.layer(self.stem(x).flatten(2).transpose(1, 2)).mean(1))


def _attention(**kwargs) -> nn.Module:
    return timm.models.levit.Attention(8, key_dim=4, num_heads=2, attn_ratio=2, resolution=4, **kwargs)


def _down(**kwargs) -> nn.Module:
    return timm.models.levit.AttentionDownsample(8, 8, key_dim=4, num_heads=2, attn_ratio=2, resolution=4, **kwargs)


@pytest.mark.parametrize("layer", [lambda: _attention(act_layer=nn.Hardswish), lambda: _down(use_pool=True),
                                   lambda: _down(stride=3), lambda: timm.models.levit.LinearNorm(8, 8)])
def test_levit_layers_parity(layer):
    randomised_parity(_Tokens(layer()))


def _edited(make, edit) -> nn.Module:
    m = make()
    edit(m)
    return _Tokens(m)


@pytest.mark.parametrize("module, words", [
    (lambda: _edited(_attention, lambda m: m.proj.add_module("drop", nn.Dropout())), r"proj has layers"),
    (lambda: _edited(_attention, lambda m: setattr(m.qkv, "bn", nn.Identity())), "nn.BatchNorm1d"),
    (lambda: _edited(_attention, lambda m: setattr(m.proj, "act", nn.Softplus())), "activation Softplus"),
    (lambda: _edited(_down, lambda m: m.q.add_module("act", nn.ReLU())), "q must be timm's Downsample"),
])
def test_unsupported_variants_are_refused_by_name(module, words):
    with pytest.raises(UsageError, match=words) as err:
        from_torch(module(), (3, 8, 8))
    assert "'layer" in str(err.value) and "test_levit.py:" in str(err.value)


def test_convolutional_levit_is_refused_by_name():
    with pytest.raises(UsageError, match="use_conv=False; timm's levit_conv_"):
        from_torch(timm.create_model("levit_conv_128s", img_size=64), (3, 64, 64))


@pytest.mark.slow
def test_levit_128s_at_64():  # depths 2, 3, 4; the second and third stages begin with an AttentionDownsample
    spec = randomised_parity(timm.create_model("levit_128s", img_size=64), (3, 64, 64))
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert len(attends) == 2 + (1 + 3) + (1 + 4) and all(n.get("bias_offsets") for n in attends)
