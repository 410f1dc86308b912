"""PVT v2's stages (timm's ``timm.models.pvt_v2``: pvt_v2_b0…b5) in a user's network, for `fx_import._Converter`.
The tracer keeps each ``PyramidVisionTransformerStage`` whole: it flattens a channels-last map to tokens and its
blocks view the tokens back as a map (for the keys' reduction and the MLP's depthwise conv) with the map's size as
a Python argument, which the spec has no values for. On the (C, H, W) map it reads (channels-last after the model's
patch embedding, channels-first after a stage), a stage becomes

    downsample (OverlapPatchEmbed, stages after the first): proj (3×3 conv, stride 2) → LayerNorm over the channels
    per Block: norm1 → attn: q (1×1 conv); keys and values of the map, or with sr_ratio > 1 of the map reduced by sr
    (a conv of kernel and stride sr_ratio) and its LayerNorm, or in linear attention (pvt_v2_b2_li) of the map
    pooled to 7 × 7 (adaptive_avgpool), sr (1×1), LayerNorm, GELU → kv (1×1 conv) → slices k, v → attention
    {heads} of the H·W queries over those keys → proj → add;  norm2 → mlp: fc1 (1×1 conv) → [ReLU, linear
    attention's] → dwconv (3×3 depthwise) → act → fc2 → add
    norm (LayerNorm over the channels), the map channels-first

The tokens are the map's positions row by row, so every per-token layer and the attention over all of them run on
the map itself. A layer other than timm's in any place and a dropout or drop path that is not an identity at
inference are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, pair, shape_of
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

_PVT = "timm.models.pvt_v2"


def is_pvt_stage(m: Any) -> bool:
    """PVT v2's stage (``PyramidVisionTransformerStage``), judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_PVT, "PyramidVisionTransformerStage")


