"""ECA channel attention (timm's ``EcaModule`` and ``CecaModule``, `ecaresnet*`) in a user's network, for
`fx_import._Converter`. The tracer keeps either module whole; it becomes what its forward computes:

    gap → channel_conv (the Conv1d's k weights along the channels; circular for CecaModule) → gate → mul

The ``channel_conv`` node is named by the Conv1d's path and keeps its ``(1, 1, k)`` storage as ``module_shape``, so
the module's weight reads as it is. Variants the op does not compute (timm's ``use_mlp`` experiment, a Conv1d with a
bias, stride, dilation or padding other than (k−1)/2, a gate that is no activation edgecl knows) are refused by name
with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError

ECA = {("timm.layers.eca", "EcaModule"): False, ("timm.layers.eca", "CecaModule"): True}  # class → circular


def is_eca(m: Any) -> bool:
    """timm's EcaModule or CecaModule (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) in ECA


class _EcaConverter:
    """Mixin of `fx_import._Converter`: ECA modules kept whole by the tracer."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _act: Callable[..., str]  # `fx_split_attn`'s: torch's or timm's activation (gate) modules

    def eca(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        kind = type(m).__name__
        circular = ECA[(type(m).__module__, kind)]
        where = f"{kind} at {path!r} {location(node)}"
        conv, k = m.conv, int(m.conv.kernel_size[0])
        # torch keeps padding="same" / "valid" as the string; "same" pads an odd kernel by (k−1)/2 on each side
        conv_pad = {"same": (k - 1) // 2, "valid": 0}[conv.padding] if isinstance(conv.padding, str) else \
            int(conv.padding[0])
        pad = int(getattr(m, "padding", 0)) if circular else conv_pad
        if getattr(m, "conv2", None) is not None:
            raise UsageError(f"{self.name}: {where} uses use_mlp (timm's experiment, two Conv1d layers); edgecl "
                             "supports ECA's single Conv1d")
        if (conv.in_channels, conv.out_channels, conv.groups) != (1, 1, 1) or conv.bias is not None or \
                conv.stride != (1,) or conv.dilation != (1,) or k % 2 == 0 or pad != (k - 1) // 2 or \
                (circular and conv_pad != 0) or conv.padding_mode != "zeros":
            raise UsageError(f"{self.name}: {where}: its Conv1d must be 1 → 1 channel, odd kernel, no bias, stride "
                             f"and dilation 1 and padding (k−1)/2 (has kernel {k}, padding {pad}, bias "
                             f"{conv.bias is not None})")
        shape = map_shape(node, self.name, where)
        if circular and pad > shape[0]:
            raise UsageError(f"{self.name}: {where}: circular padding {pad} is wider than its {shape[0]} channels")
        pooled = self._emit(node, "gap", [x], f"{path}.pool")
        mixed = self._emit(node, "channel_conv", [pooled], f"{path}.conv", ch=shape[0], k=k, circular=circular,
                           module_shape=[1, 1, k])
        self._emit(node, "mul", [x, self._act(node, m.gate, mixed, f"{path}.gate", where)], path)
