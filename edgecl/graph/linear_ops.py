"""ONNX forms of the softmax-free attentions (EfficientViT's (MIT) ReLU linear attention), as `edgecl.train.models`
computes them; beside `token_ops`, one module for the attentions that are linear in the positions. Only ops ONNX
Runtime's CPU and CUDA providers both have: Reshape, Relu, Transpose, MatMul, ReduceSum, Add, Div."""
from __future__ import annotations

import math

import numpy as np

from edgecl.graph.nodes import Builder


def linear_attention(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]], constant) -> str:
    """A ``linear_attention`` node: per head, (v·relu(k)ᵀ)·relu(q) over (relu(k) summed over the positions)ᵀ ·
    relu(q) + eps, by MatMuls on (N, heads, channels, T) views; the output head-major (N, heads·dv, H, W)."""
    (c, *hw), cv, h = shapes[0], shapes[2][0], node["heads"]
    t, d, dv = math.prod(hw), c // h, cv // h

    def shape(*dims: int) -> str:
        return constant(np.array(dims, dtype=np.int64))

    qh, kh = (b.op("Relu", [b.op("Reshape", [x, shape(0, h, d, t)])]) for x in (q, k))  # (N, h, d, T)
    vh = b.op("Reshape", [v, shape(0, h, dv, t)])
    kv = b.op("MatMul", [vh, b.op("Transpose", [kh], perm=[0, 1, 3, 2])])  # (N, h, dv, d)
    keys = b.op("Transpose", [b.op("ReduceSum", [kh, shape(3)], keepdims=1)], perm=[0, 1, 3, 2])  # (N, h, 1, d)
    below = b.op("Add", [b.op("MatMul", [keys, qh]), constant(float(node["eps"]))])  # (N, h, 1, T)
    out = b.op("Div", [b.op("MatMul", [kv, qh]), below])
    return b.op("Reshape", [out, shape(0, h * dv, *hw)])
