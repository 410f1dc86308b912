"""ONNX forms of EfficientViM's hidden-state ops (`edgecl.arch.state_ops`), as `edgecl.train.models` computes them.
Only ops ONNX Runtime's CPU and CUDA providers both have: Reshape, Softmax, Mul, Transpose, MatMul, Unsqueeze,
Squeeze."""
from __future__ import annotations

import math

from edgecl.arch.state_ops import STATE_OPS
from edgecl.graph.nodes import Builder

__all__ = ["STATE_OPS", "state_op"]


def state_op(b: Builder, ins: list[str], node: dict, shapes: list[list[int]]) -> str:
    """A ``state_pool`` node: x as (N, C, H·W) MatMul (Softmax of the logits over H·W · b)ᵀ (N, H·W, S), then
    (N, C, S, 1); a ``state_read`` node: h as (N, C, S) MatMul c as (N, S, H·W), then (N, C, H, W)."""
    if node["op"] == "state_pool":
        (c, *hw), s = shapes[0], shapes[1][0]
        flat = [b.op("Reshape", [x, b.ints(0, n, math.prod(hw))]) for x, n in zip(ins, (c, s, s))]
        weights = b.op("Mul", [b.op("Softmax", [flat[1]], axis=-1), flat[2]])
        pooled = b.op("MatMul", [flat[0], b.op("Transpose", [weights], perm=[0, 2, 1])])
        return b.op("Unsqueeze", [pooled, b.ints(3)])
    (c, s, _), (_, *hw) = shapes
    states = b.op("Reshape", [ins[0], b.ints(0, c, s)])
    read = b.op("MatMul", [states, b.op("Reshape", [ins[1], b.ints(0, s, math.prod(hw))])])
    return b.op("Reshape", [read, b.ints(0, c, *hw)])
