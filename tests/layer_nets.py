"""Small user networks, one per layer family `from_torch` follows beyond plain convolutions and BatchNorm (the graph
tests run every method on each): TensorFlow's "same" padding (`TinyTF`), ECA channel attention (`TinyEca`), a Vision
Transformer (`TinyViT`), PP-HGNetV2's scalar affines (`TinyHGNet`), split attention (`TinySplitAttn`), GCNet's global
context (`TinyGCNet`), TResNet's space-to-depth stem (`TinyS2D`), MobileNetV4-hybrid's multi-query attention on a
feature map (`TinyMNv4Hybrid`), LeViT's attention biases and strided attention (`TinyLeViT`), anti-aliased
downsampling (`TinyBlur`), Swin's shifted window attention and patch merging (`TinySwin`), TinyViT's windowed LeViT
attention and local conv (`TinyTinyViT`), MobileViT's block (`TinyMobileViT`: grid attention), MaxViT's window and
grid attention with relative position biases (`TinyMaxViT`) and a position embedding added to a feature map
(`TinyMapEmbed`, as PiT and Visformer add theirs, with NASNet's cropping pad) and EfficientFormerV2's strided talking-heads attention and attention downsampling
(`TinyEfficientFormerV2`). Imports torch and timm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.layers import Attention, Conv2dSame, Mlp, create_pool2d  # noqa: E402
from timm.layers.blur_pool import BlurPool2d  # noqa: E402
from timm.layers.eca import CecaModule, EcaModule  # noqa: E402
from timm.layers.global_context import GlobalContext  # noqa: E402
from timm.layers.space_to_depth import SpaceToDepth  # noqa: E402
from timm.layers.selective_kernel import SelectiveKernel  # noqa: E402
from timm.layers.split_attn import SplitAttn  # noqa: E402
from timm.models._efficientnet_blocks import MobileAttention  # noqa: E402
from timm.models.efficientformer_v2 import Attention2d as FormerAttention  # noqa: E402
from timm.models.efficientformer_v2 import Attention2dDownsample  # noqa: E402
from timm.models.hgnet import LearnableAffineBlock  # noqa: E402
from timm.models.levit import Attention as LevitAttention  # noqa: E402
from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl  # noqa: E402
from timm.models.mobilevit import MobileVitBlock  # noqa: E402
from timm.models.levit import AttentionDownsample, LevitMlp, NormLinear  # noqa: E402
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock  # noqa: E402
from timm.models.tiny_vit import TinyVitBlock  # noqa: E402


class TinyTF(nn.Module):
    """A TensorFlow port in small, as timm's ``tf_*`` models pad: a stride-2 ``Conv2dSame`` (an extra row and column
    at the bottom and right), a depthwise ``Conv2dSame`` at stride 1 (symmetric), an explicit ``F.pad`` before an
    even kernel, and a ``MaxPool2dSame`` (padded with −∞)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 6):
        super().__init__()
        w = width
        self.stem = nn.Sequential(Conv2dSame(in_channels, w, 3, stride=2, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.dw = nn.Sequential(Conv2dSame(w, w, 3, groups=w, bias=False), nn.BatchNorm2d(w), nn.ReLU6(),
                                nn.Conv2d(w, 2 * w, 1))
        self.even = nn.Conv2d(2 * w, 2 * w, 2)
        self.pool = create_pool2d("max", 3, stride=2, padding="same")
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = self.pool(torch.relu(self.even(F.pad(x, (0, 1, 0, 1)))))
        return self.fc(x.mean([2, 3]))


def tf_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyTF(in_channels=input_shape[0]), tuple(input_shape))


class _Residual(nn.Module):
    """A conv-BN-ReLU stem, residual blocks (the subclass's modules named in `blocks`, each added to its input and
    followed by a ReLU), average pooling and a classifier: the frame of the small ECA, split-attention and GCNet
    networks."""

    blocks: tuple[str, ...] = ()

    def __init__(self, classes: int, in_channels: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for name in self.blocks:
            x = torch.relu(x + getattr(self, name)(x))
        return self.fc(x.mean([2, 3]))


class TinyEca(_Residual):
    """ECA-ResNet in small: a stem, a residual block whose second conv's output goes through timm's EcaModule (k=3,
    zero padding) before the add, and a second block gated by a CecaModule (k=5, circular padding)."""

    blocks = ("block1", "block2")

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__(classes, in_channels, width)
        w = width

        def block(k_eca: int, gate: type[nn.Module]):
            return nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                 nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                 gate(kernel_size=k_eca))

        self.block1, self.block2 = block(3, EcaModule), block(5, CecaModule)


class TinyViT(nn.Module):
    """A Vision Transformer in small: a patch conv, flatten(2).transpose(1, 2) to tokens, a learned class token and
    position embedding, `depth` pre-norm blocks of timm's Attention (fused qkv Linear) and Mlp (GELU), a final
    LayerNorm, the class token's features (x[:, 0]) and a Linear head. `registers` register tokens after the class
    token (timm's reg_tokens); `distilled`: DeiT's distillation token after the class token and the mean of two heads,
    one on each (``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``); `frozen_pos`: the position embedding a constant
    (``requires_grad=False``, as MAE's fixed sin-cos)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, dim: int = 12, heads: int = 2, depth: int = 2,
                 patch: int = 4, image: int = 8, registers: int = 0, distilled: bool = False, frozen_pos: bool = False):
        super().__init__()
        tokens = (image // patch) ** 2 + 1 + registers + distilled
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        self.dist_token = nn.Parameter(0.5 * torch.randn(1, 1, dim)) if distilled else None
        self.reg_token = nn.Parameter(0.5 * torch.randn(1, registers, dim)) if registers else None
        self.head_dist = nn.Linear(dim, classes) if distilled else None
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, tokens, dim), requires_grad=not frozen_pos)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "attn": Attention(dim, heads, qkv_bias=True), "norm2": nn.LayerNorm(dim),
            "mlp": Mlp(dim, 2 * dim)}) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        x = self.norm(x)
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])


def vit_spec(input_shape=(1, 8, 8), **kwargs) -> dict:
    return from_torch(TinyViT(in_channels=input_shape[0], image=input_shape[1], **kwargs), tuple(input_shape))


def eca_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyEca(in_channels=input_shape[0]), tuple(input_shape))


class ScalarAffine(nn.Module):
    """PP-HGNetV2's learnable affine block as a user writes it: one learned scale and one bias, each of shape (1,)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.tensor([scale])), nn.Parameter(torch.tensor([bias]))

    def forward(self, x):
        return x * self.scale + self.bias


class TinyHGNet(nn.Module):
    """PP-HGNetV2 in small: conv-BN-ReLU layers each followed by a scalar affine (the user's `ScalarAffine`, timm's
    LearnableAffineBlock in the block's first layer), an HG block concatenating its input and its layers' outputs
    (3×3, then depthwise 3×3), a 1×1 aggregation with an ESE gate, and the input added back."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        w = width

        def layer(i: int, o: int, k: int, groups: int = 1, lab: type[nn.Module] = ScalarAffine) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(o),
                                 nn.ReLU(), lab())

        self.stem = layer(in_channels, w, 3)
        self.layers = nn.ModuleList([layer(w, w, 3, lab=LearnableAffineBlock), layer(w, w, 3, groups=w)])
        self.aggregation, self.ese = layer(3 * w, w, 1), nn.Conv2d(w, w, 1)
        self.fc = nn.Linear(w, classes)

    def block(self, x):
        """The stem and the HG block with its input added back (a subclass puts another head on it)."""
        x = self.stem(x)
        outputs = [x]
        for block_layer in self.layers:
            outputs.append(block_layer(outputs[-1]))
        y = self.aggregation(torch.cat(outputs, 1))
        y = y * torch.sigmoid(self.ese(y.mean((2, 3), keepdim=True)))
        return x + y

    def forward(self, x):
        return self.fc(self.block(x).mean([2, 3]))


def hgnet_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyHGNet(in_channels=input_shape[0]), tuple(input_shape))


class TinySplitAttn(_Residual):
    """SKNet and ResNeSt in small: a stem, a residual block whose first conv is timm's SelectiveKernel (two paths of
    3×3, the second dilated, each on half the input), then a residual block whose 3×3 is timm's SplitAttn (radix 2,
    cardinality 2: its logits are laid out branch-major by slices and a cat)."""

    blocks = ("sk", "splat")

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__(classes, in_channels, width)
        w = width
        self.sk = nn.Sequential(SelectiveKernel(w, w, rd_channels=4), nn.Conv2d(w, w, 3, padding=1, bias=False),
                                nn.BatchNorm2d(w))
        self.splat = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                   SplitAttn(w, w, radix=2, groups=2, rd_channels=4, norm_layer=nn.BatchNorm2d),
                                   nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w))


def split_attn_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinySplitAttn(in_channels=input_shape[0]), tuple(input_shape))


class TinyGCNet(_Residual):
    """GCNet in small: a stem, a residual block gated by timm's GlobalContext (attention pooling, fuse_scale: the
    gcresnet default) and a second block whose GlobalContext also adds its context (fuse_add and fuse_scale)."""

    blocks = ("block1", "block2")

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__(classes, in_channels, width)
        w = width

        def block(gc: nn.Module):
            return nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), gc)

        self.block1 = block(GlobalContext(w, rd_ratio=1 / 4))
        self.block2 = block(GlobalContext(w, fuse_add=True, rd_ratio=1 / 2))


def gc_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyGCNet(in_channels=input_shape[0]), tuple(input_shape))


class TinyS2D(nn.Module):
    """TResNet's stem in small: timm's SpaceToDepth (block 2, as the spec allows; timm's own asserts 4) from the
    input, a conv reading its 4 copies of the input's channels, a residual block, LeakyReLU as TResNet's."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, block: int = 2):
        super().__init__()
        w = width
        self.s2d = SpaceToDepth()
        self.s2d.bs = block
        self.stem = nn.Sequential(nn.Conv2d(in_channels * block * block, w, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w), nn.LeakyReLU(1e-3))
        self.body = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(1e-3),
                                  SpaceToDepth(), nn.Conv2d(4 * w, w, 1))
        self.body[3].bs = 2
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        x = self.stem(self.s2d(x))
        return self.fc(self.body(x).mean([2, 3]))


