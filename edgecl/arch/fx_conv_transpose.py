"""`from_torch` of ``nn.ConvTranspose2d``: the ``conv_transpose`` node's fields (`edgecl.arch.conv_transpose`) of a
module called on one map. An ``output_size`` argument (torch then picks the output padding per call) and a padding
mode other than zeros are refused by name: the spec's node has one fixed output padding; so is an output padding of at
least the stride (torch allows it below a larger dilation; ONNX Runtime does not)."""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from edgecl.arch.fx_calls import location, pair
from edgecl.errors import UsageError


def conv_transpose_fields(name: str, node: fx.Node, m: nn.ConvTranspose2d, path: str) -> dict[str, Any]:
    """The spec fields of `m`; UsageError naming the layer and its source line where it has no spec form."""
    where = f"{name}: {path!r} (nn.ConvTranspose2d) {location(node)}"
    if len(node.args) > 1 or node.kwargs:
        raise UsageError(f"{where}: called with an output_size; edgecl converts a ConvTranspose2d called on its "
                         "input alone (its output padding fixed by the layer)")
    if m.padding_mode != "zeros":
        raise UsageError(f"{where}: padding_mode={m.padding_mode!r} is not supported (zeros only)")
    if any(p >= s for p, s in zip(pair(m.output_padding), pair(m.stride))):
        raise UsageError(f"{where}: output_padding {m.output_padding} is not below the stride {m.stride}; ONNX "
                         "Runtime's ConvTranspose refuses it (torch allows it below the dilation)")
    return {"in": m.in_channels, "out": m.out_channels, "k": pair(m.kernel_size), "stride": pair(m.stride),
            "pad": pair(m.padding), "output_padding": pair(m.output_padding), "dilation": pair(m.dilation),
            "groups": m.groups, "bias": m.bias is not None}
