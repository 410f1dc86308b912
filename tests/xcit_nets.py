"""A tiny XCiT (timm's ``timm.models.xcit`` layers) for the method, AGS-CL and parity tests."""
from __future__ import annotations

from torch import nn

from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()

import torch  # noqa: E402
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier, XCABlock  # noqa: E402

from edgecl.arch import from_torch  # noqa: E402


class TinyXCiT(nn.Module):
    """XCiT in small: a strided conv stem (BatchNorm) to a 4×4 patch map, its tokens plus the Fourier position
    encoding (grid and 1×1 conv) read at the map's sizes, `depth` XCABlocks (LayerNorm, XCA over `heads` heads of
    channels with their temperatures, LPI's two depthwise 3×3 convs with GELU and BatchNorm on the token grid, MLP,
    each with its layer scale); then, with `class_layers`, a class token prepended, that many CaiT class-attention
    blocks (the class token's query over every token; `tokens_norm` normalises every token before the MLP, else the
    class token only), a LayerNorm and the class token; without, the tokens' mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, heads: int = 2, depth: int = 1,
                 hidden: int = 8, class_layers: int = 1, tokens_norm: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width))
        self.pos = PositionalEncodingFourier(hidden_dim=hidden, dim=width)
        self.blocks = nn.ModuleList(XCABlock(width, heads, mlp_ratio=2.0) for _ in range(depth))
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02) if class_layers else None
        self.cls_blocks = nn.ModuleList(ClassAttentionBlock(width, heads, mlp_ratio=2.0, tokens_norm=tokens_norm)
                                        for _ in range(class_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x)
        batch, height, width = h.shape[0], h.shape[2], h.shape[3]
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.pos(batch, height, width).reshape(batch, -1, tokens.shape[1]).permute(0, 2, 1)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        if self.cls_token is None:
            return self.head(tokens.mean(1))
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        for block in self.cls_blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


def xcit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyXCiT(in_channels=input_shape[0]), tuple(input_shape))
