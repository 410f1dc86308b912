"""Tiny networks of the edge families whose blocks `from_torch` keeps whole in `fx_conv_attention` and `fx_iformer`:
CPUBone's and LowFormer's conv-projected attention (timm's ``ConvAttention``) and iFormer (timm's ``IFormer`` with
its single-head modulation attention). Small enough for every method on real digit tasks
(tests/test_methods_on_graphs.py)."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.layers import GroupNorm1  # noqa: E402
from timm.models import cpubone, lowformer  # noqa: E402
from timm.models.iformer import IFormer  # noqa: E402


class TinyConvAttention(nn.Module):
    """A stem conv (stride `stem_stride`) to a `dim`-channel map, GroupNorm1 and a residual ConvAttention (timm's
    CPUBone or LowFormer class, `family`: CPUBone's with 2×2 kernels and nearest upsampling unless `kwargs` say
    otherwise), the mean and a classifier."""

    def __init__(self, family: str = "cpubone", dim: int = 16, classes: int = 3, in_channels: int = 1,
                 stem_stride: int = 2, **kwargs):
        super().__init__()
        args = {"head_dim_mul": 0.5, "att_stride": 2, "att_kernel": 5, "fuse_out_proj": True}
        if family == "cpubone":
            args.update(small_kernels=True, upsample_mode="nearest")
        self.stem = nn.Conv2d(in_channels, dim, 3, stem_stride, 1)
        self.norm = GroupNorm1(dim)
        self.attn = {"cpubone": cpubone, "lowformer": lowformer}[family].ConvAttention(dim, **{**args, **kwargs})
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.attn(self.norm(x))).mean((2, 3)))


def tiny_iformer(**kwargs) -> nn.Module:
    """timm's IFormer in small: its stride-4 stem to 8 channels, a conv stage, a stage of 16 channels (stride 2)
    holding one attention group (RepCPE, SHMA of dim_attn 16 / `hdrr`, FFN); 3 classes of a 1-channel image."""
    args = dict(in_chans=1, num_classes=3, dims=(8, 16), depths=(1, 3), attn_groups=(0, 1),
                attn_head_dim_reduction=(0, 2), conv_ratio=2, ffn_ratio=2)
    return IFormer(**{**args, **kwargs})


def conv_attention_graph(in_channels: int = 1) -> nn.Module:
    """CPUBone's attention over an 8×8 map: a 5×5 stride-3 projection to 3×3, nearest upsampling to 9×9, a crop."""
    return TinyConvAttention(in_channels=in_channels, stem_stride=1, att_stride=3, small_kernels=False)


def iformer_graph(in_channels: int = 1) -> nn.Module:
    """iFormer whose second stage keeps its first's width (no downsampling): SHMA over a 2×2 map of an 8×8 input."""
    return tiny_iformer(in_chans=in_channels, dims=(8, 8))


def conv_attention_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(conv_attention_graph(input_shape[0]), tuple(input_shape))


def iformer_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(iformer_graph(input_shape[0]), tuple(input_shape))
