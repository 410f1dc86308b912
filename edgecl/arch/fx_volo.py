"""VOLO (timm's ``timm.models.volo``) in a user's network, for `fx_import._Converter`. VOLO runs on channels-last maps
(B, H, W, C), which the spec holds as (C, H, W) (`fx_norms`); the tracer keeps three of its layers whole:

- ``OutlookAttention``: v (1×1 conv) of the map; the map average-pooled by ``stride`` (ceil mode), a 1×1 conv to
  heads·k⁴ logits per window; ``outlook_attention`` {heads, k, pad, stride, scale} (`edgecl.arch.outlook_ops`:
  timm's ``nn.Unfold``, softmax and ``F.fold``); proj (1×1 conv);
- ``Attention`` over the map's positions: qkv (1×1 conv) → slices q, k, v → ``attention`` {heads, scale} → proj;
- ``ClassAttention``: q of the class token (``token`` 0), the packed kv (1×1 conv) of every token → slices k, v →
  ``attention`` → proj (the class token's new value).

A layer other than timm's in their places, a stride that does not pool to the unfold's windows, and a dropout that is
not an identity at inference are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, pair, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.arch.windows import window_length
from edgecl.errors import UsageError

_VOLO = "timm.models.volo"


def is_outlook(m: Any) -> bool:
    """VOLO's ``OutlookAttention``, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_VOLO, "OutlookAttention")


def is_volo_attention(m: Any) -> bool:
    """VOLO's ``Attention`` over a channels-last map or its ``ClassAttention``."""
    return (type(m).__module__, type(m).__name__) in ((_VOLO, "Attention"), (_VOLO, "ClassAttention"))


def no_tensor_why(node: fx.Node) -> str:
    """Why a call whose value is no tensor is refused: a max or min over a dim (values and indices) says what it
    is, and where it is VOLO's token-labelling aux head (``aux_head(x[:, 1:]).max(1)[0]`` added to the logits) how to
    build the model without it: a classifier's maximum over tokens is no linear head per-task heads can replace."""
    if node.target not in ("max", "min", torch.max, torch.min):
        return "it returns no tensor"
    aux = " (VOLO's token-labelling aux_head: build it with use_aux_head=False)" if "aux" in str(node.args[0]) else ""
    return (f"a {node.target if isinstance(node.target, str) else node.target.__name__} over a dim (values and "
            f"indices) is not supported; a classifier's maximum over tokens{aux} is no linear classifier that "
            "edgecl's per-task heads can replace")


