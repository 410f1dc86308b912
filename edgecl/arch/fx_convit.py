"""ConViT's attentions (timm's ``timm.models.convit``) in a user's network, for `fx_import._Converter`. The tracer
keeps both whole (GPSA builds its relative offsets by item assignment, which torch.fx cannot trace; both reshape and
permute the heads); each becomes, on the tokens as their (C, T, 1) map:

- ``GPSA`` (gated positional self-attention): qk (1×1 conv) → slices q, k; v (1×1 conv) → attention {heads,
  m.scale, gated_pos} → proj: the content softmax mixed per head with the softmax of ``pos_proj`` of each query-key
  offset on the square token grid, by σ(``gating_param``), renormalised (`edgecl.arch.gpsa_ops`).
- ``MHSA`` (the plain attention of the blocks after the class token is prepended): timm's Attention chain at
  ``m.scale`` (`fx_attention`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.arch.gpsa_ops import grid_side, relative_offsets
from edgecl.errors import UsageError

_MODULE = "timm.models.convit"


def is_gpsa(m: Any) -> bool:
    """timm's ConViT ``GPSA``, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_MODULE, "GPSA")


def is_convit_mhsa(m: Any) -> bool:
    """timm's ConViT ``MHSA``."""
    return (type(m).__module__, type(m).__name__) == (_MODULE, "MHSA")


class _ConvitConverter:
    """Mixin of `fx_import._Converter`: ConViT's GPSA and MHSA, kept whole."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    _attention: Callable[..., None]

    def convit_mhsa(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """MHSA: qkv, attention at m.scale (its forward has no fused path), proj."""
        where = f"ConViT MHSA at {path!r} {location(node)}"
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        qkv, proj = linear(self.name, where, m.qkv), linear(self.name, where, m.proj)
        self._attention(node, x, path, _heads(self.name, where, m, qkv.in_features), float(m.scale),
                        (qkv, f"{path}.qkv", None), (proj, f"{path}.proj"), where)

    def gpsa(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """GPSA on tokens of a square grid: q and k from qk, v, the attention with gated positions, proj."""
        where = f"ConViT GPSA at {path!r} {location(node)}"
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        qk, v, proj = (linear(self.name, where, getattr(m, p)) for p in ("qk", "v", "proj"))
        tokens = shape_of(node.args[0])
        if node.args[0] not in self.last or tokens is None or len(tokens) != 2 or grid_side(tokens[0]) is None:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {tokens}; edgecl converts it on the "
                             "(batch, tokens, channels) tokens of a square patch grid, row by row")
        ch = tokens[1]
        heads = _heads(self.name, where, m, ch)
        if qk.out_features != 2 * ch or (v.in_features, v.out_features) != (ch, ch) or \
                (proj.in_features, proj.out_features) != (ch, ch):
            raise UsageError(f"{self.name}: {where}: qk must map {ch} channels to 2·{ch}, v and proj {ch} to {ch}")
        pos = m.pos_proj
        if type(pos) is not nn.Linear or (pos.in_features, pos.out_features) != (3, heads) or pos.bias is None or \
                tuple(m.gating_param.shape) != (heads,):
            raise UsageError(f"{self.name}: {where}: pos_proj is {pos!r} and gating_param of shape "
                             f"{tuple(m.gating_param.shape)}; edgecl converts an nn.Linear(3, {heads}) with a bias "
                             f"and a gate per head")
        _check_offsets(self.name, where, m, tokens[0])
        packed = self._emit(node, "conv", [x], f"{path}.qk", **pointwise(qk))
        q, k = (self._emit(node, "slice", [packed], f"{path}.{part}", start=i * ch, stop=(i + 1) * ch)
                for i, part in enumerate("qk"))
        values = self._emit(node, "conv", [x], f"{path}.v", **pointwise(v))
        attended = self._emit(node, "attention", [q, k, values], f"{path}.attend", module=path, heads=heads,
                              scale=float(m.scale), gated_pos=True)
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))
        self.last.add(node)


def _heads(model: str, where: str, m: nn.Module, ch: int) -> int:
    heads = int(m.num_heads)
    if ch % heads:
        raise UsageError(f"{model}: {where}: {heads} heads do not divide its {ch} channels")
    return heads


def _check_offsets(model: str, where: str, m: nn.Module, tokens: int) -> None:
    """timm recomputes ``rel_indices`` only where its token count differs from the call's; one of that count is used
    as it is, so it must be the grid's offsets edgecl computes (one edited after construction is refused)."""
    rel = getattr(m, "rel_indices", None)
    if rel is None or rel.dim() != 4 or rel.shape[1] != tokens:
        return
    want = relative_offsets(grid_side(tokens)).transpose(1, 2, 0)
    got = rel.detach().cpu().numpy()
    if got.shape != (1, *want.shape) or not np.array_equal(got[0], want):
        raise UsageError(f"{model}: {where}: its rel_indices are not the (dx, dy, dx² + dy²) offsets of the "
                         f"{grid_side(tokens)}² token grid timm computes; edgecl converts those")
