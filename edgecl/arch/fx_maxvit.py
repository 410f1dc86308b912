"""MaxViT's attention blocks (timm's ``timm.models.maxxvit.PartitionAttentionCl``) in a user's network, for
`fx_import._Converter`. They read and write channels-last ``(B, H, W, C)`` maps (`fx_norms`); the tracer keeps them
whole, because their window and grid partitions go through 6-D views that the spec has no values for. Each becomes
what its forward computes on the (C, H, W) map, in spec ops:

    norm1 → qkv (1×1 conv) → q, k, v (slices; per head blocks where timm packs each head's q, k, v together,
    ``head_first``) → attention {window [ph, pw] for the block partition, or ``dilated`` for the grid partition
    (the positions H/ph, W/pw apart, timm's grid_partition); the relative position bias} → proj → add the input →
    norm2 → mlp (fc1, act, fc2) → add

torchvision's ``PartitionAttentionLayer`` (maxvit_t) reads and writes a channels-first map and computes the same:
its window partition of p × p, and its grid partition (windows of p = H / partition_size, the axes swapped so
attention runs across the windows) is a dilated window [partition_size, partition_size]; attn_layer (LayerNorm,
RelativePositionalMultiHeadAttention: to_qkv, scale (C)^-½, the bias, merge), mlp_layer (LayerNorm, Linear, act,
Linear), each added.

The bias is timm's RelPosBias or torchvision's table (Swin's layout: ``relative_position_bias_table`` (offsets,
heads) and its fixed ``relative_position_index``, ``bias_table`` "swin"), or timm's RelPosBiasTf (TensorFlow
MaxViT's: the table (heads, 2·wh − 1, 2·ww − 1) read through two one-hot lookups, which are the node's fixed index;
``bias_table`` "tf"), per window or grid window. Refused by name with the user's source line: a map the partition
does not tile, the MLP-generated bias (``RelPosMlp``, ``maxvit_rmlp_*``), the channels-first
``PartitionAttention2d`` and the parallel variant, layer scales, and other layers in the block's places.

CoAtNet's channels-first ``Attention2d`` (timm.models.maxxvit, in its TransformerBlock2d) is kept whole too: qkv (1×1
conv; each head's q, k, v side by side where ``head_first``) → attention over the whole map {its RelPosBias over the
map} → proj (1×1 conv). Refused by name: RelPosMlp, a bias built for another map, a shared bias passed in, other
projections.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.arch.mlp_bias import mlp_coords
from edgecl.errors import UsageError

_MAXXVIT, _TORCHVISION = "timm.models.maxxvit", "torchvision.models.maxvit"
_KINDS = {(_MAXXVIT, "PartitionAttentionCl"): "timm", (_MAXXVIT, "PartitionAttention2d"): None,
          (_MAXXVIT, "ParallelPartitionAttention"): None, (_TORCHVISION, "PartitionAttentionLayer"): "torchvision"}


def is_maxvit(m: Any) -> bool:
    """A MaxViT partition attention block (timm's channels-first and parallel ones refused by name), by class."""
    return (type(m).__module__, type(m).__name__) in _KINDS


def is_attention2d(m: Any) -> bool:
    """timm's channels-first ``Attention2d`` (CoAtNet's transformer blocks: attention over the whole map)."""
    return (type(m).__module__, type(m).__name__) == (_MAXXVIT, "Attention2d")


class _MaxVitConverter:
    """Mixin of `fx_import._Converter`: MaxViT's window and grid attention blocks, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _head_blocks: Callable[..., list[str]]
    attend_packed: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]
    _conv_fields: Callable[..., dict]

    def maxvit(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"MaxViT {type(m).__name__} at {path!r} {location(node)}"
        kind = _KINDS[(type(m).__module__, type(m).__name__)]
        if kind is None:
            raise UsageError(f"{self.name}: {where} is not supported (channels-first or parallel partitions); "
                             "edgecl converts timm's channels-last PartitionAttentionCl (maxvit_*_rw)")
        shape, last = shape_of(node.args[0]), kind == "timm"
        if (node.args[0] in self.last) != last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports it on "
                             f"{'channels-last (batch, height, width, channels)' if last else '(batch, channels, '}"
                             f"{'' if last else 'height, width)'} maps")
        if not last:
            return self._torchvision_partition(node, m, x, path, where, shape[1:])
        size = [int(p) for p in m.partition_size]
        if shape[0] % size[0] or shape[1] % size[1]:
            raise UsageError(f"{self.name}: {where}: its {size[0]}×{size[1]} partition does not tile the "
                             f"{shape[0]}×{shape[1]} map; build the model for the input size (img_size=…)")
        check_drops(self.name, where, m, "drop_path1", "drop_path2", "ls1", "ls2")
        normed = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        attended = self._partition_attention(node, m.attn, normed, f"{path}.attn", where, size,
                                             not m.partition_block)
        h = self._emit(node, "add", [x, attended], f"{path}.add1")
        if (type(m.mlp).__module__, type(m.mlp).__name__) != ("timm.layers.mlp", "Mlp") or \
                not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: its mlp is a {type(m.mlp).__name__}; edgecl converts timm's "
                             "Mlp with an activation and no norm")
        out = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, h, f"{path}.norm2", where), f"{path}.mlp",
                            where)
        self._emit(node, "add", [h, out], f"{path}.add2")
        self.last.add(node)

    def attention2d(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """CoAtNet's Attention2d on the (C, H, W) map: qkv (1×1 conv; each head's q, k, v side by side where
        ``head_first``) → attention over the whole map {its RelPosBias over the map} → proj (1×1 conv)."""
        where = f"Attention2d at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] in self.last or shape is None or len(shape) != 3 or len(node.args) > 1 or \
                any(v is not None for v in node.kwargs.values()):
            raise UsageError(f"{self.name}: {where} reads {shape} with {len(node.args) - 1} more argument(s) and "
                             f"{dict(node.kwargs)}; edgecl converts it on a (batch, channels, height, width) map, "
                             "without a shared relative position bias")
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        heads, d = int(m.num_heads), int(m.dim_head)
        for conv, width in ((m.qkv, 3 * heads * d), (m.proj, None)):
            if type(conv) is not nn.Conv2d or tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or \
                    conv.groups != 1 or width is not None and conv.out_channels != width:
                raise UsageError(f"{self.name}: {where}: {conv} where edgecl converts timm's 1×1 Conv2d"
                                 f"{'' if width is None else f' of {width} outputs ({heads} heads × 3 × {d})'}")
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(m, d)}
        if m.rel_pos is not None:
            if list(getattr(m.rel_pos, "window_size", ())) != shape[1:]:
                raise UsageError(f"{self.name}: {where}: its relative position bias covers a "
                                 f"{getattr(m.rel_pos, 'window_size', None)} map, it reads {shape[1:]}; build the "
                                 "model for the input size (img_size=…)")
            fields.update(module=f"{path}.rel_pos", **self._relative_bias(m.rel_pos, where, shape[1:]))
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **self._conv_fields(node, m.qkv, f"{path}.qkv"))
        if m.head_first:
            q, k, v = self._head_blocks(node, packed, f"{path}.qkv", heads, [d, d, d])
            attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **fields)
        else:
            attended = self.attend_packed(node, packed, path, heads * d, **fields)
        self._emit(node, "conv", [attended], f"{path}.proj", **self._conv_fields(node, m.proj, f"{path}.proj"))

    def _relative_bias(self, rel: nn.Module, where: str, size: list[int]) -> dict[str, Any]:
        """The bias fields of timm's RelPosBias (Swin's layout) or RelPosBiasTf (TensorFlow MaxViT's)."""
        kind, t = type(rel).__name__, size[0] * size[1]
        known = type(rel).__module__ == "timm.layers.pos_embed_rel" and kind in ("RelPosBias", "RelPosBiasTf") and \
            not int(getattr(rel, "prefix_tokens", 0) or 0)
        if known and kind == "RelPosBias":
            return {"bias_offsets": int(rel.relative_position_bias_table.shape[0]), "bias_table": "swin",
                    "bias_index": rel.relative_position_index.reshape(t, t).tolist()}
        if type(rel).__module__ == "timm.layers.pos_embed_rel" and kind == "RelPosMlp":
            return rel_pos_mlp_fields(self.name, where, rel, size)
        index = _tf_index(rel, size) if known else None
        if index is None:
            raise UsageError(f"{self.name}: {where}: its relative position bias is a {kind}; edgecl converts timm's "
                             "RelPosBias and RelPosBiasTf (learned tables: maxvit_*_rw, maxvit_*_tf) and RelPosMlp "
                             "(mode 'cr': maxvit_rmlp_*, coatnet_rmlp_*)")
        heads, vh, vw = rel.relative_position_bias_table.shape
        return {"bias_offsets": int(vh * vw), "bias_table": "tf", "bias_index": index}

    def _torchvision_partition(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                               shape: list[int]) -> None:
        """torchvision's PartitionAttentionLayer on the channels-first map: window p × p, or grid (dilated)."""
        p = int(m.p)
        if shape[0] % p or shape[1] % p or list(m.grid_size) != shape:
            raise UsageError(f"{self.name}: {where}: built for a {tuple(m.grid_size)} map with partitions of {p}, "
                             f"reads {shape[0]}×{shape[1]}")
        check_drops(self.name, where, m, "stochastic_dropout")
        norm, attn, drop = _parts(self.name, where, m.attn_layer, 3)
        mlp_norm, fc1, act, fc2, mlp_drop = _parts(self.name, where, m.mlp_layer, 5)
        grid = m.partition_type == "grid"
        size = [shape[0] // p, shape[1] // p] if grid else [p, p]
        if type(attn).__name__ != "RelativePositionalMultiHeadAttention" or \
                (type(drop).__name__, type(mlp_drop).__name__) != ("Dropout", "Dropout"):
            raise UsageError(f"{self.name}: {where}: attn_layer holds a {type(attn).__name__}; edgecl converts "
                             "torchvision's LayerNorm, RelativePositionalMultiHeadAttention, Dropout there")
        heads, table, t = int(attn.n_heads), attn.relative_position_bias_table, size[0] * size[1]
        qkv, merge = linear(self.name, where, attn.to_qkv), linear(self.name, where, attn.merge)
        packed = self._emit(node, "conv", [self.swin_norm(node, norm, x, f"{path}.attn_layer.0", where)],
                            f"{path}.attn_layer.1.to_qkv", **pointwise(qkv))
        attended = self.attend_packed(
            node, packed, f"{path}.attn_layer.1", qkv.out_features // 3, module=f"{path}.attn_layer.1", heads=heads,
            scale=float(attn.scale_factor), window=size, **({"dilated": True} if grid else {}),
            bias_offsets=int(table.shape[0]), bias_index=attn.relative_position_index.reshape(t, t).tolist(),
            bias_table="swin")
        h = self._emit(node, "add", [x, self._emit(node, "conv", [attended], f"{path}.attn_layer.1.merge",
                                                   **pointwise(merge))], f"{path}.add1")
        mlp = SimpleNamespace(fc1=fc1, act=act, fc2=fc2, drop1=nn.Identity(), drop2=nn.Identity())
        out = self.norm_mlp(node, mlp, self.swin_norm(node, mlp_norm, h, f"{path}.mlp_layer.0", where),
                            f"{path}.mlp_layer", where, ("1", "2", "3"))
        self._emit(node, "add", [h, out], f"{path}.add2")

    def _partition_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, size: list[int],
                             grid: bool) -> str:
        """AttentionCl over each window (or grid window): qkv, its relative position bias, proj."""
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        qkv, proj, heads, d = linear(self.name, where, m.qkv), linear(self.name, where, m.proj), \
            int(m.num_heads), int(m.dim_head)
        if qkv.out_features != 3 * heads * d:
            raise UsageError(f"{self.name}: {where}: {path}.qkv has {qkv.out_features} outputs, not 3 × {heads} "
                             f"heads × {d}")
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(m, d), "window": size}
        if grid:
            fields["dilated"] = True
        if m.rel_pos is not None:
            fields.update(module=f"{path}.rel_pos", **self._relative_bias(m.rel_pos, where, size))
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv))
        if m.head_first:  # timm packs each head's q, k, v side by side
            q, k, v = self._head_blocks(node, packed, f"{path}.qkv", heads, [d, d, d])
            attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **fields)
        else:
            attended = self.attend_packed(node, packed, path, heads * d, **fields)
        return self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))


