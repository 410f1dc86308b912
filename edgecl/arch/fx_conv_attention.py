"""LowFormer's and CPUBone's (timm ``lowformer_*``, ``cpubone_*``) conv-projected attention (``ConvAttention``) in a
user's network, for `fx_import._Converter`. The tracer keeps it whole: its forward views the packed q, k, v as
(N, heads, T, 3·head_dim) and crops the upsampled map, views the spec has no nodes for. On the (C, H, W) map it is

    [pad (right, bottom) to a multiple of the stride: CPUBone's 2×2 projection] → conv_proj (depthwise strided conv
    [after its ZeroPad2d], BatchNorm) → pwise (1×1 conv) → each head's q, k, v (packed side by side) by `slice`s and
    `cat`s → attention {heads, the scale it applies} → o_proj (1×1 conv or none) → upsampling (a 1×1 conv, a
    nearest upsample, either or none; or a learned ``ConvTranspose2d``, LowFormer's and CPUBone's 'transpose'
    mode: a ``conv_transpose``) → the crop back to H × W (a `pad` of negative sides) where it overshoots

Every tensor node is named by its module path, so the module's weights read as they are. Other layers in its places
are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale
from edgecl.arch.conv_transpose import conv_transpose_shape
from edgecl.arch.fx_calls import location, map_shape, pair
from edgecl.arch.fx_conv_transpose import conv_transpose_fields
from edgecl.errors import UsageError

_CONV_ATTENTION = {("timm.models.lowformer", "ConvAttention"), ("timm.models.cpubone", "ConvAttention")}


def is_conv_attention(m: Any) -> bool:
    """LowFormer's or CPUBone's ConvAttention (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) in _CONV_ATTENTION


