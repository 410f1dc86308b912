"""MViTv2 in small (timm's ``MultiScaleVit``: pooling attention with per-head depthwise convs and LayerNorms shared
by the heads, decomposed relative positions over pooled q and k, residual pooling, max-pooled shortcuts), for
tests/test_mvit.py and the method and AGS-CL graph tests. Imports torch and timm."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg  # noqa: E402


def tiny_mvit(in_channels: int = 1, image: int = 16, classes: int = 3, **cfg) -> nn.Module:
    """Patches of stride 2 (an 8×8 map of 8 channels at 16×16), two stages (1 and 2 blocks; 2 then 4 heads of 4
    channels; the second stage's queries pooled by 2), keys and values pooled by 4 then 2; `cfg` overrides
    MultiScaleVitCfg's fields."""
    args = dict(depths=(1, 2), embed_dim=8, num_heads=2, patch_kernel=(3, 3), patch_stride=(2, 2),
                patch_padding=(1, 1), stride_q=((1, 1), (2, 2)), stride_kv_adaptive=(4, 4))
    return MultiScaleVit(MultiScaleVitCfg(**{**args, **cfg}), img_size=image, in_chans=in_channels,
                         num_classes=classes)


def graph_mvit(in_channels: int = 1, image: int = 8, **cfg) -> nn.Module:
    """`tiny_mvit` for the method graph tests at 8×8: keys pooled by 2 (a 4×4 map's keys pooled by 4 would be one
    key, whose norm_k no gradient reaches: the softmax over one key is 1)."""
    return tiny_mvit(in_channels=in_channels, image=image, stride_kv_adaptive=(2, 2), **cfg)


def mvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(graph_mvit(input_shape[0], input_shape[1]).eval(), tuple(input_shape))


def mvit_cls_spec(input_shape=(1, 8, 8)) -> dict:
    """`graph_mvit` with a class token (the classifier reads it)."""
    return from_torch(graph_mvit(input_shape[0], input_shape[1], use_cls_token=True).eval(), tuple(input_shape))
