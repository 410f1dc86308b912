"""ONNX form of the ``outlook_attention`` op (`edgecl.arch.outlook_ops`), as `edgecl.train.outlook` computes it:
the windows gathered by a grouped Conv with a fixed one-hot weight (torch's ``F.unfold`` order), the per-window
Softmax and MatMul, and the slots added back by a grouped ConvTranspose with the same weight (``F.fold``; its
output_padding restores rows and columns no window reaches, zeros as in torch). Only plain ops: Conv, Reshape,
Transpose, Mul, Softmax, MatMul, ConvTranspose."""
from __future__ import annotations

import numpy as np

from edgecl.arch.outlook_ops import one_hot_windows
from edgecl.graph.nodes import Builder


def outlook_attention(b: Builder, v: str, logits: str, node: dict, shapes: list[list[int]]) -> str:
    """An ``outlook_attention`` node on v (N, C, H, W) and logits (N, heads·k⁴, h, w)."""
    (c, height, width), (_, h, w) = shapes
    heads, k, pad, stride = node["heads"], node["k"], node["pad"], node["stride"]
    one_hot = b.constant(one_hot_windows(c, k))
    windows = b.op("Conv", [v, one_hot], kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4, group=c)
    windows = b.op("Transpose", [b.op("Reshape", [windows, b.ints(0, heads, c // heads, k * k, h * w)])],
                   perm=[0, 1, 4, 3, 2])  # (N, heads, windows, k², d)
    weights = b.op("Transpose", [b.op("Reshape", [logits, b.ints(0, heads, k * k, k * k, h * w)])],
                   perm=[0, 1, 4, 2, 3])  # (N, heads, windows, slot a, slot b)
    scale = b.constant(np.array(node["scale"], dtype=np.float32))
    weights = b.op("Softmax", [b.op("Mul", [weights, scale])], axis=-1)
    out = b.op("Transpose", [b.op("MatMul", [weights, windows])], perm=[0, 1, 4, 3, 2])  # (N, heads, d, k², windows)
    out = b.op("Reshape", [out, b.ints(0, c * k * k, h, w)])
    extra = [size - ((n - 1) * stride - 2 * pad + k) for size, n in ((height, h), (width, w))]
    return b.op("ConvTranspose", [out, one_hot], kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4,
                group=c, output_padding=extra)