def rel_pos_mlp_fields(model: str, where: str, rel: nn.Module, size: list[int]) -> dict[str, Any]:
    """RelPosMlp (no prefix tokens) in timm's mode "cr" (no gain: fc1 (2 → hidden, bias), ReLU, fc2 (hidden → heads,
    bias)) or "swin" (16·sigmoid, fc2 without a bias: ``bias_mlp_form`` "rel_pos_swin", its coordinates normalised
    by the pretrained window or its own) over its log coordinates of `size`'s offsets, read at its index (MaxViT's and
    the relative-position ViT's, `fx_vit_bias`)."""
    mlp, t, swin = rel.mlp, size[0] * size[1], rel.mode == "swin"
    pretrained = [int(p) for p in rel.pretrained_window_size]
    form = {"bias_mlp_form": "rel_pos_swin", "bias_mlp_span": pretrained if pretrained[0] > 0 else list(size)} \
        if swin else {}
    output = isinstance(rel.bias_act, nn.Sigmoid) and rel.bias_gain == 16 if swin else \
        rel.mode == "cr" and isinstance(rel.bias_act, nn.Identity) and rel.bias_gain is None
    plain = output and not rel.prefix_tokens and list(rel.window_size) == size and \
        is_relu_mlp(mlp, rel.num_heads, fc2_bias=not swin) and \
        np.allclose(rel.rel_coords_log.detach().cpu().numpy().reshape(-1, 2), mlp_coords(form, *size), atol=1e-6)
    if not plain:
        raise UsageError(f"{model}: {where}: its RelPosMlp (mode {rel.mode!r}, window {rel.window_size}) is not "
                         f"timm's mode 'cr' or 'swin' over the {size[0]}×{size[1]} map or window with fc1 (2 → "
                         "hidden) + bias, ReLU, fc2 (hidden → heads; + bias in mode 'cr') and its own log "
                         "coordinates; edgecl converts those")
    return {"bias_offsets": (2 * size[0] - 1) * (2 * size[1] - 1), "bias_table": "mlp", **form,
            "bias_mlp": mlp.fc1.out_features, "bias_index": rel.relative_position_index.reshape(t, t).tolist()}


