"""Swin Transformer V2 layers (timm's ``timm.models.swin_transformer_v2`` and ``swin_transformer_v2_cr``) in a user's
network, for
`fx_import._Converter`. Kept whole by the tracer as Swin V1's are (`fx_swin`: channels-last maps, windows through
6-D views, ``torch.roll``, a mask buffer) and converted to the same spec ops, on the (C, H, W) map:

    SwinTransformerV2Block: qkv (1×1 conv, bias cat(q_bias, k_bias, v_bias)) → slices q, k, v → attention {window,
    shift, ``cosine``, bias table "swin"} → proj → norm1 → add the input → mlp (fc1, act, fc2) → norm2 → add
    (post-norm: each norm after its branch, before the residual sum)
    PatchMerging: pad an odd side by one zero row/column → space_to_depth {block 2, order "wh"} → reduction (1×1
    conv without bias) → norm (the norm after the reduction)
    V2-CR (``swinv2_cr_*``): the same block with a plain qkv Linear, a (heads,) logit scale, its bias table
    meta_mlp(log coordinates) for every pair of a window's positions (index t·wh·ww + s), an optional norm3 after
    the block; its PatchMerging is Swin V1's (norm, then reduction)

Scaled cosine attention is the attention's ``cosine``, its ``logit_scale`` the module's (`edgecl.arch.ops`). The
continuous position bias, 16·sigmoid(cpb_mlp(relative_coords_table)) read at the fixed relative_position_index,
depends on the module's parameters alone at inference: it is converted as what it adds to the scores, a (heads,
offsets) table of those values read by the same index (Swin V1's ``bias_table`` "swin"), so the spec computes the
module's bias exactly and every form, method and check of Swin V1's bias serves it; what trains is then the table
itself, as in Swin V1, not the MLP that made it (the MLP's bound, 0…16, and its smoothness over offsets are not
kept). The table and the qkv bias are values the module computes rather than holds: `swin_v2_values` derives them
(`module_values`), so they go in with ``--init-weights module`` but no state-dict file holds them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, check_kind, check_timm_mask, linear
from edgecl.errors import UsageError

_V2, _CR = "timm.models.swin_transformer_v2", "timm.models.swin_transformer_v2_cr"
_KINDS = {(_V2, "SwinTransformerV2Block"): "block", (_V2, "PatchMerging"): "merge",
          (_CR, "SwinTransformerV2CrBlock"): "cr_block", (_CR, "PatchMerging"): "cr_merge"}


def is_swin_v2(m: Any) -> bool:
    """timm's Swin V2 (and V2-CR) block or patch merging, judged by its class; nothing is imported."""
    return (type(m).__module__, type(m).__name__) in _KINDS