class _VoloConverter:
    """Mixin of `fx_import._Converter`: VOLO's outlook, map and class attentions, kept whole."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    attend_packed: Callable[..., str]

    def outlook(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"VOLO OutlookAttention at {path!r} {location(node)}"
        ch, height, width = self._volo_map(node, where)
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        v, logits, proj = (linear(self.name, where, getattr(m, p)) for p in ("v", "attn", "proj"))
        heads, k, pad, stride = int(m.num_heads), int(m.kernel_size), int(m.padding), int(m.stride)
        unfold, pool = m.unfold, m.pool
        grid = [window_length(d, k, stride, pad, 1, False) for d in (height, width)]
        pooled = [-(-d // stride) for d in (height, width)]
        if v.in_features != ch or v.out_features != ch or logits.in_features != ch or \
                logits.out_features != heads * k ** 4 or proj.in_features != ch or ch % heads or \
                not isinstance(unfold, nn.Unfold) or pair(unfold.kernel_size) != [k, k] or \
                pair(unfold.padding) != [pad, pad] or pair(unfold.stride) != [stride, stride] or \
                pair(unfold.dilation) != [1, 1] or type(pool) is not nn.AvgPool2d or \
                pair(pool.kernel_size) != [stride, stride] or pair(pool.stride) != [stride, stride] or \
                pair(pool.padding) != [0, 0] or grid != pooled:
            raise UsageError(f"{self.name}: {where}: edgecl converts timm's outlook attention (v, attn of heads·k⁴ "
                             "outputs and proj Linears, its Unfold and average pool of the module's k, padding and "
                             f"stride, windows at the pooled positions); gets {ch} channels, {heads} heads, k {k}, "
                             f"padding {pad}, stride {stride}: windows {grid}, pooled {pooled}")
        values = self._emit(node, "conv", [x], f"{path}.v", **pointwise(v))
        h = x if stride == 1 else self._emit(node, "avgpool", [x], f"{path}.pool", k=[stride, stride],
                                             stride=[stride, stride], pad=[0, 0], ceil_mode=True,
                                             count_include_pad=bool(pool.count_include_pad))
        weights = self._emit(node, "conv", [h], f"{path}.attn", **pointwise(logits))
        out = self._emit(node, "outlook_attention", [values, weights], f"{path}.outlook", heads=heads, k=k, pad=pad,
                         stride=stride, scale=float(m.scale))
        self._emit(node, "conv", [out], f"{path}.proj", **pointwise(proj))
        self.last.add(node)

    def volo_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        if type(m).__name__ == "ClassAttention":
            return self._class_attention(node, m, x, path)
        where = f"VOLO Attention at {path!r} {location(node)}"
        ch = self._volo_map(node, where)[0]
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        qkv, proj, heads = linear(self.name, where, m.qkv), linear(self.name, where, m.proj), int(m.num_heads)
        if qkv.in_features != ch or qkv.out_features != 3 * ch or proj.in_features != ch or ch % heads:
            raise UsageError(f"{self.name}: {where}: qkv of {qkv.in_features}→{qkv.out_features} and proj of "
                             f"{proj.in_features} inputs are not an attention of {heads} heads over {ch} channels")
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv))
        h = self.attend_packed(node, packed, path, ch, heads=heads, scale=applied_scale(m, ch // heads))
        self._emit(node, "conv", [h], f"{path}.proj", **pointwise(proj))
        self.last.add(node)

    def _class_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """VOLO's ClassAttention on tokens (C, T, 1): q of the class token, k and v (one packed Linear) of every
        token; its q is multiplied by ``m.scale`` whatever the fused-attention setting (timm computes it by hand)."""
        where = f"VOLO ClassAttention at {path!r} {location(node)}"
        tokens = shape_of(node.args[0])
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        q, kv, proj = (linear(self.name, where, getattr(m, p)) for p in ("q", "kv", "proj"))
        heads, inner = int(m.num_heads), q.out_features
        if node.args[0] not in self.last or tokens is None or len(tokens) != 2 or q.in_features != tokens[1] or \
                kv.in_features != tokens[1] or kv.out_features != 2 * inner or proj.in_features != inner or \
                inner % heads or int(m.head_dim) * heads != inner:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (batch, tokens, channels) with q "
                             f"of heads·head_dim outputs and kv of twice that; gets {tokens}, q {q.out_features}, kv "
                             f"{kv.out_features}, {heads} heads")
        cls = self._emit(node, "token", [x], f"{path}.cls", index=0, count=1)
        qs = self._emit(node, "conv", [cls], f"{path}.q", **pointwise(q))
        packed = self._emit(node, "conv", [x], f"{path}.kv", **pointwise(kv))
        k, v = (self._emit(node, "slice", [packed], f"{path}.{part}", start=i * inner, stop=(i + 1) * inner)
                for i, part in enumerate("kv"))
        h = self._emit(node, "attention", [qs, k, v], f"{path}.attend", heads=heads, scale=float(m.scale))
        self._emit(node, "conv", [h], f"{path}.proj", **pointwise(proj))
        self.last.add(node)

    def _volo_map(self, node: fx.Node, where: str) -> list[int]:
        """The (C, H, W) of the channels-last map (B, H, W, C) a VOLO layer reads; refused on anything else."""
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports VOLO's layers "
                             "on channels-last (batch, height, width, channels) maps")
        return [shape[2], shape[0], shape[1]]
