"""torchvision's Swin V2 in small, for its parity tests (tests/test_swinv2_torchvision.py) and every method's and
AGS-CL's graph runs."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports


def tiny_tv_swinv2(classes: int = 5, in_chans: int = 3, window: int = 2, patch: int = 2) -> nn.Module:
    """torchvision's SwinTransformer with V2 blocks and merging: 4×4 maps of 2×2 windows (shifted in every second
    block), then 2×2, on an 8×8 image."""
    ensure_torchvision_imports()
    from torchvision.models import swin_transformer as tv

    module = tv.SwinTransformer(patch_size=[patch] * 2, embed_dim=8, depths=[2, 2], num_heads=[2, 2],
                                window_size=[window] * 2, num_classes=classes, block=tv.SwinTransformerBlockV2,
                                downsample_layer=tv.PatchMergingV2)
    if in_chans != 3:
        module.features[0][0] = nn.Conv2d(in_chans, 8, patch, patch)
    return module


def tv_swinv2_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_tv_swinv2(in_chans=input_shape[0]).eval(), tuple(input_shape))
