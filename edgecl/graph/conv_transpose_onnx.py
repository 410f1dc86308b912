"""ONNX form of the ``conv_transpose`` op (`edgecl.arch.conv_transpose`): one ConvTranspose, whose weight layout
(in, out/groups, kh, kw), padding and output padding are torch's ``F.conv_transpose2d``'s, as `edgecl.train.models`
runs it."""
from __future__ import annotations

from edgecl.graph.nodes import Builder


def conv_transpose(b: Builder, h: str, node: dict) -> str:
    """The node's ConvTranspose on h, (N, in, H, W) → (N, out, H', W'); its output_padding added at the bottom and
    right, as torch adds it."""
    name = node["name"]
    inputs = [h, f"{name}.weight", *([f"{name}.bias"] if node["bias"] else [])]
    return b.op("ConvTranspose", inputs, kernel_shape=list(node["k"]), strides=list(node["stride"]),
                pads=[*node["pad"], *node["pad"]], output_padding=list(node["output_padding"]),
                dilations=list(node["dilation"]), group=node["groups"])
