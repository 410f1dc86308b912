"""Twins' attentions (timm's ``timm.models.twins``: twins_svt_* and twins_pcpvt_*) in a user's network, for
`fx_import._Converter`. Both are called on tokens ``(B, H·W, C)`` with the map's size ``(H, W)``; the tracer keeps
them whole, because they reshape the tokens into 6-D windows (or a map) that the spec has no values for. On the
tokens' ``(C, H·W, 1)`` spec value (`fx_tokens`) each becomes what its forward computes:

    LocallyGroupedAttn (ws > 1): the tokens as their H × W map → pad zeros right and bottom to a multiple of ws →
    qkv (1×1 conv) → slices q, k, v → attention {window [ws, ws]} → crop (a negative pad) → tokens → proj
    GlobalSubSampleAttn: q (1×1 conv) of the tokens; keys and values of the tokens, or with sr_ratio > 1 of the map
    reduced by sr (a conv of kernel and stride sr_ratio) and its LayerNorm, as tokens → kv (1×1 conv) → slices
    k, v → attention {heads} of the H·W queries over those keys → proj

The padded positions are zeros before the qkv Linear, so their keys (the qkv bias) join the attention as timm's do;
the crop drops their outputs. The block around them (norms, MLP, residual sums), PosConv and the patch embedding
are traced. A call with a size that is not the tokens' grid, another layer in a projection's place, and sr that is
not timm's (kernel = stride = sr_ratio, no padding) are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.arch.fx_xcit import traced_int
from edgecl.errors import UsageError

_TWINS = "timm.models.twins"
_KINDS = {(_TWINS, "LocallyGroupedAttn"): "local", (_TWINS, "GlobalSubSampleAttn"): "global"}


def is_twins_attention(m: Any) -> bool:
    """Twins' locally grouped (windowed) or global sub-sampled attention, judged by its class."""
    return (type(m).__module__, type(m).__name__) in _KINDS


class _TwinsConverter:
    """Mixin of `fx_import._Converter`: Twins' window and sub-sampled attentions, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    attend_packed: Callable[..., str]
    swin_norm: Callable[..., str]

    def twins_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"Twins {type(m).__name__} at {path!r} {location(node)}"
        tokens = shape_of(node.args[0])
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("size")
        hw = [traced_int(s) for s in size] if isinstance(size, (tuple, list)) and len(size) == 2 else [None, None]
        if node.args[0] not in self.last or tokens is None or len(tokens) != 2 or None in hw or \
                hw[0] * hw[1] != tokens[0]:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (batch, H·W, channels) with their "
                             f"grid's (H, W); gets tokens {tokens} and size {hw}")
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        ch, heads = tokens[1], int(m.num_heads)
        proj = linear(self.name, where, m.proj)
        if ch % heads or proj.in_features != ch or proj.out_features != ch:
            raise UsageError(f"{self.name}: {where}: {ch} channels, {heads} heads and a proj of "
                             f"{proj.in_features}→{proj.out_features} are not Twins' attention")
        local = _KINDS[(type(m).__module__, type(m).__name__)] == "local"
        attended = (self._twins_local if local else self._twins_global)(node, m, x, path, where, ch, hw, heads)
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))
        self.last.add(node)

    def _twins_local(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch: int, hw: list[int],
                     heads: int) -> str:
        """Attention within each ws × ws window of the zero-padded map, cropped back, as tokens."""
        ws, qkv = int(m.ws), linear(self.name, where, m.qkv)
        if qkv.in_features != ch or qkv.out_features != 3 * ch:
            raise UsageError(f"{self.name}: {where}: its qkv maps {qkv.in_features} to {qkv.out_features} channels; "
                             f"Twins' makes q, k and v of {ch}")
        pad = [0, 0, -hw[0] % ws, -hw[1] % ws]  # (top, left, bottom, right): timm pads right and bottom
        grid = self._emit(node, "reshape", [x], f"{path}.grid", shape=[ch, *hw])
        grid = self._emit(node, "pad", [grid], f"{path}.pad", pads=pad) if any(pad) else grid
        packed = self._emit(node, "conv", [grid], f"{path}.qkv", **pointwise(qkv))
        out = self.attend_packed(node, packed, path, ch, heads=heads, scale=applied_scale(m, ch // heads),
                                  window=[ws, ws])
        out = self._emit(node, "pad", [out], f"{path}.crop", pads=[-p for p in pad]) if any(pad) else out
        return self._emit(node, "reshape", [out], f"{path}.tokens", shape=[ch, hw[0] * hw[1], 1])

    def _twins_global(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch: int, hw: list[int],
                      heads: int) -> str:
        """The queries of every token over the keys and values of the map reduced by sr (or of every token)."""
        q, kv = linear(self.name, where, m.q), linear(self.name, where, m.kv)
        if q.in_features != ch or q.out_features != ch or kv.in_features != ch or kv.out_features != 2 * ch:
            raise UsageError(f"{self.name}: {where}: q of {q.in_features}→{q.out_features} and kv of "
                             f"{kv.in_features}→{kv.out_features} channels are not Twins' for {ch}")
        qs = self._emit(node, "conv", [x], f"{path}.q", **pointwise(q))
        source = x
        if m.sr is not None:
            sr, r = m.sr, int(m.sr_ratio)
            if not isinstance(sr, nn.Conv2d) or type(sr).forward is not nn.Conv2d.forward or \
                    sr.kernel_size != (r, r) or sr.stride != (r, r) or sr.padding != (0, 0) or sr.groups != 1 or \
                    sr.dilation != (1, 1) or sr.in_channels != ch or sr.out_channels != ch:
                raise UsageError(f"{self.name}: {where}: its sr is not an nn.Conv2d of {ch} channels with kernel "
                                 f"and stride {r} and no padding (timm's)")
            out_hw = [hw[0] // r, hw[1] // r]
            grid = self._emit(node, "reshape", [x], f"{path}.grid", shape=[ch, *hw])
            reduced = self._emit(node, "conv", [grid], f"{path}.sr", **{
                "in": ch, "out": ch, "k": [r, r], "stride": [r, r], "groups": 1, "bias": sr.bias is not None})
            reduced = self._emit(node, "reshape", [reduced], f"{path}.sr.tokens",
                                 shape=[ch, out_hw[0] * out_hw[1], 1])
            source = self.swin_norm(node, m.norm, reduced, f"{path}.norm", where)
        packed = self._emit(node, "conv", [source], f"{path}.kv", **pointwise(kv))
        k, v = (self._emit(node, "slice", [packed], f"{path}.{p}", start=i * ch, stop=(i + 1) * ch)
                for i, p in enumerate("kv"))
        return self._emit(node, "attention", [qs, k, v], f"{path}.attend", heads=heads,
                          scale=applied_scale(m, ch // heads))
