"""Weight-standardised convolutions (timm's ``ScaledStdConv2d``, NF-ResNet and NFNet, and ``StdConv2d``, BiT's
ResNetV2) for `fx_import`: a conv whose forward standardises each filter before convolving,
gain·scale·(w − mean) / √(var + eps) (timm computes it with ``F.batch_norm`` of the weight, biased variance),
becomes a ``conv`` node with ``standardize`` (its eps) and ``gain_scale`` (timm's constant ``scale`` = γ/√fan_in);
its learned ``gain`` is the node's tensor. ``StdConv2d`` has neither (w − mean) / √(var + eps): ``std_gain`` false,
no gain tensor (a stored one of ones would be learned and change the network). Known by where the class is defined,
as the same-padded layers are: a subclass of Conv2d with its own forward is otherwise refused. The ``…Same``
variants (DeepMind's NFNets, ViT hybrids) pad as TensorFlow's "same" first when their padding is dynamic
(`fx_padding`: a ``pad`` node for the odd row and column)."""
from __future__ import annotations

from typing import Any

from torch import nn

SCALED = {("timm.layers.std_conv", "ScaledStdConv2d"), ("timm.layers.std_conv", "ScaledStdConv2dSame")}
PLAIN = {("timm.layers.std_conv", "StdConv2d"), ("timm.layers.std_conv", "StdConv2dSame")}  # no gain, no scale


def is_std_conv(m: nn.Module) -> bool:
    return (type(m).__module__, type(m).__name__) in SCALED | PLAIN


def std_conv_fields(m: nn.Module) -> dict[str, Any]:
    """The ``standardize`` and ``gain_scale`` (or ``std_gain`` false) fields of a known standardised conv `m` (empty
    for any other)."""
    kind = (type(m).__module__, type(m).__name__)
    if kind in PLAIN:
        return {"standardize": float(m.eps), "std_gain": False}
    return {"standardize": float(m.eps), "gain_scale": float(m.scale)} if kind in SCALED else {}
