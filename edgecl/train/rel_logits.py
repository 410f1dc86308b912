"""Torch side of an attention's relative position logits (BotNet's ``PosEmbedRel``, `edgecl.arch.rel_pos`), as
`edgecl.graph.rel_pos_onnx` emits them: the tables read at the fixed offsets, then one product per axis with q."""
from __future__ import annotations

import functools

import torch

from edgecl.arch.rel_pos import rel_index, rel_scale


@functools.lru_cache(maxsize=64)
def _index(n: int) -> torch.Tensor:
    """`rel_index` as a tensor, built once per side."""
    return torch.from_numpy(rel_index(n))


def rel_logits(q: torch.Tensor, node: dict, rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """(N, heads, H·W, H·W): query (a, b) and key (y, x) get q(a, b)·(rel_h[y − a + H − 1] + rel_w[x − b + W − 1]),
    q of (N, heads·d, H, W) (times the scale with ``rel_scaled``)."""
    n, (height, width), h = q.shape[0], node["rel_pos"], node["heads"]
    qh = q.reshape(n, h, -1, height, width).permute(0, 1, 3, 4, 2) * rel_scale(node)  # (N, h, H, W, d)
    rows = rel_h[_index(height).to(q.device)]  # (H, H, d): query row a, key row y
    cols = rel_w[_index(width).to(q.device)]  # (W, W, d)
    by_row = torch.einsum("nhabd,ayd->nhaby", qh, rows)  # (N, h, H, W, H)
    by_col = torch.einsum("nhabd,bxd->nhabx", qh, cols)  # (N, h, H, W, W)
    t = height * width
    return (by_row.unsqueeze(-1) + by_col.unsqueeze(-2)).reshape(n, h, t, t)
