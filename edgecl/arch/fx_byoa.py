"""Bottleneck Transformers' self-attention (timm's ``BottleneckAttn``: ``botnet26t_256``, ``sebotnet33ts_256``,
``botnet50ts_256``, ``eca_botnext26ts_256``) in a user's network, for `fx_import._Converter`. The tracer keeps it
whole: its forward reshapes q, k, v to (B·heads, d, H·W) views and computes the relative position logits through a
pad-and-reshape trick the spec has no nodes for. On the (C, H, W) map it is

    qkv (1×1 conv) → slices q (heads·d), k (heads·d), v (heads·dv) → attention {heads, scale, rel_pos [H, W],
    rel_dim d, rel_scaled (timm's scale_pos_embed)} → pool (2×2 average, where stride 2)

The relative logits q·(height_rel[y − a + H − 1] + width_rel[x − b + W − 1]) depend on q, so they are the
attention's own fields and tensors (`edgecl.arch.rel_pos`), read from the module's ``pos_embed.height_rel`` and
``width_rel``. Refused by name with the user's source line: a map other than the ``feat_size`` the module was built
for, a position embedding other than timm's PosEmbedRel (its tables not (2·H − 1, d) and (2·W − 1, d)), a qkv whose
outputs are not q, k, v of the module's sizes, and a pool other than timm's AvgPool2d(2, 2).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError

_BOTTLENECK = ("timm.layers.bottleneck_attn", "BottleneckAttn")
_POS_EMBED = ("timm.layers.bottleneck_attn", "PosEmbedRel")


def is_bottleneck_attn(m: Any) -> bool:
    """timm's BottleneckAttn (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == _BOTTLENECK


class _ByoaConverter:
    """Mixin of `fx_import._Converter`: timm's BottleneckAttn modules kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _lambda_pool: Callable[..., str]

    def bottleneck_attn(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"BottleneckAttn at {path!r} {location(node)}"
        _, height, width = map_shape(node, self.name, where)
        heads, d, dv, pos = int(m.num_heads), int(m.dim_head_qk), int(m.dim_head_v), m.pos_embed
        if (type(pos).__module__, type(pos).__name__) != _POS_EMBED or \
                tuple(pos.height_rel.shape) != (2 * pos.height - 1, d) or \
                tuple(pos.width_rel.shape) != (2 * pos.width - 1, d):
            raise UsageError(f"{self.name}: {where}: pos_embed is a {type(pos).__name__}; edgecl converts timm's "
                             f"PosEmbedRel with tables of (2·H − 1, {d}) and (2·W − 1, {d})")
        if (height, width) != (pos.height, pos.width):
            raise UsageError(f"{self.name}: {where}: built for a {pos.height}×{pos.width} map (feat_size), reads "
                             f"{height}×{width}; build the model for the input size (img_size=…)")
        if not isinstance(m.qkv, nn.Conv2d) or m.qkv.out_channels != heads * (2 * d + dv):
            raise UsageError(f"{self.name}: {where}: qkv is {m.qkv}; edgecl converts timm's Conv2d to q, k of "
                             f"{heads} heads × {d} and v of {heads} × {dv}")
        if not isinstance(m.pool, (nn.Identity, nn.AvgPool2d)):
            raise UsageError(f"{self.name}: {where}: pool is a {type(m.pool).__name__}; edgecl converts timm's "
                             "identity or AvgPool2d(2, 2)")
        packed = self._conv(node, m.qkv, x, f"{path}.qkv", where)
        bounds = [0, heads * d, 2 * heads * d, heads * (2 * d + dv)]
        q, k, v = (self._emit(node, "slice", [packed], f"{path}.{part}", start=a, stop=b)
                   for part, a, b in zip("qkv", bounds, bounds[1:]))
        out = self._emit(node, "attention", [q, k, v], f"{path}.attend", module=path, heads=heads,
                         scale=float(m.scale), rel_pos=[height, width], rel_dim=d,
                         rel_scaled=bool(m.scale_pos_embed))
        if isinstance(m.pool, nn.AvgPool2d):
            out = self._lambda_pool(node, m.pool, out, f"{path}.pool", where)
        self.alias[node] = out
