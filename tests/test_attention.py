"""Vision Transformers through `from_torch`: tokens as a (C, T, 1) map, class token, position embedding and multi-head
self-attention (timm's Attention kept whole, torch's MultiheadAttention with its packed in_proj) — parity of the
spec's torch forward and its ONNX graph with the real module (custom TinyViT, timm VisionTransformer and DeiT,
torchvision's ViT; the full-size models at 64×64 are slow), the channel-map rules that keep every method correct, the
module's tensors in and out (a position embedding is stored transposed), and refusals by name of the variants edgecl
does not compute."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from layer_nets import TinyViT
from torch_nets import check_parity, randomise_batchnorm, timm, torchvision

from edgecl.arch import channel_map, from_torch
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.errors import UsageError
from edgecl.train.initial import starting_weights

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def _randomise_tokens(module: nn.Module) -> None:
    """Class tokens and position embeddings far from their small starts, so parity sees them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "token" in name or "pos_embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _parity(module: nn.Module, shape: tuple[int, ...]) -> dict:
    torch.manual_seed(0)
    module.eval()
    _randomise_tokens(module)
    randomise_batchnorm(module)  # torchvision's ViT starts its head at 0: all logits 0 would prove nothing
    spec = from_torch(module, shape)
    check_parity(module, spec, shape)
    return spec


def test_tiny_vit_parity_and_its_ops():
    torch.manual_seed(0)
    spec = _parity(TinyViT(3, 3, image=16), (3, 16, 16))
    ops = [n["op"] for n in spec["nodes"]]
    assert ops[:5] == ["conv", "reshape", "reshape", "class_token", "pos_embed"]
    assert ops.count("attention") == 2 and ops[-2:] == ["token", "flatten"] and spec["feature_dim"] == 12
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert attend["heads"] == 2 and attend["scale"] == pytest.approx(6 ** -0.5)


@pytest.mark.parametrize("kwargs", [{}, {"class_token": False, "global_pool": "avg"}, {"no_embed_class": True},
                                    {"init_values": 0.1}])
def test_timm_vision_transformer_parity(kwargs):
    """Class-token and average pooling, DeiT-III's position embedding before the class token, layer scales."""
    spec = _parity(timm.models.vision_transformer.VisionTransformer(**SMALL, **kwargs), (3, 32, 32))
    ops = [n["op"] for n in spec["nodes"]]
    assert ("gap" in ops, "token" in ops) == ((True, False) if kwargs.get("global_pool") else (False, True))


def test_timm_deit_and_torchvision_vit_parity():
    deit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    _parity(deit, (3, 32, 32))
    tv = torchvision.models.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                 num_heads=3, hidden_dim=48, mlp_dim=96,
                                                                 num_classes=5)
    spec = _parity(tv, (3, 32, 32))
    keys = state_keys(spec)
    block = "encoder.layers.encoder_layer_0.self_attention"
    assert keys[f"{block}.in_proj.weight"] == f"{block}.in_proj_weight"
    assert keys[f"{block}.in_proj.bias"] == f"{block}.in_proj_bias"
    assert keys["class_token.weight"] == "class_token"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm vit_tiny_patch16_224", "timm deit_tiny_patch16_224",
                                  "timm deit_tiny_distilled_patch16_224", "timm vit_base_patch16_reg4_gap_256",
                                  "torchvision vit_b_16"])
def test_full_size_vits_at_64(name):
    """The README's targets, built at 64×64 without pretrained weights."""
    library, model = name.split()
    module = timm.create_model(model, img_size=64) if library == "timm" else torchvision.models.vit_b_16(
        image_size=64)
    _parity(module, (3, 64, 64))


