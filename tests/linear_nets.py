"""Small user networks for the attentions linear in the positions (split from `layer_nets`, which is full):
EfficientViT's (MIT) multi-scale ReLU linear attention block (`TinyEfficientViT`), MobileViTv2's block (the context
vector over the patches, GroupNorm1: `TinyMobileViTv2`) and EdgeNeXt's SDTA block (attention among the channels,
the Fourier position grid: `TinyEdgeNeXt`) and LambdaNetworks' lambda layer (`TinyLambdaNet`). The graph tests run
every method on each. Imports torch and timm."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.efficientvit_mit import EfficientVitBlock  # noqa: E402
from timm.models.edgenext import SplitTransposeBlock  # noqa: E402
from timm.layers.lambda_layer import LambdaLayer  # noqa: E402
from timm.models.mobilevit import MobileVitV2Block  # noqa: E402


class TinyEfficientViT(nn.Module):
    """EfficientViT's block in small: a strided conv stem to a 4×4 map, one timm EfficientVitBlock (LiteMLA: qkv
    1×1 conv, the 5×5 multi-scale aggregation, ReLU linear attention over 2 × width/dim heads, proj with BatchNorm,
    added back; then an MBConv, added back) and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, dim: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.block = EfficientVitBlock(width, head_dim=dim, expand_ratio=2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def efficientvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyEfficientViT(in_channels=input_shape[0]), tuple(input_shape))


class TinyMobileViTv2(nn.Module):
    """MobileViTv2's block in small: a strided conv stem to a 4×4 map, one timm MobileVitV2Block of 2×2 patches (its
    depthwise 3×3 ConvNormAct and 1×1 conv, a LinearTransformerBlock: GroupNorm1, the context vector per patch offset
    times relu(value), ConvMlp; GroupNorm1, conv_proj) and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.block = MobileVitV2Block(width, width, patch_size=2, transformer_depth=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def mobilevit2_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMobileViTv2(in_channels=input_shape[0]), tuple(input_shape))


class TinyEdgeNeXt(nn.Module):
    """EdgeNeXt's SDTA block in small: a strided conv stem to a 4×4 map, one timm SplitTransposeBlock (the map
    chunked into `scales` parts, all but the last through hierarchical depthwise 3×3 convs; the Fourier position
    grid and its 1×1 conv added; LayerNorm, XCA over `heads` heads of channels with their temperatures, layer scale,
    added; LayerNorm, MLP, layer scale, added back) and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, scales: int = 3, heads: int = 2,
                 pos: bool = True, ls: float = 1.0):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.block = SplitTransposeBlock(width, num_scales=scales, num_heads=heads, expand_ratio=2, use_pos_emb=pos,
                                         ls_init_value=ls)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def edgenext_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyEdgeNeXt(in_channels=input_shape[0]), tuple(input_shape))


class TinyLambdaNet(nn.Module):
    """LambdaNetworks' layer in small, as lambda_resnet's SelfAttnBlock uses it: a strided conv stem (BatchNorm,
    ReLU) to a 4×4 map, a 1×1 conv (BatchNorm, ReLU), one timm LambdaLayer (qkv 1×1 conv, q and v BatchNorms, k
    softmaxed over the positions, content and r × r local position lambdas over `heads` query heads; a 2×2 average
    pool where `stride` is 2), BatchNorm, ReLU, a 1×1 conv added back (pooled where strided) and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, heads: int = 4, dim: int = 4,
                 r: int = 3, stride: int = 1, qkv_bias: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.attn = LambdaLayer(width, width, stride=stride, num_heads=heads, dim_head=dim, r=r, qkv_bias=qkv_bias)
        self.post = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 1))
        self.skip = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x)
        return self.head((self.skip(h) + self.post(self.attn(self.conv1(h)))).mean((2, 3)))


def lambda_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyLambdaNet(in_channels=input_shape[0]), tuple(input_shape))
