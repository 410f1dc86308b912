"""ONNX form of the ``lambda_layer`` op (`edgecl.arch.lambda_ops`), as `edgecl.train.models.lambda_layer` computes
it. Only ops ONNX Runtime's CPU and CUDA providers both have: Reshape, Softmax, Transpose, MatMul, Unsqueeze, Conv,
Mul, ReduceSum, Add (and Gather for the relative embedding)."""
from __future__ import annotations

import math

from edgecl.arch.lambda_ops import lambda_rel_index
from edgecl.graph.nodes import Builder


def lambda_layer(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]]) -> str:
    """A ``lambda_layer`` node: Softmax of k over the positions, the content lambda by MatMul with vᵀ, applied to
    q's (N, heads, dim, T) view; the position lambdas a Conv of v as (N·dv, 1, H, W) images with the node's
    (dim, 1, r, r) filters and bias, multiplied with q and summed over dim; the heads' outputs side by side."""
    (_, *hw), h, d, r, dv = shapes[0], node["heads"], node["dim"], node.get("r"), shapes[2][0]
    t, name = math.prod(hw), node["name"]
    qh = b.op("Reshape", [q, b.ints(0, h, d, t)])
    kk = b.op("Softmax", [b.op("Reshape", [k, b.ints(0, d, t)])], axis=-1)  # (N, d, T)
    vt = b.op("Reshape", [v, b.ints(0, dv, t)])
    content = b.op("MatMul", [kk, b.op("Transpose", [vt], perm=[0, 2, 1])])  # (N, d, dv)
    lam = b.op("Unsqueeze", [b.op("Transpose", [content], perm=[0, 2, 1]), b.ints(1)])  # (N, 1, dv, d)
    out = b.op("MatMul", [lam, qh])  # (N, heads, dv, T)
    if node.get("rel_pos"):  # the relative embedding: E gathered (T, T, d), q's logits against it, times v
        return b.op("Reshape", [b.op("Add", [out, _rel_position(b, qh, vt, node, hw)]), b.ints(0, h * dv, *hw)])
    images = b.op("Reshape", [v, b.ints(-1, 1, *hw)])  # (N·dv, 1, H, W)
    position = b.op("Conv", [images, f"{name}.weight", f"{name}.bias"], kernel_shape=[r, r], pads=[r // 2] * 4)
    position = b.op("Reshape", [position, b.ints(-1, 1, dv, d, t)])  # (N, 1, dv, d, T)
    summed = b.op("ReduceSum", [b.op("Mul", [b.op("Unsqueeze", [qh, b.ints(2)]), position]), b.ints(3)], keepdims=0)
    return b.op("Reshape", [b.op("Add", [out, summed]), b.ints(0, h * dv, *hw)])


def _rel_position(b: Builder, qh: str, vt: str, node: dict, hw: list[int]) -> str:
    """(N, heads, dv, T): Σ_n (q(m)·E(m, n))·v(n), E the node's ``pos_emb`` Gathered at the constant (T, T)
    offsets, the logits by one MatMul batched over the queries; qh is (N, heads, d, T), vt (N, dv, T)."""
    h, d, t = node["heads"], node["dim"], math.prod(hw)
    table = b.op("Reshape", [f"{node['name']}.pos_emb", b.ints(-1, d)])
    gathered = b.op("Gather", [table, b.constant(lambda_rel_index(*hw))], axis=0)  # (T, T, d)
    front = b.op("Reshape", [b.op("Transpose", [qh], perm=[3, 0, 1, 2]), b.ints(t, -1, d)])  # (T, N·h, d)
    logits = b.op("MatMul", [front, b.op("Transpose", [gathered], perm=[0, 2, 1])])  # (T, N·h, T)
    logits = b.op("Transpose", [b.op("Reshape", [logits, b.ints(t, -1, h, t)])], perm=[1, 2, 0, 3])  # (N, h, T, T)
    values = b.op("Unsqueeze", [b.op("Transpose", [vt], perm=[0, 2, 1]), b.ints(1)])  # (N, 1, T, dv)
    return b.op("Transpose", [b.op("MatMul", [logits, values])], perm=[0, 1, 3, 2])