def test_channel_map_ties_q_and_k_and_pins_and_orders_qkv():
    spec = from_torch(TinyViT(3, 3, image=16), (3, 16, 16))
    cm = channel_map(spec)
    q, k, v = (cm.spaces[f"blocks.0.attn.{p}"] for p in "qkv")
    assert q == k and q != v  # channel i of q meets channel i of k: one unit
    assert cm.spaces["blocks.0.attn.attend"] == v  # the output's channels are v's
    for segments in (q, v):
        assert {g for g, _ in segments} <= cm.pinned & cm.ordered
    stream = {g for g, _ in cm.spaces["pos_embed"]}
    assert stream == {g for g, _ in cm.rows["pos_embed.weight"]} == {g for g, _ in cm.rows["cls_token.weight"]}
    assert not stream & cm.ordered  # the residual stream may be permuted (LayerNorm pins it, no head splits it)


def test_position_embedding_is_read_and_written_transposed():
    module = TinyViT(3, 3, image=16)
    spec = from_torch(module, (3, 16, 16))
    assert state_shapes(spec)["pos_embed.weight"] == (1, 17, 12) and state_shapes(spec)["cls_token.weight"] == (
        1, 1, 12)
    ours = tensors_of(module, spec)
    assert np.array_equal(ours["pos_embed.weight"], module.pos_embed.detach().numpy()[0].T)
    start = starting_weights(module, spec)
    assert np.array_equal(start.values["pos_embed.weight"], ours["pos_embed.weight"])
    again = starting_weights(start, spec)  # checked again in the module's layout
    assert again.sha256 == start.sha256


class _Wrapped(nn.Module):
    def __init__(self, attention: nn.Module, **call):
        super().__init__()
        self.proj, self.attn, self.call = nn.Conv2d(3, 12, 4, stride=4), attention, call
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.fc(self.attn(x, **self.call)[:, 0])


class _MHA(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention, mask: bool = False):
        super().__init__()
        self.proj, self.mha, self.mask = nn.Conv2d(3, 12, 4, stride=4), mha, mask
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        mask = torch.zeros(4, 4, dtype=torch.bool) if self.mask else None
        y, _ = self.mha(x, x, x, need_weights=False, attn_mask=mask)
        return self.fc(y[:, 0])


@pytest.mark.parametrize("module, words", [
    (lambda: _Wrapped(timm.layers.Attention(12, 2, qk_norm=True, norm_layer=nn.LayerNorm)), "qk-norm"),
    (lambda: _Wrapped(timm.layers.Attention(12, 2), is_causal=True), "causal"),
    (lambda: _MHA(nn.MultiheadAttention(12, 2, batch_first=True), mask=True), "mask"),
    (lambda: _MHA(nn.MultiheadAttention(12, 2)), "batch_first"),
])
def test_unsupported_attention_is_refused_by_name(module, words):
    net = module()
    with pytest.raises(UsageError, match=words) as err:
        from_torch(net, (3, 32, 32) if isinstance(net, timm.models.VisionTransformer) else (3, 8, 8))
    assert ".py:" in str(err.value)  # the user's (or the library's) source line


def test_mha_parity():
    """torch's MultiheadAttention (packed in_proj, out_proj) on tokens, without a class token."""
    torch.manual_seed(0)
    module = _MHA(nn.MultiheadAttention(12, 3, batch_first=True))
    _parity(module, (3, 8, 8))


class _ChannelsLastMean(nn.Module):
    """ConvNeXt's channels-last map (B, H, W, C), then a mean over dim 1 (the rows only) or x[:, 0] (the first row):
    no tokens, so no class-token pooling or token mean — the map's own refusal."""

    def __init__(self, index: bool):
        super().__init__()
        self.conv, self.norm, self.index = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8), index
        self.fc = nn.Linear(8 * 8, 2)

    def forward(self, x):
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.fc((y[:, 0] if self.index else y.mean(1)).flatten(1))


@pytest.mark.parametrize("index", [False, True])
def test_a_channels_last_map_is_no_token_sequence(index):
    """mean(1) of a (B, H, W, C) map averages the rows only; it must not become the mean over all positions."""
    with pytest.raises(UsageError, match="channels-last") as err:
        from_torch(_ChannelsLastMean(index), (3, 8, 8))
    assert "test_attention.py:" in str(err.value)


