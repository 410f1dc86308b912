"""Tiny MLP nets built from timm's own blocks, small enough for every method on real digit tasks
(tests/test_methods_on_graphs.py, tests/test_agscl_graphs.py):

- TinyMixer (MixerBlock): a patch stem to 16 tokens, one block whose token-mixing MLP is two Linears over the tokens
  of ``x.transpose(1, 2)`` (`token_mix` nodes) and whose channel MLP is two Linears over the channels;
- TinyResMLP (ResBlock): Affine norms (``torch.addcmul(beta, alpha, x)``: `affine` nodes), one Linear over the
  tokens, layer scales;
- TinyGMLP (SpatialGatingBlock): gMLP's spatial gating, ``u, v = x.chunk(2, dim=-1)`` of the channels of tokens, a
  LayerNorm and a Linear over the tokens of v, the product u · v;
- TinyMambaOut (GatedConvBlock, Downsample): channels-last maps split into three channel parts
  (``torch.split(x, [g, i, c], dim=-1)``), a depthwise conv on the permuted c, ``cat((i, c), -1)``, act(g) times it,
  a layer scale.

Their norms, affines, layer scales and gMLP's token mixing (timm starts it at std 1e-6) are drawn at random (a fresh
one is the identity or nearly nothing, which would hide it)."""
from __future__ import annotations

import torch
from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.mambaout import Downsample, GatedConvBlock  # noqa: E402
from timm.models.mlp_mixer import Affine, MixerBlock, ResBlock, SpatialGatingBlock  # noqa: E402


def _draw(module: nn.Module, names: tuple[str, ...]) -> None:
    """Parameters whose path holds one of `names` drawn around their kind's start (1 for weights and scales, 0
    otherwise), seeded by the path."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                g = torch.Generator().manual_seed(len(name))
                one = name.endswith(("weight", "alpha")) or name.rpartition(".")[2].startswith(("ls", "gamma"))
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if one and p.dim() == 1 or
                                                                  name.endswith("alpha") else 0.0))


class _TokenNet(nn.Module):
    """Conv stem of 2×2 patches (8×8 → 16 tokens), `block`, a final norm, the average over the tokens, the
    classifier."""

    def __init__(self, block: nn.Module, norm: nn.Module, classes: int, in_channels: int, width: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 2, stride=2)
        self.block, self.norm = block, norm
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.fc(self.norm(self.block(tokens)).mean(dim=1))


class TinyMixer(_TokenNet):
    """A MixerBlock (token MLP 16 → 8 → 16, channel MLP), LayerNorm."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16):
        super().__init__(MixerBlock(width, 16, mlp_ratio=(0.5, 2.0)), nn.LayerNorm(width), classes, in_channels,
                         width)
        _draw(self, ("norm",))


class TinyResMLP(_TokenNet):
    """A ResBlock (Affine, token Linear 16 → 16, layer scales, channel MLP), Affine."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16):
        super().__init__(ResBlock(width, 16, mlp_ratio=2, init_values=0.5), Affine(width), classes, in_channels,
                         width)
        _draw(self, ("norm", "ls1", "ls2"))


class TinyGMLP(_TokenNet):
    """A SpatialGatingBlock (LayerNorm, fc1 16 → 32, GELU, the gate: 16 channels u times the token mix of 16
    channels v, fc2), LayerNorm."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16):
        super().__init__(SpatialGatingBlock(width, 16, mlp_ratio=2), nn.LayerNorm(width), classes, in_channels,
                         width)
        _draw(self, ("norm",))
        with torch.no_grad():
            self.block.mlp_channels.gate.proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))


class TinyMambaOut(nn.Module):
    """Conv stem (8×8 → 4×4) put channels-last; a GatedConvBlock of 8 channels (fc1 8 → 32, split 16 / 12 / 4, a
    3×3 depthwise conv on the 4, layer scale); timm's Downsample to 16 channels (2×2); a second block; the mean over
    the map, LayerNorm, the classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 2, stride=2)
        self.block1 = GatedConvBlock(width, expansion_ratio=2, kernel_size=3, conv_ratio=0.5, ls_init_value=0.5)
        self.down = Downsample(width, 2 * width)
        self.block2 = GatedConvBlock(2 * width, expansion_ratio=1, kernel_size=3, conv_ratio=0.25)
        self.norm = nn.LayerNorm(2 * width)
        self.fc = nn.Linear(2 * width, classes)
        _draw(self, ("norm", "ls.gamma"))

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x).permute(0, 2, 3, 1))))
        return self.fc(self.norm(x.mean((1, 2))))


def mixer_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMixer(in_channels=input_shape[0]), tuple(input_shape))


def resmlp_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyResMLP(in_channels=input_shape[0]), tuple(input_shape))


def gmlp_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyGMLP(in_channels=input_shape[0]), tuple(input_shape))


def mambaout_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMambaOut(in_channels=input_shape[0]), tuple(input_shape))
