"""SAM's ViT blocks (timm's ``timm.models.vision_transformer_sam``: samvit_*) in a user's network, for
`fx_import._Converter`. The tracer keeps each ``Block`` whole: on the channels-last map it cuts windows through
``F.pad`` and 6-D views (``window_partition`` / ``window_unpartition``) that the spec has no values for, and its
attention computes the decomposed relative positions with ``get_rel_pos``. The patch embedding, the position
embedding (channels-last), the neck (1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d) and the head are traced. On the
(C, H, W) map x (channels-last in torch) a block becomes

    norm1 → [pad zeros right and bottom to a multiple of the window] → attn.qkv (1×1 conv) → slices q, k, v →
    attention {heads, scale, [window [ws, ws]], rel_pos (the window, or the map for a global block), rel_dim,
    rel_mvit: q times the tables at the query's offset minus the key's, `edgecl.arch.rel_pos`} → [crop] →
    attn.proj → [ls1] → add → norm2 → mlp (fc1, act, fc2) → [ls2] → add

As in Twins and DaViT (`fx_twins`, `fx_davit`) the padded positions are zeros before qkv, so their keys (the qkv
bias) join each window's attention as timm's do, and the crop drops their outputs. timm resizes a table whose rows
are not 2·side − 1 by linear interpolation (a model built for another size): refused, naming the build argument;
so are q/k norms (``qk_norm``), rotary embeddings (``use_rope``), and a layer other than timm's in any place.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

_SAM = "timm.models.vision_transformer_sam"


def is_sam_block(m: Any) -> bool:
    """SAM's ViT block (window or global attention), judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_SAM, "Block")


class _SamConverter:
    """Mixin of `fx_import._Converter`: SAM's ViT blocks, kept whole."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    attend_packed: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]
    timm_layer_scale: Callable[..., str]

    def sam_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"SAM Block at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl converts it on a "
                             "channels-last (batch, height, width, channels) map")
        (height, width, ch), ws = shape, int(m.window_size)
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_SAM, "Attention"))
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        attn = m.attn
        check_drops(self.name, where, attn, "attn_drop", "proj_drop")
        heads, qkv, proj = int(attn.num_heads), linear(self.name, where, attn.qkv), linear(self.name, where, attn.proj)
        if ch % heads or qkv.in_features != ch or qkv.out_features != 3 * ch or proj.in_features != ch or \
                proj.out_features != ch or not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: {ch} channels, {heads} heads, qkv of {qkv.in_features}→"
                             f"{qkv.out_features}, proj of {proj.in_features}→{proj.out_features} and an mlp norm "
                             f"{type(m.mlp.norm).__name__} are not SAM's")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise UsageError(f"{self.name}: {where}: its attention has q/k norms (qk_norm=True); edgecl converts "
                             "SAM's without")
        if attn.rope is not None:
            raise UsageError(f"{self.name}: {where}: its attention has rotary embeddings (use_rope=True); edgecl "
                             "converts SAM's with relative positions (use_rel_pos) or none")
        h = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        pad = [0, 0, -height % ws, -width % ws] if ws else [0, 0, 0, 0]  # timm pads right and bottom
        h = self._emit(node, "pad", [h], f"{path}.pad", pads=pad) if any(pad) else h
        packed = self._emit(node, "conv", [h], f"{path}.attn.qkv", **pointwise(qkv))
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(attn, ch // heads),
                                  **({"window": [ws, ws]} if ws else {})}
        if attn.use_rel_pos:
            extent, kind = ([ws, ws], "windows read") if ws else ([height, width], "map reads")
            fields.update(self._sam_rel_pos(attn, extent, kind, ch // heads, path, where))
        h = self.attend_packed(node, packed, f"{path}.attn", ch, **fields)
        h = self._emit(node, "pad", [h], f"{path}.crop", pads=[-p for p in pad]) if any(pad) else h
        h = self._emit(node, "conv", [h], f"{path}.attn.proj", **pointwise(proj))
        x = self._emit(node, "add", [x, self.timm_layer_scale(node, m.ls1, h, f"{path}.ls1", where)],
                       f"{path}.add1")
        h = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, x, f"{path}.norm2", where), f"{path}.mlp",
                          where)
        self._emit(node, "add", [x, self.timm_layer_scale(node, m.ls2, h, f"{path}.ls2", where)], f"{path}.add2")
        self.last.add(node)

    def _sam_rel_pos(self, attn: nn.Module, extent: list[int], kind: str, d: int, path: str,
                     where: str) -> dict[str, Any]:
        """The attention's decomposed relative position fields: its tables must have 2·side − 1 rows of d (timm
        interpolates others to that length in every forward, which edgecl does not)."""
        rows = [tuple(attn.rel_pos_h.shape), tuple(attn.rel_pos_w.shape)]
        if rows != [(2 * extent[0] - 1, d), (2 * extent[1] - 1, d)]:
            raise UsageError(f"{self.name}: {where}: its rel_pos_h and rel_pos_w are {rows[0]} and {rows[1]}, but "
                             f"its {extent[0]}×{extent[1]} {kind} "
                             f"read tables of {(2 * extent[0] - 1, d)} and {(2 * extent[1] - 1, d)}; timm resizes "
                             "them by linear interpolation in every forward, which edgecl does not convert: build "
                             "the model for this input size (img_size) so that its tables fit")
        return {"module": f"{path}.attn", "rel_pos": extent, "rel_dim": d, "rel_mvit": True}
