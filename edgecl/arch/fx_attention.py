"""Self-attention layers in a user's network (Vision Transformers), for `fx_import._Converter`. The tracer keeps
timm's ``Attention`` whole (torch's ``nn.MultiheadAttention`` is a leaf anyway); either becomes what its forward
computes on the tokens (a ``(C, T, 1)`` map, `fx_tokens`):

    qkv (1×1 conv: the fused Linear) → slices q, k, v → attention {heads, scale} → proj (1×1 conv)

The qkv conv keeps the module's stored ``(3·A, C)`` weight as ``module_shape``; for ``nn.MultiheadAttention`` its
tensors are the packed ``in_proj_weight`` / ``in_proj_bias`` (node ``module`` ``PATH.in_proj_*``, `spec.state_key`).
Keeping the module whole, rather than tracing its reshape/permute/unbind and ``scaled_dot_product_attention``, lets
edgecl check the variant: a mask, causal attention, qk-norm, a norm before the projection, a gate, separate
key/value sizes, added bias_k/bias_v or zero attention are refused by name with the user's source line, never run as
plain attention.
"""
from __future__ import annotations

import math
import operator
from types import SimpleNamespace
from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, is_attention_2d, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_vit_bias import qkv_bias_fields, relative_bias_fields
from edgecl.errors import UsageError

TIMM_ATTENTION = ("timm.layers.attention", "Attention")
# BEiT's (q_bias and v_bias beside a bias-less qkv, a relative position bias table) and timm's relative-position ViT's
# (its bias from `rel_pos`): `fx_vit_bias`
BEIT_ATTENTION = ("timm.models.beit", "Attention")
RELPOS_ATTENTION = ("timm.models.vision_transformer_relpos", "RelPosAttention")
# the names of what each one's forward takes beside x, by position or keyword (each refused unless None / False)
_CALL_EXTRAS = {TIMM_ATTENTION: ("attn_mask", "is_causal"), BEIT_ATTENTION: ("shared_rel_pos_bias",),
                RELPOS_ATTENTION: ("shared_rel_pos",)}
# MetaFormer's (CAFormer's) own copy: qkv, SDPA at head_dim ** -0.5, proj; no mask argument, no qk-norm, norm or gate
METAFORMER_ATTENTION = ("timm.models.metaformer", "Attention")
_MHA_PARAMETERS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                   "is_causal")


def is_timm_attention(m: Any) -> bool:
    """timm's ``Attention`` (ViT, DeiT) or an attention over a map's positions (`fx_attention2d`: MobileNetV4's
    MultiQueryAttention2d, Attention2d), judged by its class; timm is not imported for this."""
    return (type(m).__module__, type(m).__name__) in (TIMM_ATTENTION, METAFORMER_ATTENTION, BEIT_ATTENTION,
                                                      RELPOS_ATTENTION) or is_attention_2d(m)


def check_plain_attention(model: str, where: str, m: nn.Module) -> None:
    """timm's Attention computes plain multi-head attention only without qk-norm, a norm before its projection or
    a gate; each of those is refused by name. MetaFormer's has none of them (its forward takes x alone), BEiT's none
    and the relative-position ViT's no norm or gate (a part the class lacks is no computation)."""
    kind = (type(m).__module__, type(m).__name__)
    if kind == METAFORMER_ATTENTION:
        return
    for part, why in (("q_norm", "qk-norm"), ("k_norm", "qk-norm"), ("norm", "a norm before the projection")):
        if not isinstance(getattr(m, part, None if kind == TIMM_ATTENTION else nn.Identity()), nn.Identity):
            raise UsageError(f"{model}: {where} uses {why} ({part}); not supported")
    if getattr(m, "gate", None) is not None:
        raise UsageError(f"{model}: {where} is gated (a sigmoid gate on its output); not supported")


