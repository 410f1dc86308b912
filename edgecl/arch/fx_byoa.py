"""timm's "bring your own attention" layers in a user's network, for `fx_import._Converter`: Bottleneck
Transformers' self-attention (``BottleneckAttn``: ``botnet26t_256``, ``sebotnet33ts_256``, ``botnet50ts_256``,
``eca_botnext26ts_256``) and HaloNet's blocked attention (``HaloAttn``: ``halonet26t``, ``halonet50ts``, …). The
tracer keeps them whole: their forwards reshape q, k, v to per-head views (HaloNet unfolds overlapping windows) and
compute the relative position logits through a pad-and-reshape trick the spec has no nodes for. On the (C, H, W)
map they are

    BotNet:  qkv (1×1 conv) → slices q (heads·d), k (heads·d), v (heads·dv) → attention {heads, scale,
             rel_pos [H, W], rel_dim d, rel_scaled (timm's scale_pos_embed)} → pool (2×2 average, where stride 2)
    HaloNet: q (1×1 conv, strided where its stride divides the block), kv (1×1 conv; each head's k and v side by
             side: slices and a cat per part) → attention {… halo_blocks [bq, bk], halo h, rel_pos [bk + 2h] * 2}
             → pool (2×2 average where the stride does not divide the block)

The relative logits q·(height_rel[y − a + kh − 1] + width_rel[x − b + kw − 1]) depend on q, so they are the
attention's own fields and tensors (`edgecl.arch.rel_pos`, `edgecl.arch.halo`), read from the module's
``pos_embed.height_rel`` and ``width_rel``. Refused by name with the user's source line: a map other than BotNet's
``feat_size`` (timm's own assert), a position embedding other than the library's PosEmbedRel (or of other sizes),
projections whose outputs are not the module's q, k, v sizes, and a pool other than timm's AvgPool2d(2, 2).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError

_BOTTLENECK, _HALO = ("timm.layers.bottleneck_attn", "BottleneckAttn"), ("timm.layers.halo_attn", "HaloAttn")


def is_byoa_attention(m: Any) -> bool:
    """timm's BottleneckAttn or HaloAttn (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) in (_BOTTLENECK, _HALO)


def _rel_tables(model: str, where: str, pos: nn.Module, library: str, d: int, height: int, width: int) -> None:
    """timm's PosEmbedRel of `library` (BotNet's or HaloNet's), its tables (2·height − 1, d) and (2·width − 1, d)."""
    if (type(pos).__module__, type(pos).__name__) != (library, "PosEmbedRel") or \
            tuple(pos.height_rel.shape) != (2 * height - 1, d) or tuple(pos.width_rel.shape) != (2 * width - 1, d):
        raise UsageError(f"{model}: {where}: pos_embed is a {type(pos).__name__}; edgecl converts {library}'s "
                         f"PosEmbedRel with tables of ({2 * height - 1}, {d}) and ({2 * width - 1}, {d})")


def _pool_of(model: str, where: str, pool: nn.Module) -> None:
    """timm's identity or 2×2 average after the attention (`_lambda_pool` checks the average's fields)."""
    if not isinstance(pool, (nn.Identity, nn.AvgPool2d)):
        raise UsageError(f"{model}: {where}: pool is a {type(pool).__name__}; edgecl converts timm's identity or "
                         "AvgPool2d(2, 2)")


class _ByoaConverter:
    """Mixin of `fx_import._Converter`: timm's BottleneckAttn and HaloAttn modules kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _lambda_pool: Callable[..., str]
    _head_blocks: Callable[..., list[str]]

    def byoa_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"{type(m).__name__} at {path!r} {location(node)}"
        shape = map_shape(node, self.name, where)
        _pool_of(self.name, where, m.pool)
        out = (self._bottleneck if type(m).__name__ == "BottleneckAttn" else self._halo)(node, m, x, path, where,
                                                                                          shape)
        if isinstance(m.pool, nn.AvgPool2d):
            out = self._lambda_pool(node, m.pool, out, f"{path}.pool", where)
        self.alias[node] = out

    def _bottleneck(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> str:
        """BotNet's attention over the whole map."""
        _, height, width = shape
        heads, d, dv, pos = int(m.num_heads), int(m.dim_head_qk), int(m.dim_head_v), m.pos_embed
        _rel_tables(self.name, where, pos, _BOTTLENECK[0], d, getattr(pos, "height", 0), getattr(pos, "width", 0))
        if (height, width) != (pos.height, pos.width):
            raise UsageError(f"{self.name}: {where}: built for a {pos.height}×{pos.width} map (feat_size), reads "
                             f"{height}×{width}; build the model for the input size (img_size=…)")
        if not isinstance(m.qkv, nn.Conv2d) or m.qkv.out_channels != heads * (2 * d + dv):
            raise UsageError(f"{self.name}: {where}: qkv is {m.qkv}; edgecl converts timm's Conv2d to q, k of "
                             f"{heads} heads × {d} and v of {heads} × {dv}")
        packed = self._conv(node, m.qkv, x, f"{path}.qkv", where)
        bounds = [0, heads * d, 2 * heads * d, heads * (2 * d + dv)]
        q, k, v = (self._emit(node, "slice", [packed], f"{path}.{part}", start=a, stop=b)
                   for part, a, b in zip("qkv", bounds, bounds[1:]))
        return self._emit(node, "attention", [q, k, v], f"{path}.attend", module=path, heads=heads,
                          scale=float(m.scale), rel_pos=[height, width], rel_dim=d,
                          rel_scaled=bool(m.scale_pos_embed))

    def _halo(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> str:
        """HaloNet's blocked attention: q's blocks (a strided q conv makes them block_size // stride), k's and v's
        haloed windows; its kv conv packs each head's k and v side by side."""
        heads, d, dv, pos = int(m.num_heads), int(m.dim_head_qk), int(m.dim_head_v), m.pos_embed
        bk, bq, halo, win = int(m.block_size), int(m.block_size_ds), int(m.halo_size), int(m.win_size)
        _rel_tables(self.name, where, pos, _HALO[0], d, win, win)
        if int(pos.block_size) != bq or win != bk + 2 * halo:
            raise UsageError(f"{self.name}: {where}: pos_embed is built for blocks of {pos.block_size}, the queries' "
                             f"are {bq} (window {win}, block {bk}, halo {halo})")
        for conv, width in ((m.q, heads * d), (m.kv, heads * (d + dv))):
            if not isinstance(conv, nn.Conv2d) or conv.out_channels != width:
                raise UsageError(f"{self.name}: {where}: {conv} where edgecl converts timm's Conv2d of {width} "
                                 f"outputs ({heads} heads × q/k {d}, v {dv})")
        q = self._conv(node, m.q, x, f"{path}.q", where)
        k, v = self._head_blocks(node, self._conv(node, m.kv, x, f"{path}.kv", where), f"{path}.kv", heads, [d, dv])
        return self._emit(node, "attention", [q, k, v], f"{path}.attend", module=path, heads=heads,
                          scale=float(m.scale), halo_blocks=[bq, bk], halo=halo, rel_pos=[win, win], rel_dim=d,
                          rel_scaled=bool(m.scale_pos_embed))
