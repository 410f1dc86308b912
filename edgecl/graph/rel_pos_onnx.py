"""ONNX form of an attention's relative position logits (BotNet, HaloNet: `edgecl.arch.rel_pos`), as
`edgecl.train.rel_logits` computes them. Only ops ONNX Runtime's CPU and CUDA providers both have: Reshape,
Transpose, Gather, MatMul, Mul, Unsqueeze, Add; and RelPosMlp's bias table (Gemm, Relu)."""
from __future__ import annotations

import numpy as np

from edgecl.arch.mlp_bias import mlp_coords, mlp_extent, mlp_names, mlp_squashed
from edgecl.arch.rel_pos import rel_index, rel_scale
from edgecl.graph.nodes import Builder


def rel_logits(b: Builder, q: str, node: dict, shape: list[int], keys: list[int] | None = None) -> str:
    """(N, heads, A·B, kh·kw) logits to add to the scores: q as (N, heads, A, B, d); per axis the table gathered by
    its constant (A, kh) offsets and one MatMul batched over the query's row (column) with it, the two broadcast
    over the other axis and summed. `shape` is q's (C, A, B): its map, or one block of it; `keys` k's map where it
    is not ``rel_pos`` (MViTv2's pooled keys, ``rel_mvit`` only)."""
    (c, rows_q, cols_q), h, name = shape, node["heads"], node["name"]
    kh, kw = keys if keys is not None else node["rel_pos"]
    qh = b.op("Transpose", [b.op("Reshape", [q, b.ints(0, h, c // h, rows_q, cols_q)])], perm=[0, 1, 3, 4, 2])
    if node.get("rel_scaled"):
        qh = b.op("Mul", [qh, b.constant(rel_scale(node))])

    def per_axis(table: str, n: int, keys: int, other: int, axis: int) -> str:  # (N, h, A, B, keys)
        index = rel_index(n, keys, bool(node.get("rel_mvit")))  # (n, keys): BotNet's k − q, or MViTv2's q − k
        gathered = b.op("Gather", [table, b.constant(index)], axis=0)  # (n, keys, d)
        front = b.op("Reshape", [b.op("Transpose", [qh], perm=[axis, 0, 1, 5 - axis, 4]), b.ints(n, -1, c // h)])
        out = b.op("MatMul", [front, b.op("Transpose", [gathered], perm=[0, 2, 1])])  # (n, N·h·other, keys)
        out = b.op("Reshape", [out, b.ints(n, -1, h, other, keys)])
        return b.op("Transpose", [out], perm=[1, 2, 0, 3, 4] if axis == 2 else [1, 2, 3, 0, 4])

    rows = b.op("Unsqueeze", [per_axis(f"{name}.rel_h", rows_q, kh, cols_q, 2), b.ints(5)])  # (N, h, A, B, kh, 1)
    cols = b.op("Unsqueeze", [per_axis(f"{name}.rel_w", cols_q, kw, rows_q, 3), b.ints(4)])  # (N, h, A, B, 1, kw)
    return b.op("Reshape", [b.op("Add", [rows, cols]), b.ints(0, h, rows_q * cols_q, kh * kw)])


def prefixed_rel_logits(b: Builder, q: str, node: dict, keys: int) -> str:
    """(N, heads, p + qh·qw, `keys`), as `edgecl.train.rel_logits.prefixed_rel_logits`: q's tokens past the
    ``rel_prefix`` p (Slice) as the ``rel_query`` map, their `rel_logits` over the ``rel_key`` map, zeros Pad'ed in
    front of both token axes for the prefix (MViTv2's class token gets no relative logits)."""
    p, (rows, cols), c = node["rel_prefix"], node["rel_query"], node["heads"] * node["rel_dim"]
    tail = b.op("Slice", [q, b.ints(p), b.ints(p + rows * cols), b.ints(2)])
    grid = b.op("Reshape", [tail, b.ints(0, c, rows, cols)])
    logits = rel_logits(b, grid, node, [c, rows, cols], node["rel_key"])
    front = keys - node["rel_key"][0] * node["rel_key"][1]
    return b.op("Pad", [logits, b.ints(0, 0, p, front, 0, 0, 0, 0), b.constant(np.array(0.0, dtype=np.float32))],
                mode="constant")


def mlp_bias_table(b: Builder, node: dict, shape: list[int]) -> str:
    """(heads, B): an MLP-generated bias table, as `edgecl.train.rel_logits.mlp_bias_table`: the offsets' constant
    coordinates through Gemm (fc1), Relu and Gemm (fc2, without C where it has no bias), 16·Sigmoid where the form
    squashes, transposed. `shape` is q's (C, H, W)."""
    w1, b1, w2, *b2 = (f"{node['name']}.{k}" for k in mlp_names(node))
    hidden = b.op("Relu", [b.op("Gemm", [b.constant(mlp_coords(node, *mlp_extent(node, shape))), w1, b1], transB=1)])
    out = b.op("Gemm", [hidden, w2, *b2], transB=1)
    if mlp_squashed(node):
        out = b.op("Mul", [b.op("Sigmoid", [out]), b.constant(16.0)])
    return b.op("Transpose", [out], perm=[1, 0])
