"""Padding in a user's forward, for `fx_import._Converter`: TensorFlow's "same" padding, ``F.pad`` and the
``ZeroPad2d`` / ``ConstantPad2d`` layers, each a ``pad`` node.

TensorFlow pads a window so that the output has ⌈size / stride⌉ positions, and where that takes an odd number of
rows or columns it puts the extra one at the bottom or right. timm ports of TensorFlow models (``tf_efficientnet*``,
``tf_mobilenetv3*``, NASNet) compute this in forward (``Conv2dSame``, ``AvgPool2dSame``, ``MaxPool2dSame``), and
torch's ``padding="same"`` does it for an even kernel extent. A spec has a fixed input size, so the padding is fixed
too: a convolution keeps the symmetric part in its own ``pad`` and gets a ``pad`` node for the extra row and column
only; a same-padded pool reads a ``pad`` node (of zeros, or −∞ for a max, as the layers pad) with no padding of its
own. These layers are known by where they are defined, as the libraries' identities are: their forward is not
traceable (it computes the padding from the input's size in Python). ``F.pad``'s modes 'reflect' and 'replicate'
(and ``ReflectionPad2d`` / ``ReplicationPad2d``) are a ``pad`` node's ``mode``; 'circular' is refused by name.
Negative padding crops (torch's F.pad and ONNX Pad alike; NASNet's ``ZeroPad2d((-1, 1, -1, 1))`` shifts a map by
one): a ``pad`` node with negative sides, in mode 'constant' only; a crop that leaves no row or column is refused.
timm's ``Conv2dSameExport`` computes it at its first call only and keeps it (a ``ZeroPad2d``), then pads every
input alike: once it holds one, that padding is what the layer computes, whatever the size.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch.nn.functional as F
from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape, pair, shape_of
from edgecl.arch.op_shapes import crop_problem
from edgecl.arch.ops import PAD_MODES
from edgecl.errors import UsageError

SAME_LAYERS = {("timm.layers.conv2d_same", "Conv2dSame"): "conv",
               ("timm.layers.std_conv", "ScaledStdConv2dSame"): "conv",  # weight-standardised too (`fx_std_conv`)
               ("timm.layers.std_conv", "StdConv2dSame"): "conv",
               ("timm.layers.conv2d_same", "Conv2dSameExport"): "conv",
               ("timm.layers.pool2d_same", "AvgPool2dSame"): "avg",
               ("timm.layers.pool2d_same", "MaxPool2dSame"): "max"}
PAD_FUNCTIONS = (F.pad,)
# padding (left, right, top, bottom) as F.pad, and the mode each pads in (a constant one has a value)
PAD_MODULES = {nn.ZeroPad2d: "constant", nn.ConstantPad2d: "constant", nn.ReflectionPad2d: "reflect",
               nn.ReplicationPad2d: "replicate"}


def same_kind(m: nn.Module) -> str | None:
    """"conv", "avg" or "max" for a known layer that pads as TensorFlow's "same" in forward, else None (also for a
    ``ScaledStdConv2dSame`` whose "same" padding is static: ``same_pad`` false, its padding its own)."""
    kind = SAME_LAYERS.get((type(m).__module__, type(m).__name__))
    return kind if getattr(m, "same_pad", True) else None


def odd_same(m: nn.Module) -> bool:
    """A conv with torch's ``padding="same"`` whose kernel extent is even on an axis: padded asymmetrically."""
    return isinstance(m, nn.Conv2d) and m.padding == "same" and \
        any(d * (k - 1) % 2 for k, d in zip(pair(m.kernel_size), pair(m.dilation)))


def pad_call(m: nn.Module, node: fx.Node) -> dict[str, Any]:
    """A padding layer's call as ``F.pad``'s arguments, for `_PaddingConverter.explicit_pad`."""
    mode = next(v for k, v in PAD_MODULES.items() if isinstance(m, k))
    return {"input": node.args[0], "pad": list(m.padding), "mode": mode, "value": getattr(m, "value", None)}


def pad_problem(shape: list[int], pads: list[int], mode: str) -> str | None:
    """Why ``pads`` (top, left, bottom, right) in `mode` cannot pad a (C, H, W) map, or None: a reflection must be
    smaller than the side it mirrors (torch and ONNX fail otherwise); modes other than `PAD_MODES` are not ops."""
    if mode not in PAD_MODES:
        return f"mode {mode!r}; only {', '.join(map(repr, PAD_MODES))}"
    top, left, bottom, right = pads
    if mode == "reflect" and (max(top, bottom) >= shape[1] or max(left, right) >= shape[2]):
        return f"reflect padding {pads} (top, left, bottom, right) must be smaller than the map's sides {shape[1:]}"
    return None


