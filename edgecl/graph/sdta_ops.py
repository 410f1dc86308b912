"""ONNX forms of EdgeNeXt's SDTA ops (`edgecl.arch.sdta_ops`) and of the L2 ``normalize`` they share with SwiftFormer,
as `edgecl.train.models` computes them. Only ops ONNX Runtime's CPU and CUDA providers both have: Reshape,
Transpose, Mul, ReduceSum, Sqrt, Max, Div, MatMul, Softmax, Shape, Concat, Expand, Flatten."""
from __future__ import annotations

import math

import numpy as np

from edgecl.arch.sdta_ops import fourier_grid
from edgecl.graph.nodes import Builder


def channel_attention(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]]) -> str:
    """A ``channel_attention`` node: on (N, heads, d, T) views, q and k divided by max(their L2 norm over T, eps)
    (``F.normalize``; not where ``normalize`` is false), Softmax over k's channels of q̂·k̂ᵀ times the head's
    temperature (or the fixed ``scale``), MatMul with v; back to the map's (N, C, H, W)."""
    (c, *hw), h = shapes[0], node["heads"]
    heads = b.ints(0, h, c // h, math.prod(hw))
    eps = b.constant(float(node["eps"])) if node.get("normalize", True) else None

    def normalised(x: str) -> str:
        xh = b.op("Reshape", [x, heads])
        return xh if eps is None else l2_normalised(b, xh, 3, eps)  # DaViT's: the scores of q and k as they are

    scores = b.op("MatMul", [normalised(q), b.op("Transpose", [normalised(k)], perm=[0, 1, 3, 2])])  # (N, h, d, d)
    scale = node.get("scale")
    factor = b.op("Reshape", [f"{node['name']}.temperature", b.ints(1, h, 1, 1)]) if scale is None else \
        b.constant(float(scale))
    weights = b.op("Softmax", [b.op("Mul", [scores, factor])], axis=-1)
    out = b.op("MatMul", [weights, b.op("Reshape", [v, heads])])
    return b.op("Reshape", [out, b.ints(0, c, *hw)])


def l2_normalised(b: Builder, x: str, axis: int, eps: str) -> str:
    """``F.normalize(x, dim=axis)``: x divided by max(its L2 norm along `axis`, the constant `eps`)."""
    norm = b.op("Sqrt", [b.op("ReduceSum", [b.op("Mul", [x, x]), b.ints(axis)], keepdims=1)])
    return b.op("Div", [x, b.op("Max", [norm, eps])])


def normalize(b: Builder, h: str, node: dict, shape: list[int]) -> str:
    """A ``normalize`` node: `l2_normalised` over the channels (axis 1), or over the whole map of each sample, as
    (N, C·H·W) and back."""
    eps = b.constant(float(node["eps"]))
    if node["over"] != "map":
        return l2_normalised(b, h, 1, eps)
    return b.op("Reshape", [l2_normalised(b, b.op("Flatten", [h], axis=1), 1, eps), b.ints(0, *shape)])


def fourier_pos(b: Builder, h: str, node: dict, shape: list[int]) -> str:
    """A ``fourier_pos`` node: its grid for the map's fixed height and width as a Constant (1, 2·hidden, H, W),
    expanded over the batch (the input's first axis)."""
    grid = fourier_grid(node["hidden"], node["temperature"], *shape[1:])[None]
    size = b.op("Concat", [b.op("Shape", [h], start=0, end=1), b.ints(*grid.shape[1:])], axis=0)
    return b.op("Expand", [b.constant(np.ascontiguousarray(grid)), size])
