"""ONNX form of the ``lambda_layer`` op (`edgecl.arch.lambda_ops`), as `edgecl.train.models.lambda_layer` computes
it. Only ops ONNX Runtime's CPU and CUDA providers both have: Reshape, Softmax, Transpose, MatMul, Unsqueeze, Conv,
Mul, ReduceSum, Add."""
from __future__ import annotations

import math

from edgecl.graph.nodes import Builder


def lambda_layer(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]]) -> str:
    """A ``lambda_layer`` node: Softmax of k over the positions, the content lambda by MatMul with vᵀ, applied to
    q's (N, heads, dim, T) view; the position lambdas a Conv of v as (N·dv, 1, H, W) images with the node's
    (dim, 1, r, r) filters and bias, multiplied with q and summed over dim; the heads' outputs side by side."""
    (_, *hw), h, d, r, dv = shapes[0], node["heads"], node["dim"], node["r"], shapes[2][0]
    t, name = math.prod(hw), node["name"]
    qh = b.op("Reshape", [q, b.ints(0, h, d, t)])
    kk = b.op("Softmax", [b.op("Reshape", [k, b.ints(0, d, t)])], axis=-1)  # (N, d, T)
    vt = b.op("Reshape", [v, b.ints(0, dv, t)])
    content = b.op("MatMul", [kk, b.op("Transpose", [vt], perm=[0, 2, 1])])  # (N, d, dv)
    lam = b.op("Unsqueeze", [b.op("Transpose", [content], perm=[0, 2, 1]), b.ints(1)])  # (N, 1, dv, d)
    out = b.op("MatMul", [lam, qh])  # (N, heads, dv, T)
    images = b.op("Reshape", [v, b.ints(-1, 1, *hw)])  # (N·dv, 1, H, W)
    position = b.op("Conv", [images, f"{name}.weight", f"{name}.bias"], kernel_shape=[r, r], pads=[r // 2] * 4)
    position = b.op("Reshape", [position, b.ints(-1, 1, dv, d, t)])  # (N, 1, dv, d, T)
    summed = b.op("ReduceSum", [b.op("Mul", [b.op("Unsqueeze", [qh, b.ints(2)]), position]), b.ints(3)], keepdims=0)
    return b.op("Reshape", [b.op("Add", [out, summed]), b.ints(0, h * dv, *hw)])
