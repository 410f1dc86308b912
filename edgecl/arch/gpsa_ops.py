"""ConViT's gated positional self-attention as the ``attention`` op's later field ``gated_pos`` (timm's ``GPSA``): the
softmax of the content scores mixed, per head, with the softmax of a learned function of each query-key offset on
the square token grid, then renormalised:

    w = (1 − σ(g_h)) · softmax(scale · qᵀk) + σ(g_h) · softmax(P_h),   w / Σ_keys w
    P_h[n, m] = pos_weight[h] · (dx, dy, dx² + dy²) + pos_bias[h],   (dx, dy) = key m's column and row − query n's

Three tensors per node, belonging to no channel (the heads are never pruned): ``pos_weight`` (heads, 3) and
``pos_bias`` (heads,) — the module's ``pos_proj`` Linear — and ``gating`` (heads,), its ``gating_param``. The
offsets are a function of the grid's side alone (`relative_offsets`), as timm's ``get_rel_indices`` computes them;
torch (`edgecl.train.gated_attention`) and ONNX (`edgecl.graph.token_ops`) read the same constant."""
from __future__ import annotations

import math

import numpy as np

# an attention's gated-position tensors → their names in its module (ConViT's GPSA)
GATED_POS = {"pos_weight": "pos_proj.weight", "pos_bias": "pos_proj.bias", "gating": "gating_param"}


def gated_pos_shapes(heads: int) -> dict[str, tuple[int, ...]]:
    """The three tensors of a ``gated_pos`` attention of `heads` heads."""
    return {"pos_weight": (heads, 3), "pos_bias": (heads,), "gating": (heads,)}


def grid_side(tokens: int) -> int | None:
    """The side of the square grid of `tokens` positions (row by row), or None when they make no square."""
    side = math.isqrt(tokens)
    return side if side * side == tokens else None


def relative_offsets(side: int) -> np.ndarray:
    """(3, T, T) float32, T = side²: for query n and key m at (row, column) (n // side, n % side), (m // side, m %
    side), the key's column minus the query's, its row minus the query's, and their squared length (timm's
    ``rel_indices`` channels 0, 1, 2)."""
    pos = np.arange(side * side)
    dx = (pos % side)[None, :] - (pos % side)[:, None]
    dy = (pos // side)[None, :] - (pos // side)[:, None]
    return np.stack([dx, dy, dx * dx + dy * dy]).astype(np.float32)
