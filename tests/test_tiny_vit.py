"""TinyViT through `from_torch`: timm's TinyVitBlock kept whole — window attention with LeViT's attention biases per
window (or over the whole map where it is one window), the depthwise local conv between attention and MLP, NormMlp —
with parity of the spec's torch forward and ONNX graph against timm's TinyVit (biases randomised: timm starts them
at 0), refusals by name, and timm's tiny_vit_5m_224 at 224 (slow)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, timm

from edgecl.arch import from_torch
from edgecl.errors import UsageError

TinyVit = timm.models.tiny_vit.TinyVit


def _randomised(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    randomise_batchnorm(module)
    for name, p in module.named_parameters():
        if name.endswith("attention_biases"):
            nn.init.normal_(p)
    return module.eval()


def _small(**kwargs) -> nn.Module:  # stage maps 8 (MBConv), 4 (2×2 windows), 2 (one window)
    args = dict(embed_dims=(8, 16, 16), depths=(1, 1, 2), num_heads=(1, 2, 2), window_sizes=(2, 2, 2),
                num_classes=5, **kwargs)
    return _randomised(TinyVit(**args))


def test_tiny_vit_parity_windows_and_biases():
    module = _small()
    spec = from_torch(module, (3, 32, 32))
    check_parity(module, spec, (3, 32, 32), batch=2)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [n.get("window") for n in attends] == [[2, 2], None, None]  # a 4×4 map in windows, then 2×2 maps whole
    assert all(n["bias_offsets"] == 4 and "bias_table" not in n for n in attends)  # LeViT's (heads, offsets)


def _edited(edit) -> nn.Module:
    module = _small()
    edit(module.stages[1].blocks[0])
    return module


@pytest.mark.parametrize("make, words", [
    (lambda: _randomised(TinyVit(embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2),
                                 window_sizes=(2, 4))), "4×4 windows do not tile the 6×6 map"),
    (lambda: _edited(lambda b: setattr(b.local_conv, "act", nn.ReLU())), "local_conv must be timm's ConvNorm"),
    (lambda: _edited(lambda b: setattr(b.local_conv, "bn", nn.GroupNorm(1, 16))), "local_conv must be timm's ConvNorm"),
    (lambda: _edited(lambda b: setattr(b.mlp, "act", nn.Softplus())), "act is a Softplus"),
    (lambda: _edited(lambda b: setattr(b.attn, "norm", nn.Identity())), "'stages.1.blocks.0.attn.norm'"),
    (lambda: _edited(lambda b: setattr(b, "attn", nn.Identity())), "its attn is a Identity"),  # it runs: no attention
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    side = 48 if "6×6" in words else 32
    with pytest.raises(UsageError, match=words) as err:
        from_torch(make(), (3, side, side))
    assert "TinyVitBlock" in str(err.value) and "tiny_vit.py:" in str(err.value)


@pytest.mark.slow
def test_tiny_vit_5m_at_224():  # stage maps 56 (MBConv), 28 (7×7 windows), 14 (one 14×14 window), 7 (one window)
    module = _randomised(timm.create_model("tiny_vit_5m_224"))
    spec = from_torch(module, (3, 224, 224))
    check_parity(module, spec, (3, 224, 224), batch=2)
    assert [n.get("window") for n in spec["nodes"] if n["op"] == "attention"] == [[7, 7]] * 2 + [None] * 8