class _PvtConverter:
    """Mixin of `fx_import._Converter`: PVT v2's stages, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _act: Callable[..., str]
    swin_norm: Callable[..., str]

    def pvt_stage(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"PVT v2 PyramidVisionTransformerStage at {path!r} {location(node)}"
        shape, channels_last = shape_of(node.args[0]), node.args[0] in self.last
        if shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} needs a map (batch, channels, height, width) or, without its "
                             f"downsample, channels last; gets {shape}")
        if m.downsample is not None:
            if channels_last:
                raise UsageError(f"{self.name}: {where}: its downsample reads a channels-first map; gets a "
                                 "channels-last one")
            check_kind(self.name, where, m, "downsample", (_PVT, "OverlapPatchEmbed"))
            x = self._conv(node, m.downsample.proj, x, f"{path}.downsample.proj", where)
            x = self.swin_norm(node, m.downsample.norm, x, f"{path}.downsample.norm", where)
        elif not channels_last:
            raise UsageError(f"{self.name}: {where}: without a downsample it reads a channels-last map (the patch "
                             "embedding's); gets a channels-first one")
        ch = shape_of(node)[0]  # the stage's output: (C, H, W), channels-first
        for i, block in enumerate(m.blocks):
            x = self._pvt_block(node, block, x, f"{path}.blocks.{i}", where, ch)
        self.swin_norm(node, m.norm, x, f"{path}.norm", where)
        self.last.discard(node)  # the stage returns the map channels-first

    def _pvt_block(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch: int) -> str:
        if (type(m).__module__, type(m).__name__) != (_PVT, "Block"):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__}; edgecl converts PVT v2's "
                             "Block there")
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_PVT, "Attention"))
        check_kind(self.name, where, m, "mlp", (_PVT, "MlpWithDepthwiseConv"))
        h = self._pvt_attention(node, m.attn, self.swin_norm(node, m.norm1, x, f"{path}.norm1", where),
                                f"{path}.attn", where, ch)
        x = self._emit(node, "add", [x, h], f"{path}.add1")
        h = self._pvt_mlp(node, m.mlp, self.swin_norm(node, m.norm2, x, f"{path}.norm2", where), f"{path}.mlp", where)
        return self._emit(node, "add", [x, h], f"{path}.add2")

    def _pvt_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch: int) -> str:
        """The queries of every position over the keys and values of the map reduced by sr (or of every position)."""
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        q, kv, proj = (linear(self.name, where, part) for part in (m.q, m.kv, m.proj))
        heads = int(m.num_heads)
        if q.in_features != ch or q.out_features != ch or kv.in_features != ch or kv.out_features != 2 * ch or \
                proj.in_features != ch or proj.out_features != ch or ch % heads or int(m.head_dim) * heads != ch:
            raise UsageError(f"{self.name}: {where}: q of {q.in_features}→{q.out_features}, kv of "
                             f"{kv.in_features}→{kv.out_features}, proj of {proj.in_features}→{proj.out_features} "
                             f"and {heads} heads of {m.head_dim} are not PVT v2's attention for {ch} channels")
        qs = self._emit(node, "conv", [x], f"{path}.q", **pointwise(q))
        source = x if m.sr is None else self._pvt_reduce(node, m, x, path, where, ch)
        packed = self._emit(node, "conv", [source], f"{path}.kv", **pointwise(kv))
        k, v = (self._emit(node, "slice", [packed], f"{path}.{p}", start=i * ch, stop=(i + 1) * ch)
                for i, p in enumerate("kv"))
        attended = self._emit(node, "attention", [qs, k, v], f"{path}.attend", heads=heads,
                              scale=applied_scale(m, ch // heads))
        return self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))

    def _pvt_reduce(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch: int) -> str:
        """The keys' and values' map: sr (kernel = stride = sr_ratio) and its LayerNorm; linear attention
        (pvt_v2_*_li) first pools the map adaptively to 7 × 7, its sr a 1×1 conv, and adds a GELU after the norm."""
        sr, pool = m.sr, m.pool
        r = sr.kernel_size[0] if isinstance(sr, nn.Conv2d) else 0
        if type(sr) is not nn.Conv2d or sr.kernel_size != (r, r) or sr.stride != (r, r) or sr.padding != (0, 0) or \
                sr.groups != 1 or sr.dilation != (1, 1) or sr.in_channels != ch or sr.out_channels != ch or \
                pool is not None and (type(pool) is not nn.AdaptiveAvgPool2d or r != 1 or
                                      None in pair(pool.output_size)):
            raise UsageError(f"{self.name}: {where}: its sr is a {type(sr).__name__} (pool "
                             f"{type(pool).__name__}); edgecl converts an nn.Conv2d of {ch} channels with kernel "
                             "and stride alike and no padding (timm's), 1×1 after an nn.AdaptiveAvgPool2d to a "
                             "fixed size where linear")
        if pool is not None:
            size = [int(s) for s in pair(pool.output_size)]
            x = self._emit(node, "adaptive_avgpool", [x], f"{path}.pool", size=size)
        h = self.swin_norm(node, m.norm, self._conv(node, sr, x, f"{path}.sr", where), f"{path}.norm", where)
        return h if pool is None else self._act(node, m.act, h, f"{path}.act", where)

    def _pvt_mlp(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's MlpWithDepthwiseConv: fc1 → [ReLU] → depthwise 3×3 conv on the map → act → fc2."""
        check_drops(self.name, where, m, "drop")
        fc1, fc2, dw = linear(self.name, where, m.fc1), linear(self.name, where, m.fc2), m.dwconv
        hidden = fc1.out_features
        if type(dw) is not nn.Conv2d or dw.in_channels != hidden or dw.out_channels != hidden or \
                dw.groups != hidden or dw.kernel_size != (3, 3) or dw.stride != (1, 1) or dw.padding != (1, 1) or \
                fc2.in_features != hidden:
            raise UsageError(f"{self.name}: {where}: fc1 of {fc1.in_features}→{hidden}, dwconv "
                             f"{type(dw).__name__} and fc2 of {fc2.in_features}→{fc2.out_features} are not PVT v2's "
                             "MLP (a 3×3 depthwise conv, stride 1, padding 1, between its Linears)")
        h = self._emit(node, "conv", [x], f"{path}.fc1", **pointwise(fc1))
        h = h if isinstance(m.relu, nn.Identity) else self._act(node, m.relu, h, f"{path}.relu", where)
        h = self._conv(node, dw, h, f"{path}.dwconv", where)
        h = h if isinstance(m.act, nn.Identity) else self._act(node, m.act, h, f"{path}.act", where)
        return self._emit(node, "conv", [h], f"{path}.fc2", **pointwise(fc2))