def _tf_index(rel: nn.Module, size: list[int]) -> list[list[int]] | None:
    """RelPosBiasTf's one-hot lookups as an index into its table flattened to (heads, (2·wh − 1)(2·ww − 1)):
    query (i, j) and key (x, y) read row height_lookup[i, x], column width_lookup[j, y]; None unless each lookup
    picks exactly one entry (timm zeroes distances beyond a maximum: no table entry)."""
    rows, cols = rel.height_lookup, rel.width_lookup
    if not all(bool(((t == 0) | (t == 1)).all()) and bool((t.sum(-1) == 1).all()) for t in (rows, cols)):
        return None
    r, c, width = rows.argmax(-1), cols.argmax(-1), cols.shape[-1]
    cells = [(i, j) for i in range(size[0]) for j in range(size[1])]
    return [[int(r[i, x]) * width + int(c[j, y]) for x, y in cells] for i, j in cells]


def _parts(model: str, where: str, seq: nn.Module, n: int) -> list[nn.Module]:
    """The n layers of an nn.Sequential inside a torchvision MaxViT layer."""
    if not isinstance(seq, nn.Sequential) or len(seq) != n:
        raise UsageError(f"{model}: {where}: holds a {type(seq).__name__} of {len(list(seq.children()))} layers "
                         f"where edgecl converts torchvision's nn.Sequential of {n}")
    return list(seq)


def is_relu_mlp(mlp: nn.Module, heads: int, fc2_bias: bool = True) -> bool:
    """timm's Mlp as a position-bias MLP: fc1 (2 → hidden) with a bias, ReLU, no norm, fc2 (hidden → heads) with a
    bias (or, `fc2_bias` false, without: RelPosMlp's mode 'swin') (its dropouts identities at inference): RelPosMlp's
    and Swin V2-CR's meta MLP."""
    return (type(mlp).__module__, type(mlp).__name__) == ("timm.layers.mlp", "Mlp") and \
        isinstance(mlp.act, nn.ReLU) and isinstance(mlp.norm, nn.Identity) and \
        all(type(fc) is nn.Linear for fc in (mlp.fc1, mlp.fc2)) and mlp.fc1.bias is not None and \
        (mlp.fc2.bias is not None) == fc2_bias and mlp.fc1.in_features == 2 and mlp.fc2.out_features == heads
