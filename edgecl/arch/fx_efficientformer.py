"""EfficientFormer's attention: V2's on feature maps (timm's ``timm.models.efficientformer_v2``) and V1's on tokens
(``timm.models.efficientformer``), for `fx_import._Converter`. The tracer keeps V2's ``Attention2d`` and
``Attention2dDownsample`` whole (their q/k/v reshapes and permutes, the bias gathered by a cached index and the
talking heads would be fragile to trace); each becomes what its forward computes on the (C, H, W) map, in spec ops:

    Attention2d: [stride_conv (depthwise conv + BatchNorm)] → q, k, v (1×1 conv + BatchNorm each); v_local
    (depthwise conv + BatchNorm of v); attention {heads, scale, LeViT's bias table and index, talking_heads} → add
    v_local → [upsample, bilinear, by the stride] → act → proj (1×1 conv + BatchNorm)
    Attention2dDownsample: q = LocalGlobalQuery: local (depthwise strided conv) + pool (every stride-th position:
    avgpool k 1) → proj; k, v at full resolution; attention of the fewer queries over all keys with the bias (no
    talking heads) → add v_local (strided depthwise conv + BatchNorm) → act → proj

The bias is LeViT's (``attention_biases`` (heads, offsets) read at the fixed ``attention_bias_idxs``); the talking
heads are the attention's ``talking_heads`` (its ``talking_head1`` / ``talking_head2`` 1×1 convs over the heads,
`edgecl.arch.ops`). A map other than the module's ``resolution`` (its reshapes assume it) and layers other than
timm's in their places are refused by name with the user's source line.

EfficientFormer (V1)'s ``Attention`` reads the last stage's tokens (after its ``Flat``), a ``(C, T, 1)`` map
(`fx_tokens`): qkv (1×1 conv: the Linear) → per head, slices q_h, k_h, v_h (timm packs each head's parts side by
side, as LeViT: `fx_levit`'s head blocks) → attention {heads, scale, LeViT's bias table and index} → proj (1×1 conv).
Its bias table is built for a fixed 7×7 grid (224×224 inputs; timm's ``img_size`` does not change it): other
token counts are refused by name.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, map_shape, shape_of
from edgecl.arch.fx_levit import levit_bias_fields
from edgecl.errors import UsageError

_MODULE = "timm.models.efficientformer_v2"
_KINDS = ("Attention2d", "Attention2dDownsample")
_V1 = ("timm.models.efficientformer", "Attention")


def is_efficientformer_attention(m: Any) -> bool:
    """EfficientFormerV2's Attention2d or Attention2dDownsample, or EfficientFormer (V1)'s Attention, judged by its
    class; timm is not imported."""
    return type(m).__module__ == _MODULE and type(m).__name__ in _KINDS or is_efficientformer_v1_attention(m)


def is_efficientformer_v1_attention(m: Any) -> bool:
    """EfficientFormer (V1)'s Attention on tokens, judged by its class."""
    return (type(m).__module__, type(m).__name__) == _V1


