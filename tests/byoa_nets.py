"""Bottleneck Transformers' self-attention in small (`TinyBotNet`, timm's BottleneckAttn with relative position
logits) and HaloNet's blocked attention (`TinyHaloNet`, timm's HaloAttn), for the method and AGS-CL graph tests and
tests/test_byoa_attention.py, and `deep_parity` for timm's deep networks. Imports torch and timm."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn
from linear_nets import TinyLambdaNet
from torch_nets import classifier_of, randomise_batchnorm, spec_logits

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports
from edgecl.arch.fx_import import tensors_of
from edgecl.train.models import forward, from_numpy

ensure_torchvision_imports()
from timm.layers.bottleneck_attn import BottleneckAttn  # noqa: E402
from timm.layers.halo_attn import HaloAttn  # noqa: E402
from timm.layers.lambda_layer import LambdaLayer  # noqa: E402
from timm.layers.pos_embed_rel import RelPosMlp  # noqa: E402
from timm.models.maxxvit import Attention2d  # noqa: E402


class TinyBotNet(nn.Module):
    """BotNet's block in small, as byobnet's SelfAttnBlock uses it: a strided conv stem (BatchNorm, ReLU) to a 4×4
    map, a 1×1 conv (BatchNorm, ReLU), one timm BottleneckAttn (qkv 1×1 conv, `heads` heads over the whole map with
    relative position logits from learned row and column embeddings; a 2×2 average pool where `stride` is 2),
    BatchNorm, ReLU, a 1×1 conv added back (pooled where strided) and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, heads: int = 4, dim: int = 4,
                 stride: int = 1, scale_pos_embed: bool = False, side: tuple[int, int] = (4, 4),
                 halo: dict | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.attn = BottleneckAttn(width, width, feat_size=side, stride=stride, num_heads=heads, dim_head=dim,
                                   scale_pos_embed=scale_pos_embed) if halo is None else \
            HaloAttn(width, width, stride=stride, num_heads=heads, dim_head=dim, scale_pos_embed=scale_pos_embed,
                     **halo)
        self.post = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 1))
        self.skip = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x)
        h = self.skip(h) + self.post(self.attn(self.conv1(h)))
        return self.fc(h.mean((2, 3)))


class TinyHaloNet(TinyBotNet):
    """`TinyBotNet` with timm's HaloAttn in place of BottleneckAttn: its 4×4 map in 2×2 query blocks, each over the
    4×4 window of its block and a halo of 1 (zeros beyond the map)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, heads: int = 4, dim: int = 4,
                 stride: int = 1, scale_pos_embed: bool = False, block_size: int = 2, halo_size: int = 1,
                 avg_down: bool = False):
        super().__init__(classes, in_channels, width, heads, dim, stride, scale_pos_embed,
                         halo={"block_size": block_size, "halo_size": halo_size, "avg_down": avg_down})


class TinyRelLambdaNet(TinyLambdaNet):
    """`TinyLambdaNet` with the relative position LambdaLayer (r=None: a learned (7, 7, dim) embedding over its 4×4
    map, gathered by index) in place of the local conv lambda."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, heads: int = 4, dim: int = 4):
        super().__init__(classes, in_channels, width, heads, dim)
        self.attn = LambdaLayer(width, width, feat_size=(4, 4), r=None, num_heads=heads, dim_head=dim)


class TinyCoAtMlp(TinyBotNet):
    """`TinyBotNet` with CoAtNet's Attention2d (heads first) and its MLP-generated relative position bias (timm's
    RelPosMlp over the 4×4 map, hidden width 8) in place of BottleneckAttn."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16):
        super().__init__(classes, in_channels, width)
        self.attn = Attention2d(width, width, dim_head=4,
                                rel_pos_cls=partial(RelPosMlp, window_size=(4, 4), hidden_dim=8))


def botnet_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyBotNet(in_channels=input_shape[0]), tuple(input_shape))


def halonet_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyHaloNet(in_channels=input_shape[0]), tuple(input_shape))


def deep_parity(module: nn.Module, side: int) -> None:
    """A deep network with random BatchNorm statistics: its own float32 logits drift from its float64 ones by as
    much as check_parity's 1e-5 (botnet50ts at 64: 1.5e-4 of 17.8, by the seed), so the spec's torch forward is
    held to the module in float64 (1e-9 of the largest logit; measured 1e-13) and ONNX to torch in float32."""
    torch.manual_seed(0)
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), (3, side, side))
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    module = module.double()
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    with torch.no_grad():
        want = module(x.double()).numpy()
        got = forward(spec, from_numpy({k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}),
                      x.double()).numpy()
    assert np.abs(want).max() > 1e-6 and np.abs(got - want).max() <= 1e-9 * max(1.0, np.abs(want).max())
    spec_logits(spec, {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}, x)


def coat_mlp_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyCoAtMlp(in_channels=input_shape[0]), tuple(input_shape))


def rel_lambda_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyRelLambdaNet(in_channels=input_shape[0]), tuple(input_shape))