class _AttentionConverter:
    """Mixin of `fx_import._Converter`: timm's Attention and torch's MultiheadAttention."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    modules: dict[str, nn.Module]
    one_call: Callable[[str, fx.Node], None]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]
    attention_2d: Callable[..., None]

    def init_attention(self) -> None:
        self.mha: dict[fx.Node, str] = {}  # a MultiheadAttention call (its value a tuple) → its output's node

    def timm_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        if is_attention_2d(m):
            return self.attention_2d(node, m, x, path)
        kind = (type(m).__module__, type(m).__name__)
        where = f"{kind[1]} at {path!r} {location(node)}"
        extra = dict(zip(_CALL_EXTRAS.get(kind, ()), node.args[1:]), **node.kwargs)
        if extra.get("attn_mask") is not None or extra.get("is_causal", False) is not False:
            raise UsageError(f"{self.name}: {where} is called with an attention mask or causal=True; edgecl "
                             "supports plain self-attention (no mask, not causal)")
        if any(extra.get(k) is not None for k in ("shared_rel_pos_bias", "shared_rel_pos")):
            raise UsageError(f"{self.name}: {where} is called with a relative position bias shared by all blocks "
                             "(BEiT's use_shared_rel_pos_bias, timm's shared_rel_pos); edgecl supports each "
                             "attention's own table (use_rel_pos_bias=True)")
        check_plain_attention(self.name, where, m)
        heads = int(m.num_heads)
        scale = applied_scale(m, m.qkv.out_features // 3 // heads)
        tokens = (shape_of(node.args[0]) or [0])[0]
        self._attention(node, x, path, heads, scale, (m.qkv, f"{path}.qkv", None),
                        (m.proj, f"{path}.proj"), where, qkv_fields=qkv_bias_fields(self.name, where, m),
                        bias_fields=relative_bias_fields(self.name, where, m, path, tokens))

    def attention_step(self, node: fx.Node) -> bool:
        """A MultiheadAttention call and the parts of its (output, weights) tuple; False for any other node."""
        if node.op == "call_module" and isinstance(self.modules.get(str(node.target)), nn.MultiheadAttention):
            self._multihead(node, self.modules[str(node.target)], str(node.target))
            return True
        if node.op != "call_function" or node.target is not operator.getitem or node.args[0] not in self.mha:
            return False
        if node.args[1] == 0:
            self.alias[node] = self.mha[node.args[0]]
            self.last.add(node)
        elif node.users:
            raise UsageError(f"{self.name}: the attention weights of {node.args[0].target!r} are used "
                             f"{location(node)}; edgecl supports the attention output only (need_weights=False)")
        return True

    def _multihead(self, node: fx.Node, m: nn.MultiheadAttention, path: str) -> None:
        where = f"MultiheadAttention at {path!r} {location(node)}"
        self.one_call(path, node)
        args = dict(zip(_MHA_PARAMETERS, node.args), **node.kwargs)
        q = args.get("query")
        if args.get("key") is not q or args.get("value") is not q:
            raise UsageError(f"{self.name}: {where} attends to other keys or values than its queries; edgecl "
                             "supports self-attention (query, key and value one tensor)")
        if any(args.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or args.get("is_causal", False):
            raise UsageError(f"{self.name}: {where} is called with a mask or is_causal=True; edgecl supports plain "
                             "self-attention")
        if not m.batch_first or not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise UsageError(f"{self.name}: {where} needs batch_first=True, one embedding size for query, key and "
                             "value, no bias_k/bias_v and add_zero_attn=False")
        qkv = SimpleNamespace(in_features=m.embed_dim, out_features=3 * m.embed_dim, bias=m.in_proj_bias)  # packed
        heads = int(m.num_heads)
        self._attention(node, self._input(q, node), path, heads, 1.0 / math.sqrt(m.embed_dim // heads),
                        (qkv, f"{path}.in_proj", f"{path}.in_proj_*"), (m.out_proj, f"{path}.out_proj"), where,
                        source=q)
        self.mha[node] = self.alias[node]

    def _attention(self, node: fx.Node, x: str, path: str, heads: int, scale: float, qkv: tuple, proj: tuple,
                   where: str, source: fx.Node | None = None, qkv_fields: dict[str, Any] | None = None,
                   bias_fields: dict[str, Any] | None = None) -> None:
        """qkv conv, the three slices, attention and the output projection, on tokens (a channels-last value);
        `qkv_fields` / `bias_fields` replace or add the qkv conv's and the attention's fields (`fx_vit_bias`,
        CaiT's talking heads); a ``grid`` (H, W) among `bias_fields` has the attention read the tokens as that
        row-major map, whose offsets its MLP bias spans."""
        source = node.args[0] if source is None else source
        shape = shape_of(source)
        if source not in self.last or shape is None or len(shape) != 2:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape} that is no (batch, tokens, "
                             "channels) token sequence edgecl follows (patch embedding flatten(2).transpose(1, 2))")
        (linear, qkv_name, module), (out, proj_name) = qkv, proj
        width = linear.out_features // 3
        fields: dict[str, Any] = {"module": module} if module else {}
        packed = self._emit(node, "conv", [x], qkv_name, **{**pointwise(linear), **fields, **(qkv_fields or {})})
        bias_fields = dict(bias_fields or {})
        grid = bias_fields.pop("grid", None)  # an MLP bias over the token grid's offsets: attend on the grid's map
        if grid is not None:
            packed = self._emit(node, "reshape", [packed], f"{path}.qkv_grid", shape=[3 * width, *grid])
        attended = self.attend_packed(node, packed, path, width, heads=heads, scale=scale, **bias_fields)
        if grid is not None:
            attended = self._emit(node, "reshape", [attended], f"{path}.tokens", shape=[width, shape[0], 1])
        self._emit(node, "conv", [attended], proj_name, **pointwise(out))
        self.last.add(node)

    def attend_packed(self, node: fx.Node, packed: str, path: str, width: int, **fields: Any) -> str:
        """q, k and v as the three `width`-channel slices of one packed projection, and the ``attention`` over them
        (`fields`: heads, scale)."""
        return self._emit(node, "attention", list(self.packed_slices(node, packed, path, width)), f"{path}.attend",
                          **fields)

    def packed_slices(self, node: fx.Node, packed: str, path: str, width: int) -> tuple[str, str, str]:
        """q, k and v: the three `width`-channel slices of one packed projection."""
        q, k, v = (self._emit(node, "slice", [packed], f"{path}.{part}", start=i * width, stop=(i + 1) * width)
                   for i, part in enumerate("qkv"))
        return q, k, v

