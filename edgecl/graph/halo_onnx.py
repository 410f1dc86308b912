"""ONNX form of HaloNet's blocked attention (`edgecl.arch.halo`), as `edgecl.train.halo_attention` computes it: q's
blocks into the batch by Reshape + Transpose, k's and v's overlapping windows by a zero Pad and one Gather at the
constant `halo_index`, and the blocks back. Only ops ONNX Runtime's CPU and CUDA providers both have."""
from __future__ import annotations

import numpy as np

from edgecl.arch.attention_windows import partition
from edgecl.arch.halo import halo_index, halo_window
from edgecl.graph.nodes import Builder


def halo_blocks(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]]
                ) -> tuple[list[str], list[list[int]]]:
    """q as (N·blocks, C, bq, bq), k and v as (N·blocks, C, win, win), and those per-block shapes."""
    (c, height, width), (bq, bk), pad, win = shapes[0], node["halo_blocks"], node["halo"], halo_window(node)
    grid, into, _ = partition(height, width, bq, bq, False)
    six = b.op("Reshape", [q, b.ints(0, c, *grid)])
    blocks = [b.op("Reshape", [b.op("Transpose", [six], perm=list(into)), b.ints(-1, c, bq, bq)])]
    _, kh, kw = shapes[1]
    index = b.constant(halo_index(kh, kw, bk, pad))  # (blocks, win²) into the padded map, flattened

    for t, ch in ((k, shapes[1][0]), (v, shapes[2][0])):
        padded = b.op("Pad", [t, b.ints(0, 0, pad, pad, 0, 0, pad, pad),
                              b.constant(np.array(0.0, dtype=np.float32))], mode="constant")
        flat = b.op("Reshape", [padded, b.ints(0, ch, (kh + 2 * pad) * (kw + 2 * pad))])
        windows = b.op("Gather", [flat, index], axis=2)  # (N, C, blocks, win²)
        blocks.append(b.op("Reshape", [b.op("Transpose", [windows], perm=[0, 2, 1, 3]), b.ints(-1, ch, win, win)]))
    return blocks, [[c, bq, bq], [shapes[1][0], win, win], [shapes[2][0], win, win]]


def halo_unblock(b: Builder, out: str, node: dict, shape: list[int]) -> str:
    """(N·blocks, C, bq, bq) back to the (C, H, W) map `shape` of the output."""
    (c, height, width), bq = shape, node["halo_blocks"][0]
    _, _, back = partition(height, width, bq, bq, False)
    grid = b.op("Reshape", [out, b.ints(-1, height // bq, width // bq, c, bq, bq)])
    return b.op("Reshape", [b.op("Transpose", [grid], perm=list(back)), b.ints(0, c, height, width)])
