"""A tiny MLP-Mixer built from timm's own MixerBlock: a patch stem to 16 tokens, one block whose token-mixing MLP is
two Linears over the tokens of ``x.transpose(1, 2)`` (`token_mix` nodes) and whose channel MLP is two Linears over
the channels, a LayerNorm, the token average, the classifier; small enough for every method on real digit tasks
(tests/test_methods_on_graphs.py, tests/test_agscl_graphs.py). Its LayerNorms are drawn at random (a fresh one is
the identity, which would hide it)."""
from __future__ import annotations

import torch
from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.mlp_mixer import MixerBlock  # noqa: E402


class TinyMixer(nn.Module):
    """Conv stem of 2×2 patches (8×8 → 16 tokens), a MixerBlock (token MLP 16 → 8 → 16, channel MLP), LayerNorm,
    the average over the tokens, the classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 2, stride=2)
        self.block = MixerBlock(width, 16, mlp_ratio=(0.5, 2.0))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    g = torch.Generator().manual_seed(len(name))
                    p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("weight") else 0.0))

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.fc(self.norm(self.block(tokens)).mean(dim=1))


def mixer_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMixer(in_channels=input_shape[0]), tuple(input_shape))
