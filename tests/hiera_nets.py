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


class TinyHieraDet(nn.Module):
    """SAM 2's HieraDet in small: timm's 3×3 stride-1 patch embedding of 8 channels to a channels-last map, its
    position embedding (a 3×3 grid resized bicubically to the map, plus a 4×4 one tiled over it), three stages of
    one, one and two blocks (1, 2, 4 heads), q-pools of 2 at the first block of stages 2 and 3 (each in the windows
    of the stage before: timm lags the window by a block); on an 8×8 image 4×4 windows on the 8×8 map, then 8×8
    windows padding the 4×4 map (the padded keys join the attention; the pooled output cropped back to 2×2) and the
    2×2 one; timm's head averages the map. `positions` False leaves the position embedding out (any image side)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, positions: bool = True, **kwargs):
        super().__init__()
        from timm.models.hieradet_sam2 import HieraDet
        args = dict(in_chans=in_channels, num_classes=classes, embed_dim=8, num_heads=1, stages=(1, 1, 2), q_pool=2,
                    window_spec=(4, 8, 8), global_att_blocks=(), patch_kernel=(3, 3), patch_stride=(1, 1),
                    patch_padding=(1, 1), global_pos_size=(3, 3))
        self.net, self.positions = HieraDet(**{**args, **kwargs}), positions

    def forward(self, x):
        if self.positions:
            return self.net(x)
        return self.net.head(self.net.blocks(self.net.patch_embed(x)))


def hieradet_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyHieraDet(in_channels=input_shape[0]), tuple(input_shape))