class _EfficientFormerConverter:
    """Mixin of `fx_import._Converter`: EfficientFormerV2's attention modules, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _head_blocks: Callable[..., list[str]]  # `fx_levit`'s: each part's per-head slices, in order
    _conv: Callable[..., str]
    _norm: Callable[..., str]
    _act: Callable[..., str]

    def efficientformer_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        if is_efficientformer_v1_attention(m):
            return self._efficientformer_v1(node, m, x, path)
        kind = type(m).__name__
        where = f"EfficientFormerV2 {kind} at {path!r} {location(node)}"
        _, height, width = map_shape(node, self.name, where)
        down = kind == "Attention2dDownsample"
        stride = None if down or m.stride_conv is None else int(m.stride_conv.conv.stride[0])
        seen = [-(-height // stride), -(-width // stride)] if stride else [height, width]
        if tuple(seen) != tuple(m.resolution):
            raise UsageError(f"{self.name}: {where} attends over a {seen[0]}×{seen[1]} map but was built for "
                             f"resolution {tuple(m.resolution)} (its reshapes and bias index assume it); build the "
                             "model for the input size (img_size=…)")
        if stride:
            x = self._conv_norm(node, m.stride_conv, x, f"{path}.stride_conv", where)
        heads, key_dim, d = int(m.num_heads), int(m.key_dim), int(m.d)
        q = self._local_global_query(node, m.q, x, f"{path}.q", where) if down else \
            self._conv_norm(node, m.q, x, f"{path}.q", where)
        k = self._conv_norm(node, m.k, x, f"{path}.k", where)
        v = self._conv_norm(node, m.v, x, f"{path}.v", where)
        widths = {"q": m.q.proj if down else m.q, "k": m.k, "v": m.v}
        for part, want in (("q", heads * key_dim), ("k", heads * key_dim), ("v", heads * d)):
            if widths[part].conv.out_channels != want:
                raise UsageError(f"{self.name}: {where}: {part} has {widths[part].conv.out_channels} channels; "
                                 f"edgecl follows timm's layout ({heads} heads of key_dim {key_dim}, d {d})")
        local = self._conv_norm(node, m.v_local, v, f"{path}.v_local", where)
        talking = not down and self._talking_heads(m, heads, where)
        fields: dict[str, Any] = {"talking_heads": True} if talking else {}
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **levit_bias_fields(m, path, heads),
                              **fields)
        out = self._emit(node, "add", [attended, local], f"{path}.add_local")
        if stride:
            up = m.upsample
            if type(up) is not nn.Upsample or up.mode != "bilinear" or up.align_corners or \
                    up.scale_factor not in (stride, float(stride), (stride, stride)):
                raise UsageError(f"{self.name}: {where}: upsample is {up!r}; edgecl converts timm's "
                                 f"nn.Upsample(scale_factor={stride}, mode='bilinear')")
            out = self._emit(node, "upsample", [out], f"{path}.upsample", scale=[stride, stride], mode="bilinear")
        out = self._act(node, m.act, out, f"{path}.act", where)
        self._conv_norm(node, m.proj, out, f"{path}.proj", where)

    def _efficientformer_v1(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """V1's Attention on tokens: the packed qkv Linear, LeViT's per-head blocks and bias, the proj Linear."""
        where = f"EfficientFormer Attention at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        heads, key_dim, val_dim = int(m.num_heads), int(m.key_dim), int(m.val_dim)
        if node.args[0] not in self.last or shape is None or len(shape) != 2:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl converts it on "
                             "(batch, tokens, channels) tokens (after the stage's Flat)")
        if shape[0] != len(m.attention_bias_idxs):
            raise UsageError(f"{self.name}: {where} attends over {shape[0]} tokens but its bias table was built for "
                             f"{len(m.attention_bias_idxs)} (timm's fixed 7×7 grid: a 224×224 input)")
        if type(m.qkv) is not nn.Linear or type(m.proj) is not nn.Linear or \
                m.qkv.out_features != heads * (2 * key_dim + val_dim) or m.proj.in_features != heads * val_dim:
            raise UsageError(f"{self.name}: {where}: qkv is {m.qkv!r} and proj {m.proj!r}; edgecl converts timm's "
                             f"nn.Linear layers for {heads} heads of key_dim {key_dim} and val_dim {val_dim}")
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(m.qkv))
        q, k, v = self._head_blocks(node, packed, f"{path}.qkv", heads, [key_dim, key_dim, val_dim])
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **levit_bias_fields(m, path, heads))
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(m.proj))
        self.last.add(node)

    def _talking_heads(self, m: nn.Module, heads: int, where: str) -> bool:
        """timm's two talking-head convs: 1×1 over the heads, with a bias (their weights are read as (heads,
        heads) mixes)."""
        for part in ("talking_head1", "talking_head2"):
            conv = getattr(m, part)
            if type(conv) is not nn.Conv2d or (conv.in_channels, conv.out_channels) != (heads, heads) or \
                    tuple(conv.kernel_size) != (1, 1) or conv.groups != 1 or conv.bias is None:
                raise UsageError(f"{self.name}: {where}: {part} is {conv!r}; edgecl converts a 1×1 nn.Conv2d over "
                                 f"the {heads} heads with a bias there")
        return True

    def _conv_norm(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's ConvNorm: an nn.Conv2d then a BatchNorm2d (named `conv`, or `c` as iFormer's)."""
        names = [name for name, _ in m.named_children()]
        if names not in (["conv", "bn"], ["c", "bn"]):
            raise UsageError(f"{self.name}: {where}: {path!r} has layers {names}; edgecl converts timm's ConvNorm "
                             "['conv', 'bn'] (or iFormer's ['c', 'bn']) there")
        conv = self._conv(node, getattr(m, names[0]), x, f"{path}.{names[0]}", where)
        return self._norm(node, m.bn, conv, f"{path}.bn", where, required=True)

    def _local_global_query(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """LocalGlobalQuery: a strided depthwise conv plus every stride-th position (AvgPool2d(1, 2)), then proj."""
        pool = m.pool
        if type(pool) is not nn.AvgPool2d or pool.kernel_size not in (1, (1, 1)) or pool.padding not in (0, (0, 0)):
            raise UsageError(f"{self.name}: {where}: {path}.pool is {pool!r}; edgecl converts timm's "
                             "AvgPool2d(1, 2, 0) there")
        local = self._conv(node, m.local, x, f"{path}.local", where)
        stride = [pool.stride] * 2 if isinstance(pool.stride, int) else list(pool.stride)
        picked = self._emit(node, "avgpool", [x], f"{path}.pool", k=[1, 1], stride=stride, pad=[0, 0],
                            ceil_mode=bool(pool.ceil_mode), count_include_pad=True)
        added = self._emit(node, "add", [local, picked], f"{path}.add")
        return self._conv_norm(node, m.proj, added, f"{path}.proj", where)
