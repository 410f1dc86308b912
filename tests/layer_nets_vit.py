"""Tiny networks for the Vision Transformers whose blocks `from_torch` follows beyond `layer_nets`: FastViT's
attention stage (multi-head self-attention over a map's positions written in forward), PiT (class tokens split
off, the rest pooled as a map, tokens joined again), EfficientViT-MSRA's cascaded window attention, Twins
(window attention on zero-padded maps, sub-sampled keys and values) and DaViT (window attention on zero-padded maps,
channel attention kᵀv applied to q) and PVT v2 (keys and values of a reduced map, a depthwise conv in the MLP). Small
enough for every method on real digit tasks (tests/test_methods_on_graphs.py)."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.davit import DaVit  # noqa: E402
from timm.models.efficientvit_msra import ConvMlp, LocalWindowAttention  # noqa: E402
from timm.models.fastvit import Attention as FastVitAttention  # noqa: E402
from timm.models.fastvit import AttentionBlock, RepConditionalPosEnc  # noqa: E402
from timm.models.pit import PoolingVisionTransformer  # noqa: E402
from timm.models.twins import Twins  # noqa: E402


class TinyFastViT(nn.Module):
    """FastViT's attention stage in small: a strided conv stem, its conditional position encoding (a depthwise conv
    added to the map), timm's AttentionBlock (BatchNorm, the attention of 2 heads of 16 channels over the 4×4
    positions, layer scale, ConvMlp) and average pooling. (timm builds the block's attention with heads of 32
    channels; it is replaced.)"""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 32, heads: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.pos = RepConditionalPosEnc(width, spatial_shape=(3, 3))
        self.block = AttentionBlock(width, mlp_ratio=2.0, layer_scale_init_value=0.5)
        self.block.token_mixer = FastVitAttention(width, head_dim=width // heads, qkv_bias=True)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.block(self.pos(self.stem(x))).mean((2, 3)))


def fastvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyFastViT(in_channels=input_shape[0]), tuple(input_shape))


def tiny_pit(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's PoolingVisionTransformer in small: 2×2 patches to a 4×4 grid, a stage of one block, the pooling (a
    strided depthwise conv on the map, the class token's own Linear) to 2×2, a second stage, the class token's
    head."""
    args = dict(img_size=image, patch_size=2, stride=2, base_dims=(4, 4), depth=(1, 1), heads=(2, 4),
                mlp_ratio=2, num_classes=classes, in_chans=in_channels, **kwargs)
    return PoolingVisionTransformer(**args)


def pit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_pit(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


class TinyEfficientViTMsra(nn.Module):
    """EfficientViT-MSRA's window attention in small: a strided conv stem to a 4×4 map, timm's LocalWindowAttention
    of 2 cascaded heads (key 4, value 8, 3×3 depthwise conv on q, LeViT's biases) over a 5×5 window (the map padded
    to it with zeros that join the attention, then cropped) added back, its block's ConvMlp (1×1 ConvNorm, ReLU, 1×1
    ConvNorm) added back, and the mean. With ``window`` 3 the 4×4 map is padded to 6×6: four windows, each head's
    depthwise conv on q and its attention run in each on its own (a conv ``window``)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 16, window: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.mixer = LocalWindowAttention(width, key_dim=4, num_heads=2, attn_ratio=2, resolution=max(window, 4),
                                          window_resolution=window, kernels=(3, 3))
        self.ffn = ConvMlp(width, 2 * width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mixer(x)
        return self.fc((x + self.ffn(x)).mean((2, 3)))


def efficientvit_msra_spec(input_shape=(1, 8, 8), window: int = 5) -> dict:
    return from_torch(TinyEfficientViTMsra(in_channels=input_shape[0], window=window), tuple(input_shape))


def efficientvit_msra_windows_spec(input_shape=(1, 8, 8)) -> dict:
    """Several windows (`TinyEfficientViTMsra` with window 3)."""
    return efficientvit_msra_spec(input_shape, window=3)


def tiny_twins(classes: int = 3, in_channels: int = 1, image: int = 8, window: int = 3, sr: int = 2,
               **kwargs) -> nn.Module:
    """timm's Twins (SVT) in small: 2×2 patches to a 4×4 map of 8 channels, a locally grouped attention over
    `window`² windows (3: the map zero-padded to 6×6, four windows; 2: four exact ones; 4: one), PosConv, a global
    sub-sampled attention whose keys and values come from the map reduced by `sr`; a second stage on the 2×2 map
    (16 channels, 2 heads, window 2, keys and values of every token); the mean of the tokens."""
    args = dict(img_size=image, patch_size=2, in_chans=in_channels, num_classes=classes, embed_dims=(8, 16),
                num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 2), wss=(window, 2), sr_ratios=(sr, 1))
    return Twins(**{**args, **kwargs})


def twins_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_twins(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def tiny_davit(classes: int = 3, in_channels: int = 1, image: int = 8, window: int = 3, **kwargs) -> nn.Module:
    """timm's DaViT in small: its stride-4 stem to an (image / 4)² map of 8 channels, a spatial block (window
    attention over `window`² windows: 3 pads the 2×2 map of an 8-pixel image to 3×3) and a channel block (1 head);
    a second stage of 16 channels (2 heads) on the halved map; LayerNorm'd mean of the map and the classifier."""
    args = dict(in_chans=in_channels, num_classes=classes, depths=(1, 1), embed_dims=(8, 16), num_heads=(1, 2),
                window_size=window, mlp_ratio=2)
    return DaVit(**{**args, **kwargs})


