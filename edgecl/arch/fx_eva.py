"""EVA's attentions (timm's ``timm.models.eva`` ``EvaAttention`` and ``timm.layers.attention`` ``AttentionRope``, the
``Eva`` class's two kinds) in a user's network, for `fx_import._Converter`. The tracer keeps them whole; without a
rotary embedding each is plain multi-head attention on the tokens:

    qkv (1×1 conv, BEiT's q/v bias parts: `fx_vit_bias`) → slices q, k, v, or q_proj, k_proj, v_proj (1×1 convs; k
    and v of ``num_kv_heads`` heads: the attention's ``kv_heads``) → attention {heads, scale} → norm (EVA's
    ``scale_norm`` LayerNorm, where it has one) → proj (1×1 conv)

Refused by name with the user's source line: a rotary position embedding (RoPE: q and k rotated by fixed sin/cos
tables per token, which the spec has no op for — EVA-02 and the RoPE ViTs), a mask or causal attention, qk-norm and a
gate.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_vit_bias import qkv_bias_fields
from edgecl.errors import UsageError

_KINDS = (("timm.models.eva", "EvaAttention"), ("timm.layers.attention", "AttentionRope"))
_PARAMETERS = ("rope", "attn_mask", "is_causal")  # what their forward takes after x


def is_eva_attention(m: Any) -> bool:
    """EVA's attention or timm's AttentionRope, judged by its class; timm is not imported for this."""
    return (type(m).__module__, type(m).__name__) in _KINDS


class _EvaConverter:
    """Mixin of `fx_import._Converter`: EVA's attentions, kept whole."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    attend_packed: Callable[..., str]
    swin_norm: Callable[..., str]

    def eva_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"{type(m).__name__} at {path!r} {location(node)}"
        args = dict(zip(_PARAMETERS, node.args[1:]), **node.kwargs)
        if args.get("rope") is not None:
            raise UsageError(f"{self.name}: {where} is given a rotary position embedding (RoPE: q and k rotated by "
                             "fixed sin/cos tables of each token's position); edgecl has no op for it yet — EVA-02 "
                             "and the RoPE ViTs are refused (an Eva built with use_rot_pos_emb=False goes in)")
        if args.get("attn_mask") is not None or args.get("is_causal", False) is not False:
            raise UsageError(f"{self.name}: {where} is called with an attention mask or causal=True; edgecl "
                             "supports plain self-attention (no mask, not causal)")
        for part in ("q_norm", "k_norm"):
            if not isinstance(getattr(m, part), nn.Identity):
                raise UsageError(f"{self.name}: {where} uses qk-norm ({part}); not supported")
        if m.gate is not None:
            raise UsageError(f"{self.name}: {where} is gated (a sigmoid gate on its output); not supported")
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 2:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape} that is no (batch, tokens, "
                             "channels) token sequence edgecl follows")
        heads, kv_heads = int(m.num_heads), int(getattr(m, "num_kv_heads", m.num_heads))
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(m, int(m.head_dim))}
        if m.qkv is not None:
            packed = self._emit(node, "conv", [x], f"{path}.qkv",
                                **{**pointwise(m.qkv), **qkv_bias_fields(self.name, where, m)})
            attended = self.attend_packed(node, packed, path, m.qkv.out_features // 3, **fields)
        else:
            q, k, v = (self._emit(node, "conv", [x], f"{path}.{part}", **pointwise(getattr(m, part)))
                       for part in ("q_proj", "k_proj", "v_proj"))
            fields.update({"kv_heads": kv_heads} if kv_heads != heads else {})
            attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **fields)
        if not isinstance(m.norm, nn.Identity):  # EVA's sub-LN before the projection
            attended = self.swin_norm(node, m.norm, attended, f"{path}.norm", where)
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(m.proj))
        self.last.add(node)
