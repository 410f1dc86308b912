"""Small instances of timm's class-attention and convolutional-attention transformers for from_torch's tests and the
methods' graph runs: CaiT (talking-heads attention, class-attention blocks)."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()


def tiny_cait(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's CaiT in small: a stride-2 patch embedding to (image / 2)² tokens of 8 channels, one talking-heads
    block of 2 heads, one class-attention block."""
    from timm.models.cait import Cait
    args = dict(img_size=image, in_chans=in_channels, patch_size=2, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2,
                depth_token_only=1, mlp_ratio_token_only=2, num_classes=classes)
    return Cait(**{**args, **kwargs})


def cait_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_cait(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))
