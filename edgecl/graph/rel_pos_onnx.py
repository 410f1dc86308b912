"""ONNX form of an attention's relative position logits (BotNet, `edgecl.arch.rel_pos`), as
`edgecl.train.rel_logits` computes them. Only ops ONNX Runtime's CPU and CUDA providers both have: Reshape,
Transpose, Gather, MatMul, Mul, Unsqueeze, Add."""
from __future__ import annotations

from edgecl.arch.rel_pos import rel_index, rel_scale
from edgecl.graph.nodes import Builder


def rel_logits(b: Builder, q: str, node: dict, shape: list[int]) -> str:
    """(N, heads, H·W, H·W) logits to add to the scores: q as (N, heads, H, W, d); per axis the table gathered by
    its constant (n, n) offsets and one MatMul batched over the query's row (column) with it, the two broadcast
    over the other axis and summed. `shape` is q's (C, H, W)."""
    (c, height, width), h, name = shape, node["heads"], node["name"]
    qh = b.op("Transpose", [b.op("Reshape", [q, b.ints(0, h, c // h, height, width)])], perm=[0, 1, 3, 4, 2])
    if node.get("rel_scaled"):
        qh = b.op("Mul", [qh, b.constant(rel_scale(node))])

    def per_axis(table: str, n: int, other: int, axis: int) -> str:  # (N, h, H, W, n): q at `axis` meets the keys
        gathered = b.op("Gather", [table, b.constant(rel_index(n))], axis=0)  # (n, n, d)
        front = b.op("Reshape", [b.op("Transpose", [qh], perm=[axis, 0, 1, 5 - axis, 4]), b.ints(n, -1, c // h)])
        out = b.op("MatMul", [front, b.op("Transpose", [gathered], perm=[0, 2, 1])])  # (n, N·h·other, n)
        out = b.op("Reshape", [out, b.ints(n, -1, h, other, n)])
        return b.op("Transpose", [out], perm=[1, 2, 0, 3, 4] if axis == 2 else [1, 2, 3, 0, 4])

    rows = b.op("Unsqueeze", [per_axis(f"{name}.rel_h", height, width, 2), b.ints(5)])  # (N, h, H, W, H, 1)
    cols = b.op("Unsqueeze", [per_axis(f"{name}.rel_w", width, height, 3), b.ints(4)])  # (N, h, H, W, 1, W)
    t = height * width
    return b.op("Reshape", [b.op("Add", [rows, cols]), b.ints(0, h, t, t)])
