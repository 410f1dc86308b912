"""Tiny Hiera networks (timm's ``timm.models.hiera``): its unroll, mask-unit attention and q-pooling in small,
small enough for every method on real digit tasks (tests/test_methods_on_graphs.py)."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.hiera import Hiera  # noqa: E402


def tiny_hiera(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's Hiera in small: a 3×3 stride-1 patch embedding of 8 channels (an image² token grid), three stages of
    one block (1, 2, 4 heads), two unrolls of stride 2 and 4×4 mask units: stage 1 attends in the 4×4 units of the
    8×8 map, stage 2's block pools q to 2×2 in each unit (its residual max-pooled) and stage 3's pools q again, to
    one token in each 2×2 unit of the 4×4 map (timm lags mask-unit attention by a block); the head averages the
    tokens."""
    args = dict(img_size=image, in_chans=in_channels, num_classes=classes, embed_dim=8, num_heads=1,
                stages=(1, 1, 1), q_pool=2, mask_unit_size=(4, 4), mask_unit_attn=(True, True, False),
                patch_kernel=(3, 3), patch_stride=(1, 1), patch_padding=(1, 1), mlp_ratio=2.0)
    return Hiera(**{**args, **kwargs})


def hiera_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_hiera(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))