def same_padding(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of one axis under TensorFlow's "same" rule; after is before or before + 1."""
    total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _PaddingConverter:
    """Mixin of `fx_import._Converter`: same-padded layers and explicit ``F.pad`` calls."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]
    _input: Callable[..., str]
    _conv_fields: Callable[..., dict[str, Any]]

    def same_padded(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """A same-padded conv or pool (`same_kind`) as its fixed padding and the plain layer."""
        shape = map_shape(node, self.name, f"{type(m).__name__} at {path!r} {location(node)}")
        k, stride, dilation = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(getattr(m, "dilation", 1))
        (top, bottom), (left, right) = (same_padding(shape[1 + a], k[a], stride[a], dilation[a]) for a in range(2))
        if same_kind(m) == "conv":
            if isinstance(getattr(m, "pad", None), nn.ZeroPad2d):  # Conv2dSameExport: the padding of its first call
                left, right, top, bottom = m.pad.padding
            sym = [min(top, bottom), min(left, right)]  # the conv pads symmetrically; a pad node adds the rest
            fields = self._conv_fields(node, m, path, pad=sym)
            rest = [top - sym[0], left - sym[1], bottom - sym[0], right - sym[1]]
            if any(rest):
                x = self._emit(node, "pad", [x], f"{path}.same_pad", pads=rest)
            self._emit(node, "conv", [x], path, **fields)
            return
        value = "-inf" if same_kind(m) == "max" else 0.0
        if any((top, left, bottom, right)):
            x = self._emit(node, "pad", [x], f"{path}.same_pad", pads=[top, left, bottom, right], value=value)
        common = {"k": k, "stride": stride, "pad": [0, 0], "ceil_mode": bool(m.ceil_mode)}
        if value == "-inf":
            self._emit(node, "maxpool", [x], path, dilation=dilation, **common)
        else:
            self._emit(node, "avgpool", [x], path, count_include_pad=bool(m.count_include_pad), **common)

    def asymmetric_same(self, node: fx.Node, m: nn.Conv2d, x: str, path: str) -> None:
        """torch's ``padding="same"`` whose total padding is odd on an axis: torch puts the extra at the end."""
        k, dilation = pair(m.kernel_size), pair(m.dilation)
        (top, bottom), (left, right) = ((d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2)
                                        for kk, d in zip(k, dilation))
        fields = self._conv_fields(node, m, path, pad=[top, left])
        x = self._emit(node, "pad", [x], f"{path}.same_pad", pads=[0, 0, bottom - top, right - left])
        self._emit(node, "conv", [x], path, **fields)

    def explicit_pad(self, node: fx.Node, args: dict[str, Any]) -> None:
        """``F.pad(x, (left, right[, top, bottom]), mode=…, value=v)`` on a map: a ``pad`` node; one of zeros only (of
        any length) is no node: its input."""
        shape = shape_of(args["input"])
        pads, value, mode = args["pad"], args["value"], args["mode"] or "constant"
        if isinstance(pads, (list, tuple)) and len(pads) % 2 == 0 and \
                all(type(p) is int and p == 0 for p in pads):  # pads nothing (a pad to a multiple it already is,
            # Swin V2-CR's windows): the input itself, whatever its layout or length of pads
            self.alias[node] = self._input(args["input"], node)
            if args["input"] in self.last:
                self.last.add(node)
            return
        if shape is None or len(shape) != 3:
            raise self.refuse(node, f"padding is supported on a (channels, height, width) map, gets {shape}")
        if not isinstance(pads, (list, tuple)) or len(pads) not in (2, 4) or \
                not all(isinstance(p, int) and not isinstance(p, bool) for p in pads):
            raise self.refuse(node, f"pad {str(pads)[:60]}: two or four ints (left, right, top, bottom; a negative "
                                    "one crops), given in the code or computed from the input's shape (not from the "
                                    "batch size or tensor values)")
        left, right, top, bottom = (*pads, 0, 0)[:4]
        if value is None:
            value = 0.0
        if (problem := pad_problem(shape, [top, left, bottom, right], mode) or
                crop_problem(shape, [top, left, bottom, right], mode, value)) is not None:
            raise self.refuse(node, problem)
        if mode != "constant" and value != 0:
            raise self.refuse(node, f"value {str(value)[:40]} with mode {mode!r}: only mode 'constant' has a value")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                not (math.isfinite(value) or value == -math.inf):
            raise self.refuse(node, f"value {str(value)[:40]}: a finite number or -inf")
        fields = {"mode": mode} if mode != "constant" else {}
        self._emit(node, "pad", [self._input(args["input"], node)], pads=[top, left, bottom, right],
                   value="-inf" if value == -math.inf else float(value), **fields)
