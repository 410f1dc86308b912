"""MLP-Mixer's token mixing (`edgecl.arch.fx_token_mix`, the ``token_mix`` op): parity of a tiny Mixer built from timm's
MixerBlock (torch forward and ONNX Runtime = the module), the spec it becomes (token mixing Linears as ``token_mix``
nodes whose weights are no channel's), the constants rule compaction reads, what is refused on tokens swapped to
(B, C, T), and timm's mixer_s16_224 whole (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets_mixer import TinyMixer
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, randomised_parity

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.spec import rowless_tensors
from edgecl.errors import UsageError
from edgecl.graph.constants import channel_constants


def test_tiny_mixer_computes_the_module():
    spec = randomised_parity(TinyMixer(in_channels=3), (3, 8, 8))
    mixes = [n for n in spec["nodes"] if n["op"] == "token_mix"]
    assert [(n["name"], n["in"], n["out"], n["bias"]) for n in mixes] == [
        ("block.mlp_tokens.fc1", 16, 8, True), ("block.mlp_tokens.fc2", 8, 16, True)]
    # the token MLP's weights are over token positions: no channel's rows, so no node mask or cut reaches them
    cm = channel_map(spec)
    assert {f"{n['name']}.{k}" for n in mixes for k in ("weight", "bias")} <= set(rowless_tensors(spec))
    assert not any(k.startswith("block.mlp_tokens") for k in cm.rows)


def _mix_spec(bias: bool) -> dict:
    return validate({"name": "mix", "input_shape": [2, 4, 1], "nodes": [
        {"name": "m", "op": "token_mix", "inputs": ["input"], "in": 4, "out": 3, "bias": bias},
        {"name": "f", "op": "flatten", "inputs": ["m"]}]})


@pytest.mark.parametrize("bias", [False, True])
def test_a_channel_constant_over_the_tokens_is_constant_after_a_mix_only_where_every_token_agrees(bias):
    spec = _mix_spec(bias)
    params = {"m.weight": np.array([[1, 1, 0, 0], [0, 0, 2, 0], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)}
    if bias:
        params["m.bias"] = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    values = channel_constants(spec, params, channel_map(spec))
    # row sums are all 2: a channel holding c at every token is 2c (+ 0.5) at every output token
    got = _mix_constants(spec, params, [3.0, 0.0])
    assert got.tolist() == ([6.5, 0.5] if bias else [6.0, 0.0])
    params["m.weight"][0, 0] = 3.0  # row sums 4, 2, 2: a channel of c ≠ 0 varies, 0 stays 0 (+ b where b agrees)
    got = _mix_constants(spec, params, [3.0, 0.0])
    assert np.isnan(got[0]) and got[1] == (0.5 if bias else 0.0)
    assert np.isnan(values["m"]).all()  # the network input varies, and so does its mix


def _mix_constants(spec: dict, params: dict, channels: list[float]) -> np.ndarray:
    from edgecl.graph import constants

    return constants._token_mix_constants(spec["nodes"][0], np.array(channels), params)


class _Swapped(nn.Module):
    """Tokens swapped to (B, C, T), then `how` applied there."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(1, 4, 2, stride=2)
        self.mix = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.gamma = nn.Parameter(torch.ones(16))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        swapped = tokens.transpose(1, 2)
        if self.how == "norm":  # a LayerNorm over the tokens
            swapped = self.norm(swapped)
        elif self.how == "param":  # a parameter meets the tokens, not the channels
            swapped = swapped * self.gamma
        elif self.how == "sum":  # a reduction over the tokens: not followed there
            return self.fc(swapped.sum(dim=2))
        return self.fc(self.mix(swapped).transpose(1, 2).mean(dim=1))


@pytest.mark.parametrize("how, where", [("norm", "norm"), ("param", "mul"), ("sum", "sum")])
def test_other_ops_on_tokens_swapped_to_token_last_are_refused_by_name(how, where):
    with pytest.raises(UsageError, match=rf"unsupported op .*{where}.*transpose\(1, 2\)"):
        from_torch(_Swapped(how), (1, 8, 8))


def test_a_token_mix_alone_goes_in():
    randomised_parity(_Swapped("plain"), (1, 8, 8))


@pytest.mark.slow
def test_timm_mixer_s16_computes_the_module():
    import timm

    torch.manual_seed(0)
    module = timm.create_model("mixer_s16_224", pretrained=False, img_size=64, num_classes=10).eval()
    with torch.no_grad():  # timm starts the head at zero: every logit 0, which any trunk would match
        module.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    spec = from_torch(module, (3, 64, 64))
    randomise_batchnorm(module)
    check_parity(module, spec, (3, 64, 64), batch=2)
    assert sum(n["op"] == "token_mix" for n in spec["nodes"]) == 16  # 8 blocks × (fc1, fc2)
