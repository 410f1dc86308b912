"""Weight-standardised convolutions (timm's ``ScaledStdConv2d``, NF-ResNet and NFNet) for `fx_import`: a conv whose
forward standardises each filter before convolving, gain·scale·(w − mean) / √(var + eps) (timm computes it with
``F.batch_norm`` of the weight, biased variance), becomes a ``conv`` node with ``standardize`` (its eps) and
``gain_scale`` (timm's constant ``scale`` = γ/√fan_in); its learned ``gain`` is the node's tensor. Known by where the
class is defined, as the same-padded layers are: a subclass of Conv2d with its own forward is otherwise refused.
``ScaledStdConv2dSame`` (DeepMind's NFNets) pads as TensorFlow's "same" first when its padding is dynamic
(`fx_padding`: a ``pad`` node for the odd row and column). ``StdConv2d`` / ``StdConv2dSame`` (no gain) are still
refused by that rule."""
from __future__ import annotations

from typing import Any

from torch import nn

STD_CONVS = {("timm.layers.std_conv", "ScaledStdConv2d"), ("timm.layers.std_conv", "ScaledStdConv2dSame")}


def is_std_conv(m: nn.Module) -> bool:
    return (type(m).__module__, type(m).__name__) in STD_CONVS


def std_conv_fields(m: nn.Module) -> dict[str, Any]:
    """The ``standardize`` and ``gain_scale`` fields of a known standardised conv `m` (empty for any other)."""
    if not is_std_conv(m):
        return {}
    return {"standardize": float(m.eps), "gain_scale": float(m.scale)}