class _ConvAttentionConverter:
    """Mixin of `fx_import._Converter`: ConvAttention modules kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]  # `fx_split_attn`'s: a plain nn.Conv2d, named by its path
    _norm: Callable[..., str]
    _head_blocks: Callable[..., list[str]]  # `fx_levit`'s: each head's packed parts, in head order

    def conv_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"ConvAttention at {path!r} {location(node)}"
        _, rows, cols = map_shape(node, self.name, where)
        heads, dim, stride = int(m.num_heads), int(m.head_dim), int(m.att_stride)
        if int(m.num_keys) != 3 or m.pwise.out_channels != 3 * heads * dim:
            raise UsageError(f"{self.name}: {where}: pwise has {m.pwise.out_channels} outputs; edgecl converts 3 × "
                             f"heads {heads} × head_dim {dim}")
        h, size = x, [rows, cols]
        if getattr(m, "small_kernels", False) and stride > 1 and (rows % stride or cols % stride):
            h = self._emit(node, "pad", [h], f"{path}.pad", pads=[0, 0, -rows % stride, -cols % stride], value=0.0)
            size = [rows + -rows % stride, cols + -cols % stride]
        h, size = self._conv_layer(node, m.conv_proj, h, f"{path}.conv_proj", where, size)
        packed = self._conv(node, m.pwise, h, f"{path}.pwise", where)
        q, k, v = self._head_blocks(node, packed, path, heads, [dim, dim, dim])
        h = self._emit(node, "attention", [q, k, v], f"{path}.attend", heads=heads, scale=applied_scale(m, dim))
        if not isinstance(m.o_proj, nn.Identity):
            h = self._conv(node, m.o_proj, h, f"{path}.o_proj", where)
        h, size = self._upsampling(node, m.upsampling, h, f"{path}.upsampling", where, size)
        if size[0] < rows or size[1] < cols:
            raise UsageError(f"{self.name}: {where}: its upsampling makes a {size[0]}×{size[1]} map of a "
                             f"{rows}×{cols} input; the crop needs at least the input's size")
        if size != [rows, cols]:
            h = self._emit(node, "pad", [h], f"{path}.crop", pads=[0, 0, rows - size[0], cols - size[1]], value=0.0)
        self.alias[node] = h

    def _conv_layer(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                    size: list[int]) -> tuple[str, list[int]]:
        """The ConvLayer of conv_proj: a conv (or CPUBone's ZeroPad2d then conv, for a 2×2 kernel at stride 1),
        a BatchNorm, no activation; its output and the output's (height, width) of a `size` input."""
        names = [n for n, _ in m.named_children()]
        if names not in (["conv", "norm"], ["conv", "norm", "act"]) or not isinstance(getattr(m, "act", None),
                                                                            (nn.Identity, type(None))):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__} with layers "
                             f"{names}; edgecl converts a ConvLayer of a conv and a BatchNorm (no activation) "
                             "there")
        conv, conv_path = m.conv, f"{path}.conv"
        if isinstance(conv, nn.Sequential):
            if len(conv) != 2 or type(conv[0]) is not nn.ZeroPad2d or min(conv[0].padding) < 0:
                raise UsageError(f"{self.name}: {where}: {conv_path!r} is an nn.Sequential of "
                                 f"{[type(c).__name__ for c in conv]}; edgecl converts a ZeroPad2d (no crop) then a "
                                 "conv there")
            left, right, top, bottom = conv[0].padding
            x = self._emit(node, "pad", [x], f"{conv_path}.0", pads=[top, left, bottom, right], value=0.0)
            size = [size[0] + top + bottom, size[1] + left + right]
            conv, conv_path = conv[1], f"{conv_path}.1"
        h = self._norm(node, m.norm, self._conv(node, conv, x, conv_path, where), f"{path}.norm", where,
                       required=True)
        if isinstance(conv.padding, str):  # 'same' keeps the size (torch allows it at stride 1 only), 'valid' pads none
            return h, size if conv.padding == "same" else [size[i] - conv.dilation[i] * (conv.kernel_size[i] - 1)
                                                          for i in range(2)]
        k, s, p, d = (pair(a) for a in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        return h, [(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]

    def _upsampling(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                    size: list[int]) -> tuple[str, list[int]]:
        """A learned ``ConvTranspose2d`` (LowFormer's, CPUBone's 'transpose' mode), or CPUBone's nearest mode: [a
        1×1 conv (the fused output projection)], a nearest upsample or an identity; the map and its (height, width)
        from a `size` one."""
        if type(m) is nn.ConvTranspose2d:
            fields = conv_transpose_fields(self.name, node, m, path)
            out = conv_transpose_shape(fields, [fields["in"], *size], f"{self.name}: {where}: {path!r}")
            return self._emit(node, "conv_transpose", [x], path, **fields), out[1:]
        parts = list(m) if isinstance(m, nn.Sequential) else [m]
        names = [f"{path}.{i}" for i in range(len(parts))] if isinstance(m, nn.Sequential) else [path]
        if parts and type(parts[0]) is nn.Conv2d:
            x = self._conv(node, parts[0], x, names[0], where)
            parts, names = parts[1:], names[1:]
        if len(parts) != 1 or not (isinstance(parts[0], nn.Identity) or type(parts[0]) is nn.Upsample and
                                   parts[0].mode == "nearest" and parts[0].size is None):
            raise UsageError(f"{self.name}: {where}: {path!r} holds {[type(p).__name__ for p in parts]}; edgecl "
                             "converts CPUBone's [1×1 conv,] nearest nn.Upsample (or identity) there")
        if isinstance(parts[0], nn.Identity):
            return x, size
        scale = pair(parts[0].scale_factor)
        if scale[0] != scale[1] or scale[0] != int(scale[0]) or scale[0] < 1:
            raise UsageError(f"{self.name}: {where}: {path!r} upsamples by {parts[0].scale_factor}; edgecl converts "
                             "one integer factor for both sides")
        factor = int(scale[0])
        return self._emit(node, "upsample", [x], names[0], scale=[factor, factor]), [s * factor for s in size]
