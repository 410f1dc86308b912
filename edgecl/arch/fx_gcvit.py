"""GC ViT's blocks (timm's ``timm.models.gcvit``: gcvit_*) in a user's network, for `fx_import._Converter`. The
tracer keeps each ``GlobalContextVitBlock`` whole: it cuts the channels-last map into windows through 6-D views
(``window_partition``/``window_reverse``) and, in every other block, hands each window the stage's global query,
which the spec has no values for. The stage around it (downsampling, the FeatureBlock that pools the map down to
one window's size: the global query, the permutes) is traced. On the (C, H, W) map x and the (C, ws, ws) global
query g (both channels-last in torch) a block becomes

    norm1 → attn.qkv (1×1 conv) → slices q, k, v; or, where the block uses the global query (qkv makes only k, v):
    slices k, v and q = g tiled over the map (``upsample`` mode "tile": each window's positions get g's, as timm
    repeats it for every window) → attention {window [ws, ws], heads, scale, relative position bias (timm's
    RelPosBias: Swin's table)} → attn.proj → [ls1] → add → norm2 → mlp (fc1, act, fc2) → [ls2] → add

timm's attention always multiplies q by ``m.scale`` (no fused path). A map the windows do not tile (timm's views
fail there too), a global query that is not one window's size, a layer other than timm's in any place, and a
dropout or drop path that is not an identity at inference are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_norms import layer_scale_fields
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

_GCVIT = "timm.models.gcvit"


def is_gcvit_block(m: Any) -> bool:
    """GC ViT's window-attention block (``GlobalContextVitBlock``), judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_GCVIT, "GlobalContextVitBlock")


class _GcVitConverter:
    """Mixin of `fx_import._Converter`: GC ViT's blocks, kept whole."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    _input: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]
    _relative_bias: Callable[..., dict[str, Any]]

    def gcvit_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"GC ViT GlobalContextVitBlock at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        query = node.args[1] if len(node.args) > 1 else node.kwargs.get("q_global")
        if node.args[0] not in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl converts it on a "
                             "channels-last (batch, height, width, channels) map")
        (height, width, ch), ws = shape, [int(w) for w in m.window_size]
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_GCVIT, "WindowAttentionGlobal"))
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        attn = m.attn
        check_drops(self.name, where, attn, "attn_drop", "proj_drop")
        heads, qkv, proj = int(attn.num_heads), linear(self.name, where, attn.qkv), linear(self.name, where, attn.proj)
        shared = bool(attn.use_global) and query is not None
        if height % ws[0] or width % ws[1] or [int(w) for w in attn.window_size] != ws or ch % heads or \
                qkv.in_features != ch or qkv.out_features != (2 if attn.use_global else 3) * ch or \
                proj.in_features != ch or proj.out_features != ch or not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: a {height}×{width} map of {ch} channels, windows {ws}, {heads} "
                             f"heads, qkv of {qkv.in_features}→{qkv.out_features}, proj of {proj.in_features}→"
                             f"{proj.out_features} and an mlp norm {type(m.mlp.norm).__name__} are not GC ViT's "
                             "(windows that tile the map)")
        h = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        packed = self._emit(node, "conv", [h], f"{path}.attn.qkv", **pointwise(qkv))
        parts = "kv" if attn.use_global else "qkv"
        sliced = {p: self._emit(node, "slice", [packed], f"{path}.attn.{p}", start=i * ch, stop=(i + 1) * ch)
                  for i, p in enumerate(parts)}
        if attn.use_global:
            if not shared:
                raise UsageError(f"{self.name}: {where}: its attention makes keys and values only (use_global) and "
                                 "is called without the global query; edgecl converts timm's stage, which passes it")
            sliced["q"] = self._global_query(node, query, path, where, ch, ws, [height // ws[0], width // ws[1]])
        fields: dict[str, Any] = {"heads": heads, "scale": float(attn.scale), "window": ws,
                                  "module": f"{path}.attn.rel_pos",
                                  **self._relative_bias(attn.rel_pos, where, ws)}
        h = self._emit(node, "attention", [sliced["q"], sliced["k"], sliced["v"]], f"{path}.attn.attend", **fields)
        h = self.timm_layer_scale(node, m.ls1, self._emit(node, "conv", [h], f"{path}.attn.proj",
                                                          **pointwise(proj)), f"{path}.ls1", where)
        x = self._emit(node, "add", [x, h], f"{path}.add1")
        h = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, x, f"{path}.norm2", where), f"{path}.mlp",
                          where)
        self._emit(node, "add", [x, self.timm_layer_scale(node, m.ls2, h, f"{path}.ls2", where)], f"{path}.add2")
        self.last.add(node)

    def _global_query(self, node: fx.Node, query: Any, path: str, where: str, ch: int, ws: list[int],
                      windows: list[int]) -> str:
        """The stage's global query (C, ws, ws), channels-last in torch, tiled so that every window reads it."""
        shape = shape_of(query)
        if query not in self.last or shape != [*ws, ch]:
            raise UsageError(f"{self.name}: {where}: its global query has shape {shape}; edgecl converts one "
                             f"window's channels-last map ({ws[0]}, {ws[1]}, {ch}), as timm's stage makes it")
        g = self._input(query, node)
        return g if windows == [1, 1] else self._emit(node, "upsample", [g], f"{path}.attn.q_global", scale=windows,
                                                     mode="tile")

    def timm_layer_scale(self, node: fx.Node, ls: nn.Module, x: str, path: str, where: str) -> str:
        """timm's LayerScale (x · gamma per channel) or nothing where the block has an identity (SAM's blocks too)."""
        if isinstance(ls, nn.Identity):
            return x
        if (type(ls).__module__, type(ls).__name__) != ("timm.layers.layer_scale", "LayerScale"):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(ls).__name__}; edgecl converts timm's "
                             "LayerScale or an identity there")
        return self._emit(node, "layer_scale", [x], f"{path}.gamma", **layer_scale_fields(ls.gamma, ls.gamma.numel()))
