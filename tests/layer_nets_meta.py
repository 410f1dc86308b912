"""A tiny MetaFormer v2 (timm's PoolFormerV2 / ConvFormer / CAFormer in small) built from timm's own blocks: bias-less
norms (LayerNorm2dNoBias, GroupNorm1NoBias), StarReLU (s·relu(x)² + b), a pooling token mixer (avg-pool − x), a
SepConv mixer, res and layer scales, and a squared-ReLU head MLP; small enough for every method on real digit tasks
(tests/test_methods_on_graphs.py, tests/test_agscl_graphs.py). Its learned numbers are drawn at random (a fresh
module's norms are 1, StarReLU 1 and 0, res scales 1, which would hide them)."""
from __future__ import annotations

import torch
from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.metaformer import (Attention, Downsampling, GroupNorm1NoBias, LayerNorm2dNoBias,  # noqa: E402
                                    LayerNormNoBias, MetaFormerBlock, Pooling, SepConv, SquaredReLU)


class TinyMetaFormer(nn.Module):
    """Conv stem + LayerNorm2dNoBias; a PoolFormerV2 block (GroupNorm1NoBias, pooling mixer, StarReLU MLP, res
    scales); a downsampling (bias-less norm, strided conv); a ConvFormer block (SepConv mixer with StarReLU, layer
    scales); global average, a squared-ReLU layer, the classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.stem_norm = LayerNorm2dNoBias(width)
        self.pool_block = MetaFormerBlock(width, token_mixer=Pooling, norm_layer=GroupNorm1NoBias,
                                          res_scale_init_value=1.0)
        self.down = Downsampling(width, 2 * width, kernel_size=3, stride=2, padding=1, norm_layer=LayerNorm2dNoBias)
        self.conv_block = MetaFormerBlock(2 * width, token_mixer=SepConv, norm_layer=LayerNorm2dNoBias,
                                          layer_scale_init_value=0.5)
        self.hidden = nn.Linear(2 * width, 2 * width)
        self.act = SquaredReLU()
        self.fc = nn.Linear(2 * width, classes)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1 and not name.endswith(("stem.bias", "hidden.bias", "fc.bias")):  # norms, scales
                    g = torch.Generator().manual_seed(len(name))
                    p.copy_(0.2 * torch.randn(p.shape, generator=g) + (0.0 if name.endswith("act.bias") else 1.0))

    def forward(self, x):
        h = self.conv_block(self.down(self.pool_block(self.stem_norm(self.stem(x)))))
        return self.fc(self.act(self.hidden(h.mean((2, 3)))))


def metaformer_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMetaFormer(in_channels=input_shape[0]), tuple(input_shape))


class TinyCAFormer(nn.Module):
    """CAFormer's attention stage in small: a map flattened to tokens (reshape + transpose, as MetaFormerStage), one
    block of LayerNormNoBias, MetaFormer's own Attention and a StarReLU Linear MLP with res scales, back to a map."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.block = MetaFormerBlock(width, token_mixer=Attention, norm_layer=LayerNormNoBias, use_nchw=False,
                                     res_scale_init_value=1.0, head_dim=8)
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1 and not name.endswith(("stem.bias", "fc.bias")):
                    g = torch.Generator().manual_seed(len(name))
                    p.copy_(0.2 * torch.randn(p.shape, generator=g) + (0.0 if name.endswith("act.bias") else 1.0))

    def forward(self, x):
        h = self.stem(x)
        b, c, height, width = h.shape
        tokens = self.block(h.reshape(b, c, -1).transpose(1, 2))
        return self.fc(tokens.transpose(1, 2).reshape(b, c, height, width).mean((2, 3)))