def s2d_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyS2D(in_channels=input_shape[0]), tuple(input_shape))


class TinyMNv4Hybrid(nn.Module):
    """MobileNetV4-hybrid in small: a strided conv-BN-ReLU stem, timm's MobileAttention block (pre-norm, multi-query
    attention of 2 query heads over one key/value head whose depthwise conv halves the map, layer scale, residual),
    a 1×1 conv-BN-ReLU and average pooling."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        self.attn = MobileAttention(w, w, num_heads=2, key_dim=4, value_dim=6, use_multi_query=True, kv_stride=2,
                                    layer_scale_init_value=0.5)
        self.mix = nn.Sequential(nn.Conv2d(w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        return self.fc(self.mix(self.attn(self.stem(x))).mean([2, 3]))


def mnv4_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMNv4Hybrid(in_channels=input_shape[0]), tuple(input_shape))


class TinyLeViT(nn.Module):
    """LeViT in small, of timm's own layers: a strided conv-BN-hardswish stem to a 4×4 map (8×8 images), tokens
    (flatten(2).transpose(1, 2)), a residual Attention (2 heads, q/k/v packed per head, learned attention biases over
    the 16 tokens) and LevitMlp (LinearNorm: Linear + BatchNorm1d over the tokens), an AttentionDownsample (queries
    from every other token, 2×2, more channels out), the mean token and two averaged NormLinear heads (LeViT's
    distillation head)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, image: int = 8):
        super().__init__()
        w, r = width, image // 2
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                                  nn.Hardswish())
        self.attn = LevitAttention(w, key_dim=4, num_heads=2, attn_ratio=2, resolution=r, act_layer=nn.Hardswish)
        self.mlp = LevitMlp(w, 2 * w, act_layer=nn.Hardswish)
        self.down = AttentionDownsample(w, 2 * w, key_dim=4, num_heads=2, attn_ratio=2, stride=2, resolution=r,
                                        act_layer=nn.Hardswish)
        self.head, self.head_dist = NormLinear(2 * w, classes), NormLinear(2 * w, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = self.down(x + self.mlp(x)).mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


def levit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyLeViT(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


class TinyBlur(nn.Module):
    """timm's resnetblur in small: a reflection-padded stem, a residual block downsampling by BlurPool2d after its
    first conv (reflect padding, the 3×3 binomial filter) and on its shortcut (a 5×5 filter over replicated edges,
    built without ``channels``), a zero-padded ``blurpc`` BlurPool2d, a 1×1 conv-BN-ReLU widening, adaptive average
    pooling to 3×3 (windows of unequal lengths, as VGG's to 7×7) and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(in_channels, w, 3, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.aa = BlurPool2d(w, stride=2)
        self.conv2 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.shortcut = BlurPool2d(None, filt_size=5, stride=2, pad_mode="replicate")
        self.tail = BlurPool2d(w, stride=1, pad_mode="constant")
        self.mix = nn.Sequential(nn.Conv2d(w, 4 * w, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.conv2(self.aa(self.conv1(x))) + self.shortcut(x))
        return self.fc(F.adaptive_avg_pool2d(self.mix(self.tail(x)), 3).mean([2, 3]))


def blur_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyBlur(in_channels=input_shape[0]), tuple(input_shape))


class TinySwin(nn.Module):
    """Swin in small, of timm's own layers: a 2×2 patch embedding (stride-2 conv) to a 4×4 map put channels-last with
    its LayerNorm, two SwinTransformerBlocks of 2×2 windows (the second shifted by 1: rolled, masked, rolled back;
    relative position biases), a PatchMerging (2×2 neighbourhoods in Swin's order, LayerNorm, reduction) and the mean
    over the map (timm's NHWC pooling)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, image: int = 8):
        super().__init__()
        w, r = width, image // 2
        self.stem, self.norm = nn.Conv2d(in_channels, w, 2, stride=2), nn.LayerNorm(w)
        self.blocks = nn.Sequential(*(SwinTransformerBlock(w, (r, r), num_heads=2, window_size=2, shift_size=s,
                                                           mlp_ratio=2.0) for s in (0, 1)))
        self.merge = PatchMerging(w)
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.blocks(self.norm(self.stem(x).permute(0, 2, 3, 1)))
        return self.head(self.merge(x).mean((1, 2)))


def swin_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinySwin(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


class TinyTinyViT(nn.Module):
    """TinyViT's block in small: a 2×2 patch embedding to a 4×4 map put channels-last, a TinyVitBlock of 2×2 windows
    (LeViT's attention biases per window, a depthwise local conv with BatchNorm, NormMlp) and the mean over the map."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, image: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 2, stride=2)
        self.block = TinyVitBlock(width, num_heads=2, window_size=2, mlp_ratio=2.0)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


def tiny_vit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyTinyViT(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


class TinyMapEmbed(nn.Module):
    """PiT's and Visformer's position embedding in small: a strided conv stem, a learned (1, C, H, W) parameter added
    to its feature map (one vector per position), a residual conv-BN-ReLU block whose input NASNet's cropping pad
    shifts by one (``ZeroPad2d((-1, 1, -1, 1))``: the first row and column cropped, a zero one added at the end)
    and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, image: int = 8, width: int = 8):
        super().__init__()
        side = image // 2
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.pos_embed = nn.Parameter(torch.randn(1, width, side, side) * 0.02)
        self.block = nn.Sequential(nn.ZeroPad2d((-1, 1, -1, 1)), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x) + self.pos_embed
        return self.fc((x + self.block(x)).mean([2, 3]))


def map_embed_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMapEmbed(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


class TinyEfficientFormerV2(nn.Module):
    """EfficientFormerV2's attention in small: a conv stem, a strided Attention2d (depthwise stride conv, talking
    heads, LeViT's biases, local v conv, bilinear up-sampling) added back to its input, an Attention2dDownsample
    (local-global query) to half the map, and the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, image: int = 8, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.attn = FormerAttention(width, key_dim=4, num_heads=2, attn_ratio=2, resolution=image, stride=2)
        self.down = Attention2dDownsample(width, key_dim=4, num_heads=2, attn_ratio=2, resolution=image)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.down(x + self.attn(x)).mean([2, 3]))


def efficientformer_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyEfficientFormerV2(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


class TinyMobileViT(nn.Module):
    """MobileViT's block in small: a strided conv stem to a 4×4 map and one timm MobileVitBlock of 2×2 patches (its
    3×3 ConvNormAct and 1×1 conv, a transformer Block attending among the 2×2 patches at each pixel offset: dilated
    window attention; LayerNorm, conv_proj, conv_fusion over the concatenated shortcut), then the mean."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, image: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.block = MobileVitBlock(width, width, transformer_dim=width, transformer_depth=1, patch_size=2,
                                    num_heads=2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def mobilevit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMobileViT(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


class TinyMaxViT(nn.Module):
    """MaxViT's attention in small: a strided conv stem to a 4×4 map put channels-last, timm's PartitionAttentionCl
    over 2×2 windows, then over the 2×2 grid (positions 2 apart: a dilated window), each with its relative position
    bias table, and the mean over the map."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, image: int = 8):
        super().__init__()
        cfg = MaxxVitTransformerCfg(dim_head=4, window_size=(2, 2), expand_ratio=2.0)
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*(PartitionAttentionCl(width, kind, cfg) for kind in ("block", "grid")))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


def maxvit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyMaxViT(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


from timm.models.swin_transformer_v2 import PatchMerging as PatchMergingV2  # noqa: E402
from timm.models.swin_transformer_v2 import SwinTransformerV2Block  # noqa: E402


class TinySwinV2(nn.Module):
    """Swin V2 in small, of timm's own layers: a 2×2 patch embedding to a 4×4 map put channels-last with its
    LayerNorm, two SwinTransformerV2Blocks of 2×2 windows (scaled cosine attention, the position bias of its MLP,
    q and v biases, norms after attention and MLP; the second shifted by 1), a V2 PatchMerging (reduction, then its
    LayerNorm) and the mean over the map."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, image: int = 8):
        super().__init__()
        w, r = width, image // 2
        self.stem, self.norm = nn.Conv2d(in_channels, w, 2, stride=2), nn.LayerNorm(w)
        self.blocks = nn.Sequential(*(SwinTransformerV2Block(w, (r, r), num_heads=2, window_size=2, shift_size=s,
                                                             mlp_ratio=2.0) for s in (0, 1)))
        self.merge = PatchMergingV2(w)
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.blocks(self.norm(self.stem(x).permute(0, 2, 3, 1)))
        return self.head(self.merge(x).mean((1, 2)))


def swinv2_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinySwinV2(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))
