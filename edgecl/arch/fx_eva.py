"""EVA's attentions (timm's ``timm.models.eva`` ``EvaAttention`` and ``timm.layers.attention`` ``AttentionRope``, the
``Eva`` class's two kinds) in a user's network, for `fx_import._Converter`. The tracer keeps them whole:

    qkv (1×1 conv, BEiT's q/v bias parts: `fx_vit_bias`) → slices q, k, v, or q_proj, k_proj, v_proj (1×1 convs; k
    and v of ``num_kv_heads`` heads: the attention's ``kv_heads``), or under RoPE with q/v biases (EVA-02) q, k, v
    each a 1×1 conv of its rows of the fused qkv weight (`fused_rows`) → ``rotary`` on q and on k (its rotary
    position embedding, RoPE, where it is given one: EVA-02, the RoPE ViTs) → attention {heads, scale} → norm (EVA's
    ``scale_norm`` LayerNorm, where it has one) → proj (1×1 conv)

The rotary table is the model's fixed ``rope`` buffer (timm's ``emb``: sines then cosines per token after the class
token), read once into the node (`edgecl.arch.rotary_ops`). Refused by name with the user's source line: a rotary
embedding that is learned or computed in the forward (RoPE-Mixed's per-block frequencies), a mask or causal
attention, qk-norm, a gate and a sub-LN that is no affine ``nn.LayerNorm``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
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
    traced: fx.GraphModule
    _emit: Callable[..., str]
    packed_slices: Callable[..., tuple[str, str, str]]  # `fx_attention`'s
    swin_norm: Callable[..., str]

    def eva_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"{type(m).__name__} at {path!r} {location(node)}"
        args = dict(zip(_PARAMETERS, node.args[1:]), **node.kwargs)
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
        table = self._rope_table(args["rope"], m, where, shape[0]) if args.get("rope") is not None else None
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(m, int(m.head_dim))}
        if m.qkv is not None and table is not None and getattr(m, "q_bias", None) is not None:
            q, k, v = self.fused_rows(node, m, x, path, where)
        elif m.qkv is not None:
            packed = self._emit(node, "conv", [x], f"{path}.qkv",
                                **{**pointwise(m.qkv), **qkv_bias_fields(self.name, where, m)})
            q, k, v = self.packed_slices(node, packed, path, m.qkv.out_features // 3)
        else:
            q, k, v = (self._emit(node, "conv", [x], f"{path}.{part}", **pointwise(getattr(m, part)))
                       for part in ("q_proj", "k_proj", "v_proj"))
            fields.update({"kv_heads": kv_heads} if kv_heads != heads else {})
        if table is not None:  # RoPE on q and on k, each head alike (k's heads: kv_heads)
            rope = {"prefix": int(m.num_prefix_tokens), "half": bool(getattr(m, "rotate_half", False)),
                    "table": table}
            q = self._emit(node, "rotary", [q], f"{path}.q_rope", heads=heads, **rope)
            k = self._emit(node, "rotary", [k], f"{path}.k_rope", heads=kv_heads, **rope)
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **fields)
        if not isinstance(m.norm, nn.Identity):  # EVA's sub-LN before the projection
            attended = self.swin_norm(node, m.norm, attended, f"{path}.norm", where)
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(m.proj))
        self.last.add(node)

    def fused_rows(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> tuple[str, str, str]:
        """EVA-02's fused qkv with q and v biases under RoPE (Swin V2's under cosine attention, `fx_swin_v2`): q, k
        and v each a conv of its rows of the qkv weight
        (``weight_rows``), q's and v's biases the module's q_bias and v_bias (``bias_parts``), k's none. (One conv's
        bias with k's part a fixed zero, as without RoPE, would not do: rotated, that part no longer cancels in the
        softmax, and training would move it where the module holds none.)"""
        qkv_bias_fields(self.name, where, m)  # checks BEiT's form: q_bias and v_bias on a bias-less qkv, k's zero
        width = m.qkv.out_features // 3
        base = {**pointwise(m.qkv), "out": width, "module_shape": [width, m.qkv.in_features], "module": f"{path}.qkv"}
        return tuple(self._emit(node, "conv", [x], f"{path}.{part}", **{**base, "weight_rows": [i, 3], **(
            {"bias": True, "bias_parts": [f"{part}_bias"]} if part != "k" else {"bias": False})})
                     for i, part in enumerate("qkv"))

    def _rope_table(self, rope: Any, m: nn.Module, where: str, tokens: int) -> list[list[float]]:
        """The rotary table the attention is given: a fixed buffer of the model (get_attr), (tokens − prefix,
        2·head_dim)."""
        value = functools.reduce(getattr, str(rope.target).split("."), self.traced) \
            if isinstance(rope, fx.Node) and rope.op == "get_attr" else None
        if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter) or value.requires_grad:
            raise UsageError(f"{self.name}: {where} is given a rotary position embedding that is learned or computed "
                             "in the forward (RoPE-Mixed's per-block frequencies); edgecl supports a fixed table "
                             "(the model's rope buffer)")
        want = (tokens - int(m.num_prefix_tokens), 2 * int(m.head_dim))
        if tuple(value.shape) != want:
            raise UsageError(f"{self.name}: {where} is given a rotary table of shape {tuple(value.shape)}; its "
                             f"{tokens} tokens need {want} (build the model for the input size it runs on)")
        return value.detach().cpu().to(torch.float32).tolist()