def davit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_davit(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def tiny_nest(classes: int = 3, in_channels: int = 1, image: int = 8, pad_type: str = "", **kwargs) -> nn.Module:
    """timm's NesT in small: a stride-2 patch embedding to an (image / 2)² map of 8 channels, cut into four blocks
    (window attention per block, 1 head, its block-ordered position embedding), then a ConvPool (conv, channels'
    LayerNorm, max pool; `pad_type` "same" pools as TensorFlow) to 16 channels (2 heads) in one block."""
    from timm.models.nest import Nest
    args = dict(img_size=image, in_chans=in_channels, patch_size=2, num_levels=2, embed_dims=(8, 16),
                num_heads=(1, 2), depths=(1, 1), mlp_ratio=2, num_classes=classes, pad_type=pad_type)
    return Nest(**{**args, **kwargs})


def nest_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_nest(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def tiny_pvt(classes: int = 3, in_channels: int = 1, **kwargs) -> nn.Module:
    """timm's PVT v2 in small (any input size): its 7×7 stride-4 patch embedding to a quarter-side map of 8
    channels, a block whose
    keys and values come from the map reduced by sr 2 (1 head), then a stride-2 downsample to 16 channels (2 heads,
    keys and values of every position); each block's MLP with its 3×3 depthwise conv; the mean of the map."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    args = dict(in_chans=in_channels, num_classes=classes, depths=(1, 1), embed_dims=(8, 16), num_heads=(1, 2),
                sr_ratios=(2, 1), mlp_ratios=(2, 2))
    return PyramidVisionTransformerV2(**{**args, **kwargs})


def pvt_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_pvt(in_channels=input_shape[0]), tuple(input_shape))


class TinyNextViT(nn.Module):
    """Next-ViT in small, of timm's own blocks (timm's NextViT fixes its widths at 96 and up): a stride-2 conv stem,
    an NCB (NextConvBlock: grouped-conv attention, BatchNorm, ConvMlp), an NTB (NextTransformerBlock) whose E-MHSA
    over 32 channels (timm rounds them to 32s) in `heads` heads averages its keys' tokens in runs of `sr`² (sr 2 on
    a 4×4 map: a run is a row; `stride` 2 first pools the map), concatenated with its conv attention's output (one
    head's channels); the final BatchNorm, mean and classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, sr: int = 2, heads: int = 2, stride: int = 1):
        super().__init__()
        from timm.models.nextvit import ConvNormAct, NextConvBlock, NextTransformerBlock
        head_dim = 32 // heads
        width = 32 + head_dim
        self.stem = ConvNormAct(in_channels, 16, stride=2)
        self.ncb = NextConvBlock(16, 16, head_dim=8)
        self.ntb = NextTransformerBlock(16, width, drop_path=0.0, stride=stride, sr_ratio=sr, head_dim=head_dim,
                                        mix_block_ratio=32.5 / width)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.norm(self.ntb(self.ncb(self.stem(x))))
        return self.head(x.mean((2, 3)))


def nextvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyNextViT(in_channels=input_shape[0]), tuple(input_shape))


class TinySHViT(nn.Module):
    """SHViT in small, of timm's own blocks: a stride-2 Conv2dNorm stem to a half-side map of `dim` channels, one
    BasicBlock (residual depthwise Conv2dNorm, SHSA: single-head attention of qk_dim `qk` over the first `pdim`
    channels, the rest passed by; FFN), the mean and the classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, dim: int = 16, pdim: int = 8, qk: int = 4):
        super().__init__()
        from timm.models.shvit import BasicBlock, Conv2dNorm
        self.stem = Conv2dNorm(in_channels, dim, 3, 2, 1)
        self.block = BasicBlock(dim, qk, pdim, "s")
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x).relu()).mean((2, 3)))


def shvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinySHViT(in_channels=input_shape[0]), tuple(input_shape))


def tiny_gcvit(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's GC ViT in small: its stride-4 stem to an (image / 4)² map of 8 channels; two stages (1 and 2 heads) of
    a local window block and a global-query block each (the FeatureBlock pools the map down to one window: the
    query every window shares, tiled over the map); 1×1 windows at 8 px (the 2×2 map's four windows read one
    global query), else `window_ratio`."""
    from timm.models.gcvit import GlobalContextVit
    args = dict(img_size=image, in_chans=in_channels, num_classes=classes, depths=(2, 2), num_heads=(1, 2),
                embed_dim=8, mlp_ratio=2, **({"window_size": 1} if image == 8 else {"window_ratio": (8, 16)}))
    return GlobalContextVit(**{**args, **kwargs})


def gcvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_gcvit(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def tiny_crossvit(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's CrossViT in small: branch 0 embeds the image in 2 × 2 patches (8 channels), branch 1 first resamples it
    bicubically to 1.5 times its side, then 4 × 4 patches (16 channels); one multi-scale block (a ViT block per
    branch, each class token projected to the other's width, cross attention to the other branch's tokens and back),
    and the two class heads averaged."""
    from timm.models.crossvit import CrossVit
    args = dict(img_size=image, img_scale=(1.0, 1.5), patch_size=(2, 4), in_chans=in_channels, num_classes=classes,
                embed_dim=(8, 16), depth=((1, 1, 1),), num_heads=(2, 2), mlp_ratio=(2, 2, 1))
    return CrossVit(**{**args, **kwargs})


def crossvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_crossvit(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def tiny_volo(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's VOLO in small, without its token-labelling aux head: a stride-4 patch embedding (conv stem) to an
    (image / 4)² channels-last map of 8 channels, an outlooker (outlook attention: 3 × 3 windows at stride 2, 2
    heads), two transformer blocks over the map's positions with the channels-last position embedding before the
    second, then the class token and a class-attention block."""
    from timm.models.volo import VOLO
    args = dict(img_size=image, in_chans=in_channels, num_classes=classes, layers=(1, 1, 1), embed_dims=(8, 8, 8),
                num_heads=(2, 2, 2), patch_size=4, stem_hidden_dim=4, downsamples=(False, False, False),
                outlook_attention=(True, False, False), pooling_scale=1, mlp_ratio=2.0, post_layers=("ca",),
                use_aux_head=False)
    return VOLO(**{**args, **kwargs})


def volo_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_volo(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def tiny_tnt(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's TNT in small: 4 × 4 patches, each embedded by a stride-2 conv into 2 × 2 pixels of 4 channels (a
    windowed conv on the image, its pixel position embedding tiled over the windows), two blocks of inner attention
    among each patch's pixels (2 heads) and outer attention among the 16-channel patch tokens (2 heads)."""
    from timm.models.tnt import TNT
    args = dict(img_size=image, patch_size=4, in_chans=in_channels, num_classes=classes, embed_dim=16, inner_dim=4,
                depth=2, num_heads_inner=2, num_heads_outer=2, mlp_ratio=2.0, first_stride=2)
    return TNT(**{**args, **kwargs})


def tnt_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_tnt(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))
