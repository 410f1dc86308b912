"""CoaT's attention (timm's ``timm.models.coat.FactorAttnConvRelPosEnc``) in a user's network, for
`fx_import._Converter`. The tracer keeps it whole (it reshapes and permutes the heads, and splits v's map by head
groups for its convolutional position encoding); it becomes, on the tokens (class token first, then the H × W grid)
as their (C, 1 + H·W, 1) map:

    qkv (1×1 conv) → slices q, k, v
    → linear_attention {heads, kernel "softmax"}: per head (v·softmax(k)ᵀ)·q, k's softmax over the tokens
    → scale {factor m.scale}
    + the convolutional relative position encoding (``crpe``, timm's ConvRelPosEnc): q's and v's grid tokens
      (``token`` 1 of H·W) → v as its (C, H, W) map → its head groups' channel ``slice``s → each group's depthwise
      conv → ``cat`` → tokens → ``mul`` by q's → ``pad`` of one zero token before them (the class token's)
    → ``add`` → proj (1×1 conv)

timm shares one ConvPosEnc and one ConvRelPosEnc among every block of a stage (``shared_cpe``, ``shared_crpe``): a
layer called twice, shared weights, which the spec has no form for; such a CoaT is refused naming both places
(`fx_whole.check_unshared`; one serial block per stage goes in). ConvPosEnc and the stages' class tokens are traced.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.arch.fx_xcit import traced_int
from edgecl.errors import UsageError

_MODULE = "timm.models.coat"


def is_factor_attn(m: Any) -> bool:
    """timm's CoaT ``FactorAttnConvRelPosEnc``, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_MODULE, "FactorAttnConvRelPosEnc")


class _CoatConverter:
    """Mixin of `fx_import._Converter`: CoaT's factorised attention with its convolutional position encoding."""

    name: str
    module: nn.Module
    last: set[fx.Node]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    claim: Callable[[str, fx.Node], None]

    def factor_attn(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"CoaT FactorAttnConvRelPosEnc at {path!r} {location(node)}"
        check_drops(self.name, where, m, "proj_drop")
        qkv, proj = linear(self.name, where, m.qkv), linear(self.name, where, m.proj)
        tokens = shape_of(node.args[0])
        size = node.kwargs.get("size", node.args[1] if len(node.args) > 1 else None)
        h, w = (traced_int(s) for s in size) if isinstance(size, (tuple, list)) and len(size) == 2 else (None, None)
        if node.args[0] not in self.last or tokens is None or len(tokens) != 2 or h is None or w is None or \
                tokens[0] != 1 + h * w:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (B, 1 + H·W, C), the class token "
                             f"first, with the grid's size (H, W); gets tokens {tokens} and size {size}")
        ch, heads = tokens[1], int(m.num_heads)
        if ch % heads or qkv.out_features != 3 * ch or (proj.in_features, proj.out_features) != (ch, ch):
            raise UsageError(f"{self.name}: {where}: qkv must map {ch} channels to 3·{ch} and proj {ch} to {ch}, of "
                             f"{heads} heads")
        crpe_path, convs = self._crpe(node, m, ch, heads, where)
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv))
        q, k, v = (self._emit(node, "slice", [packed], f"{path}.{part}", start=i * ch, stop=(i + 1) * ch)
                   for i, part in enumerate("qkv"))
        factor = self._emit(node, "linear_attention", [q, k, v], f"{path}.factor", heads=heads, kernel="softmax")
        factor = self._emit(node, "scale", [factor], f"{path}.scale", factor=float(m.scale))
        grid_q, grid_v = (self._emit(node, "token", [t], f"{path}.grid_{p}", index=1, count=h * w)
                          for p, t in (("q", q), ("v", v)))
        v_map = self._emit(node, "reshape", [grid_v], f"{path}.v_map", shape=[ch, h, w])
        parts, start = [], 0
        for i, conv in enumerate(convs):
            part = v_map if len(convs) == 1 else self._emit(node, "slice", [v_map], f"{path}.split{i}", start=start,
                                                            stop=start + conv.in_channels)
            parts.append(self._conv(node, conv, part, f"{crpe_path}.conv_list.{i}", where))
            start += conv.in_channels
        conv_map = parts[0] if len(parts) == 1 else self._emit(node, "cat", parts, f"{path}.crpe_cat")
        conv_tokens = self._emit(node, "reshape", [conv_map], f"{path}.crpe_tokens", shape=[ch, h * w, 1])
        crpe = self._emit(node, "mul", [grid_q, conv_tokens], f"{path}.crpe")
        crpe = self._emit(node, "pad", [crpe], f"{path}.crpe_pad", pads=[1, 0, 0, 0])
        self._emit(node, "conv", [self._emit(node, "add", [factor, crpe], f"{path}.add")], f"{path}.proj",
                   **pointwise(proj))
        self.last.add(node)

    def _crpe(self, node: fx.Node, m: nn.Module, ch: int, heads: int, where: str) -> tuple[str, list[nn.Conv2d]]:
        """The ConvRelPosEnc's path (its first name in the module) and its depthwise convs, one per head group, in
        channel order; refused where not timm's (one shared with another attention, timm's ``shared_crpe``, is refused
        before: `fx_whole.check_unshared`)."""
        crpe = m.crpe
        if (type(crpe).__module__, type(crpe).__name__) != (_MODULE, "ConvRelPosEnc"):
            raise UsageError(f"{self.name}: {where}: its crpe is a {type(crpe).__name__}; edgecl converts timm's "
                             "ConvRelPosEnc")
        path = next(p for p, mod in self.module.named_modules() if mod is crpe)
        convs, width = list(crpe.conv_list), ch // heads
        for conv in convs:
            k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else 0
            if not isinstance(conv, nn.Conv2d) or conv.groups != conv.in_channels or \
                    conv.out_channels != conv.in_channels or conv.in_channels % width or conv.stride != (1, 1) or \
                    conv.dilation != (1, 1) or conv.kernel_size != (k, k) or k % 2 == 0 or \
                    conv.padding != (k // 2, k // 2):
                raise UsageError(f"{self.name}: {where}: its crpe conv {conv!r} is not a depthwise stride-1 'same' "
                                 f"nn.Conv2d of whole heads ({width} channels each)")
        if sum(c.in_channels for c in convs) != ch:
            raise UsageError(f"{self.name}: {where}: its crpe convs cover {sum(c.in_channels for c in convs)} of v's "
                             f"{ch} channels")
        return path, convs