def swin_v2_values(path: str, m: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a spec holds that a timm Swin V2 WindowAttention at `path` computes from its own, by the keys the
    spec names them with: ``qkv.bias``, cat(q_bias, k_bias, v_bias) (none without a qkv bias), and
    ``relative_position_bias_table``, 16·sigmoid(cpb_mlp(relative_coords_table)) as ``(offsets, heads)``: what its
    forward adds, before gathering by the index (sigmoid and the gather commute); a V2-CR WindowMultiHeadAttention's
    by `_cr_values`. Empty for any other module."""
    if (type(m).__module__, type(m).__name__) == (_CR, "WindowMultiHeadAttention"):
        return _cr_values(path, m)
    if (type(m).__module__, type(m).__name__) != (_V2, "WindowAttention"):
        return {}
    with torch.no_grad():
        table = 16 * torch.sigmoid(m.cpb_mlp(m.relative_coords_table).view(-1, m.num_heads))
        out = {f"{path}.relative_position_bias_table": table}
        if m.q_bias is not None:
            out[f"{path}.qkv.bias"] = torch.cat((m.q_bias, m.k_bias, m.v_bias))
    return out


class _SwinV2Converter:
    """Mixin of `fx_import._Converter`: timm's Swin V2 blocks and patch mergings, kept whole."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    window_attention: Callable[..., str]
    _swin_merge: Callable[..., None]
    norm_mlp: Callable[..., str]
    swin_norm: Callable[..., str]

    def swin_v2(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"Swin V2 {type(m).__name__} at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports Swin's layers "
                             "on channels-last (batch, height, width, channels) maps")
        getattr(self, f"_swin_v2_{_KINDS[(type(m).__module__, type(m).__name__)]}")(node, m, x, path, where, shape)
        self.last.add(node)

    def _swin_v2_block(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> None:
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_V2, "WindowAttention"))
        check_timm_mask(self.name, where, m, shape)
        attn = m.attn
        if tuple(attn.window_size) != tuple(m.window_size) or tuple(attn.relative_position_index.shape) != \
                (m.window_size[0] * m.window_size[1],) * 2:
            raise UsageError(f"{self.name}: {where}: its attention's window {tuple(attn.window_size)} is not the "
                             f"block's {tuple(m.window_size)} (set it with the block's set_input_size)")
        table = swin_v2_values(f"{path}.attn", attn)[f"{path}.attn.relative_position_bias_table"]
        attended = self.window_attention(node, attn, x, f"{path}.attn", where, shape, m.window_size, m.shift_size,
                                         table=table, qkv_bias=attn.q_bias is not None, cosine=True, scale=1.0)
        self._post_norm_rest(node, m, x, attended, path, where)

    def _post_norm_rest(self, node: fx.Node, m: nn.Module, x: str, attended: str, path: str, where: str) -> str:
        """A post-norm block after its attention: norm1 → add → mlp → norm2 → add (→ V2-CR's norm3)."""
        h = self._emit(node, "add", [x, self.swin_norm(node, m.norm1, attended, f"{path}.norm1", where)],
                       f"{path}.add1")
        if (type(m.mlp).__module__, type(m.mlp).__name__) != ("timm.layers.mlp", "Mlp") or \
                not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: its mlp is a {type(m.mlp).__name__} with norm "
                             f"{type(getattr(m.mlp, 'norm', None)).__name__}; edgecl converts timm's Mlp with an "
                             "activation and no norm")
        out = self.swin_norm(node, m.norm2, self.norm_mlp(node, m.mlp, h, f"{path}.mlp", where), f"{path}.norm2",
                             where)
        out = self._emit(node, "add", [h, out], f"{path}.add2")
        norm3 = getattr(m, "norm3", None)  # V2-CR's extra main-branch norm (huge and giant models, stage ends)
        return out if norm3 is None or isinstance(norm3, nn.Identity) else \
            self.swin_norm(node, norm3, out, f"{path}.norm3", where)

    def _swin_v2_cr_block(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                          shape: list[int]) -> None:
        """V2-CR's block: V2's, its qkv a plain Linear, its logit scale (heads,), its position bias an MLP's output
        for every pair of a window's positions (no index: the table is (window², heads), each pair its own row)."""
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_CR, "WindowMultiHeadAttention"))
        check_timm_mask(self.name, where, m, shape)
        attn = m.attn
        if attn.sequential_attn or tuple(attn.window_size) != tuple(m.window_size):
            raise UsageError(f"{self.name}: {where}: its attention is sequential or its window "
                             f"{tuple(attn.window_size)} is not the block's {tuple(m.window_size)}; edgecl converts "
                             "timm's parallel window attention")
        check_kind(self.name, where, attn, "meta_mlp", ("timm.layers.mlp", "Mlp"))
        area = m.window_size[0] * m.window_size[1]
        table = _cr_values(f"{path}.attn", attn)[f"{path}.attn.relative_position_bias_table"]
        attended = self.window_attention(node, attn, x, f"{path}.attn", where, shape, m.window_size, m.shift_size,
                                         table=table, index=torch.arange(area * area), cosine=True, scale=1.0)
        self._post_norm_rest(node, m, x, attended, path, where)

    def _swin_v2_cr_merge(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                          shape: list[int]) -> None:
        """V2-CR's merging is Swin V1's: norm, then reduction (`fx_swin`)."""
        self._swin_merge(node, m, x, path, where, shape)

    def _swin_v2_merge(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> None:
        """x0..x3 = (0, 0), (1, 0), (0, 1), (1, 1) side by side (Swin V1's order), reduction, then norm."""
        height, width, _ = shape
        if height % 2 or width % 2:  # padded at the bottom / right by one zero row or column
            x = self._emit(node, "pad", [x], f"{path}.pad", pads=[0, 0, height % 2, width % 2], value=0.0)
        merged = self._emit(node, "space_to_depth", [x], f"{path}.merge", block=2, order="wh")
        reduced = self._emit(node, "conv", [merged], f"{path}.reduction",
                             **pointwise(linear(self.name, where, m.reduction)))
        self.swin_norm(node, m.norm, reduced, f"{path}.norm", where)


def _cr_values(path: str, m: nn.Module) -> dict[str, torch.Tensor]:
    """V2-CR's WindowMultiHeadAttention: its position bias, meta_mlp(relative_coordinates_log) as timm's Mlp
    computes it at inference (its dropouts identities) — ``(window², heads)``, every pair of positions its own row —
    and its (heads,) logit scale in the ``(heads, 1, 1)`` the spec names it with (V2's shape)."""
    mlp = m.meta_mlp
    with torch.no_grad():
        table = mlp.fc2(mlp.norm(mlp.act(mlp.fc1(m.relative_coordinates_log))))
    return {f"{path}.relative_position_bias_table": table, f"{path}.logit_scale": m.logit_scale.reshape(-1, 1, 1)}
