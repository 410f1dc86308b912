"""iFormer's (timm ``iformer_*``) single-head modulation attention (``SHMA``) in a user's network, for
`fx_import._Converter`. The tracer keeps it whole: its forward flattens q, k and v and multiplies them as
(B, 1, T, d) views, which the spec has no values for; the stages, conv blocks, RepCPE and FFNs around it are traced.
On the (C, H, W) map it is

    q, k (ConvNorm: 1×1 conv, BatchNorm, dim_attn channels each); v_gate (ConvNorm to 2·mid channels) → sigmoid →
    slices v (the first mid channels) and gate (the rest) → attention {1 head, scale dim_attn^-0.5} of every
    position over every position → mul by gate → proj (ConvNorm)

Every tensor node is named by its module path, so the module's weights read as they are. timm's windowed form
(``window_size`` > 0, which no iFormer model sets), other layers in its places, an attention dropout that is not an
identity are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale
from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError


def is_shma(m: Any) -> bool:
    """iFormer's SHMA (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == ("timm.models.iformer", "SHMA")


class _IFormerConverter:
    """Mixin of `fx_import._Converter`: iFormer's SHMA, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _act: Callable[..., str]  # `fx_split_attn`'s: an activation module
    _conv_norm: Callable[..., str]  # `fx_efficientformer`'s: timm's ConvNorm (a conv, a BatchNorm)

    def shma(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"iFormer SHMA at {path!r} {location(node)}"
        map_shape(node, self.name, where)
        if getattr(m, "window_size", 0):
            raise UsageError(f"{self.name}: {where}: window_size {m.window_size}; edgecl converts SHMA over the "
                             "whole map (window_size 0, every iFormer model's)")
        if not isinstance(m.attn_drop, nn.Dropout):
            raise UsageError(f"{self.name}: {where}: attn_drop is a {type(m.attn_drop).__name__}; edgecl converts "
                             "an nn.Dropout (an identity at inference) there")
        q = self._conv_norm(node, m.q, x, f"{path}.q", where)
        k = self._conv_norm(node, m.k, x, f"{path}.k", where)
        packed = self._act(node, m.gate_act, self._conv_norm(node, m.v_gate, x, f"{path}.v_gate", where),
                           f"{path}.gate_act", where)
        mid, odd = divmod(next(m.v_gate.children()).out_channels, 2)  # ConvNorm's conv (checked by _conv_norm)
        if odd:
            raise UsageError(f"{self.name}: {where}: v_gate has {2 * mid + 1} channels; edgecl converts an even "
                             "number (v and the gate, half each)")
        v = self._emit(node, "slice", [packed], f"{path}.v", start=0, stop=mid)
        gate = self._emit(node, "slice", [packed], f"{path}.gate", start=mid, stop=2 * mid)
        scale = applied_scale(m, next(m.q.children()).out_channels)
        h = self._emit(node, "attention", [q, k, v], f"{path}.attend", heads=1, scale=scale)
        h = self._emit(node, "mul", [h, gate], f"{path}.gated")
        self.alias[node] = self._conv_norm(node, m.proj, h, f"{path}.proj", where)
