"""CaiT's self-attention (timm's ``timm.models.cait.TalkingHeadAttn``) in a user's network, for
`fx_import._Converter`. The tracer keeps it whole (its forward reshapes and permutes the heads to mix them with two
``nn.Linear``s over the heads axis); it becomes, on the tokens as their (C, T, 1) map, timm's ``Attention`` chain with
the attention's talking heads:

    qkv (1×1 conv) → slices q, k, v → attention {heads, m.scale, talking_heads, talking_linear} → proj (1×1 conv)

``proj_l`` mixes the heads' scaled scores before the softmax and ``proj_w`` the weights after it, which is the
attention's ``talking_heads`` (EfficientFormerV2's); ``talking_linear`` says the module stores them as these
Linears, (heads, heads), under their own names (`op_rules.TALKING_LINEAR`). The class-attention stage after the
blocks (``ClassAttn``, `fx_xcit.class_attn`, with its layer scales and the class token's joins) is traced.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.errors import UsageError


def is_talking_head_attn(m: Any) -> bool:
    """timm's CaiT ``TalkingHeadAttn``, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == ("timm.models.cait", "TalkingHeadAttn")


class _CaitConverter:
    """Mixin of `fx_import._Converter`: CaiT's talking-heads attention, kept whole."""

    name: str
    _attention: Callable[..., None]

    def talking_head_attn(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """TalkingHeadAttn on tokens: timm's Attention chain, the attention mixing its heads by proj_l and proj_w.
        timm's forward always multiplies q by ``m.scale`` (it has no fused path)."""
        where = f"CaiT TalkingHeadAttn at {path!r} {location(node)}"
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        qkv, proj = linear(self.name, where, m.qkv), linear(self.name, where, m.proj)
        heads = int(m.num_heads)
        ch = qkv.in_features
        if qkv.out_features != 3 * ch or (proj.in_features, proj.out_features) != (ch, ch) or ch % heads:
            raise UsageError(f"{self.name}: {where}: qkv must map {ch} channels to 3·{ch} and proj {ch} to {ch}, of "
                             f"{heads} heads")
        for part in ("proj_l", "proj_w"):
            mix = getattr(m, part)
            if type(mix) is not nn.Linear or (mix.in_features, mix.out_features) != (heads, heads) or mix.bias is None:
                raise UsageError(f"{self.name}: {where}: {part} is {mix!r}; edgecl converts an nn.Linear over the "
                                 f"{heads} heads with a bias there (timm's talking heads)")
        fields: dict[str, Any] = {"module": path, "talking_heads": True, "talking_linear": True}
        self._attention(node, x, path, heads, float(m.scale), (qkv, f"{path}.qkv", None), (proj, f"{path}.proj"),
                        where, bias_fields=fields)