def test_rgo_keeps_attention_channels_in_one_order_and_says_why():
    """q, k and v are read as heads of contiguous channels: no FEL, and the reason names attention (not ECA); the
    residual stream and the MLP's hidden channels are permuted."""
    from edgecl.train import registry

    plan = registry.create("rgo", from_torch(TinyViT(3, 3, image=16), (3, 16, 16)), {}).fel
    assert set(plan.groups) == {"patch", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    attention = [g for g in plan.skipped if ".attn.qkv:" in g]
    assert len(attention) == 4 and all("attention" in plan.skipped[g] for g in attention)


def test_attention_scores_are_bounded_and_counted():
    """heads × T² scores are no node's output: a small file must not ask for gigabytes (16 heads over 2¹⁴ tokens:
    16 GiB per sample), and the runtime's memory estimate counts them."""
    from edgecl.arch import validate
    from edgecl.runtime.costs import activation_bytes

    def spec(tokens: int) -> dict:
        return {"name": "wide", "input_shape": [16, tokens, 1], "output": "f", "nodes": [
            {"name": "a", "op": "attention", "inputs": ["input"] * 3, "heads": 16, "scale": 1.0},
            {"name": "p", "op": "token", "inputs": ["a"]}, {"name": "f", "op": "flatten", "inputs": ["p"]}]}

    with pytest.raises(UsageError, match=r"attention over \[16384, 1\] query and \[16384, 1\] key positions "
                                         "with 16 heads"):
        validate(spec(1 << 14))
    assert activation_bytes(validate(spec(1 << 10)), 1, 2) > 4 * 2 * 16 * (1 << 20)  # scores and softmax


class _TokenMixing(nn.Module):
    """MLP-Mixer's token mixing: an nn.Linear over the tokens of a flattened (B, C, T) map."""

    def __init__(self):
        super().__init__()
        self.proj, self.mix, self.fc = nn.Conv2d(3, 12, 4, stride=4), nn.Linear(4, 4), nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(self.mix(self.proj(x).flatten(2)).transpose(1, 2).mean(1))


def test_a_linear_over_the_tokens_is_refused_by_name():
    with pytest.raises(UsageError, match="nn.Linear over the last axis") as err:
        from_torch(_TokenMixing(), (3, 8, 8))
    assert "'mix'" in str(err.value) and "test_attention.py:" in str(err.value)


class _TokenCopies(nn.Module):
    """A class token expanded to two copies (expand(B, 2, -1)): two tokens in the mean, not one."""

    def __init__(self):
        super().__init__()
        self.proj, self.fc = nn.Conv2d(3, 12, 4, stride=4), nn.Linear(12, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, 12))

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        return self.fc(torch.cat([self.cls.expand(t.shape[0], 2, -1), t], dim=1).mean(1))


def test_copies_of_a_class_token_are_refused():
    with pytest.raises(UsageError, match="put before 4 tokens gives") as err:
        from_torch(_TokenCopies(), (3, 8, 8))
    assert "test_attention.py:" in str(err.value)


class _Underscored(nn.Module):
    """A layer named with a trailing underscore, as Python style allows: its keys are ``conv_.weight``."""

    def __init__(self):
        super().__init__()
        self.conv_, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv_(x).mean((2, 3)))


def test_a_trailing_underscore_is_an_ordinary_path_and_mha_keeps_its_packed_keys():
    spec = _parity(_Underscored(), (3, 8, 8))
    assert state_keys(spec)["conv_.weight"] == "conv_.weight"
    keys = state_keys(_parity(_MHA(nn.MultiheadAttention(12, 3, batch_first=True)), (3, 8, 8)))
    assert keys["mha.in_proj.weight"] == "mha.in_proj_weight" and keys["mha.in_proj.bias"] == "mha.in_proj_bias"
