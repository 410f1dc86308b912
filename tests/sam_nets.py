"""SAM's ViT in small (timm's ``VisionTransformerSAM``: window blocks on a zero-padded map, global blocks, decomposed
relative positions, the conv + LayerNorm2d neck), for tests/test_sam.py and the method and AGS-CL graph tests.
Imports torch and timm."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.vision_transformer_sam import VisionTransformerSAM  # noqa: E402


def tiny_sam(in_channels: int = 1, image: int = 8, classes: int = 3, **kwargs) -> nn.Module:
    """Patches of 2 (a 4×4 map of 16 channels at 8×8), 2 heads, block 0 in 3×3 windows (the map padded to 6×6: four
    windows, most of their positions padding), block 1 global, relative positions, a neck of 8 channels; `kwargs`
    override VisionTransformerSAM's arguments."""
    args = dict(img_size=image, patch_size=2, in_chans=in_channels, num_classes=classes, embed_dim=16, depth=2,
                num_heads=2, mlp_ratio=2.0, window_size=3, global_attn_indexes=(1,), use_rel_pos=True, neck_chans=8)
    return VisionTransformerSAM(**{**args, **kwargs})


def sam_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_sam(in_channels=input_shape[0], image=input_shape[1]).eval(), tuple(input_shape))
