"""The ``lambda_layer`` op (LambdaNetworks' lambda layer, timm's ``LambdaLayer`` with its local position lambdas):
its output shape, work bound and tensors (`edgecl.arch.op_shapes` and `edgecl.arch.spec` ask here).

Inputs q (heads·dim, H, W), k (dim, H, W), v (dv, H, W) — the qkv conv's three blocks, q and v after their
BatchNorms; fields ``heads``, ``dim`` (the key depth), ``r`` (the odd side of the position window). Each of k's
channels is softmaxed over the H·W positions; the content lambda λc = k̂·vᵀ (dim × dv per sample) is shared by every
position and every head (multi-query: one k and v for all heads); the position lambdas λp (dim × dv at each position)
are a conv of v's every channel, alone, with the same ``dim`` r × r filters (timm's Conv3d of kernel (r, r, 1) and
padding r // 2, with bias, over v as a (1, H, W, dv) volume). Output channel h·dv + j at position m is Σ_i q[h·dim +
i, m]·(λc[i, j] + λp[m, i, j]). Tensors ``weight`` (dim, 1, r, r) and ``bias`` (dim,) (stored (dim, 1, r, r, 1) as
timm's ``conv_lambda.weight``): like an attention's bias table they belong to no channel (`ROWLESS_OPS`: methods
keep them per task). A dead k channel still takes its share of the softmax and a dead v channel's position lambda is
the filter's bias, not 0: every channel of q, k and v is pinned and ordered, and the output is a pinned group of its
own (`edgecl.arch.channels`), varying.

With ``rel_pos`` [H, W] (the map) in place of ``r`` (timm's ``r=None``, ``lambda_resnet26rpt_256``) the position
lambdas come from a learned relative embedding, tensor ``pos_emb`` (2H − 1, 2W − 1, dim) (timm's name and shape):
position (y, x) gives query (a, b) the vector E = pos_emb[y − a + H − 1, x − b + W − 1], and output channel h·dv + j
at query m adds Σ_n (q_h(m)·E(m, n))·v_j(n) (`lambda_rel_index`: the fixed offsets, built from the shape).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgecl.arch.limits import MAX_ACTIVATION
from edgecl.errors import UsageError

MAX_RADIUS = 31  # the position window's side: timm's is 9


def lambda_fields(out: dict[str, Any], where: str) -> None:
    """A position lambda: the local conv (``r``) or the relative embedding (``rel_pos``), one of them."""
    if (out["r"] is None) == (out["rel_pos"] is None):
        raise UsageError(f"{where}: lambda_layer needs one of r (local position lambdas) and rel_pos (a relative "
                         f"embedding), gets r {out['r']} and rel_pos {out['rel_pos']}")


def lambda_shape(node: dict[str, Any], ins: list[list[int]], where: str) -> list[int]:
    """Output shape (heads·dv, H, W) of a ``lambda_layer`` node; UsageError where the inputs do not fit."""
    (q, k, v), h, d, r, rel = ins, node["heads"], node["dim"], node.get("r"), node.get("rel_pos")
    if len(q) != 3 or q[1:] != k[1:] or len(v) != 3 or v[1:] != q[1:] or q[0] != h * d or k[0] != d or \
            r is not None and (r % 2 == 0 or r > MAX_RADIUS) or rel is not None and list(rel) != q[1:]:
        raise UsageError(f"{where}: lambda_layer needs maps q of {h} heads × dim {d} channels, k of {d} and v at the "
                         f"same positions, and an odd r of at most {MAX_RADIUS} or rel_pos the map, gets {ins}, "
                         f"r={r} and rel_pos={rel}")
    t = math.prod(q[1:])
    if (products := h * d * v[0] * t if rel is None else h * d * t * t + h * v[0] * t * t) > MAX_ACTIVATION:
        # q times the position lambdas before the sum over dim (or q times every position's embedding, then the
        # logits times v): a spec of a few thousand weights could otherwise ask for hundreds of GB
        raise UsageError(f"{where}: lambda_layer of {h} heads, dim {d}, {v[0]} value channels over {q[1:]} computes "
                         f"{products} products per sample, more than {MAX_ACTIVATION}")
    return [h * v[0], *q[1:]]


def lambda_intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Values held besides inputs and output: k's softmax, the content lambda, one image's r²·T unfolded windows
    (a Conv's im2col), the position lambdas (dim × dv per position) and their product with q before the sum over dim
    (heads × dim × dv per position), and the content output (an upper bound)."""
    (_, *hw), d, dv, h, r = ins[0], node["dim"], ins[2][0], node["heads"], node.get("r")
    t = math.prod(hw)
    if r is None:  # the (T, T, dim) embeddings gathered, q's logits against them (heads × T × T), their product
        # with v and the content output
        return d * t + d * dv + t * t * d + 2 * h * t * t + 3 * h * dv * t
    return d * t + d * dv + r * r * t + d * dv * t + h * d * dv * t + 2 * h * dv * t


def lambda_tensor_shapes(node: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The position filters and their bias, or the relative embedding (2H − 1, 2W − 1, dim)."""
    if node.get("rel_pos"):
        return {"pos_emb": (*(2 * s - 1 for s in node["rel_pos"]), node["dim"])}
    return {"weight": (node["dim"], 1, node["r"], node["r"]), "bias": (node["dim"],)}


def lambda_rel_index(height: int, width: int) -> np.ndarray:
    """(T, T) int64, T = H·W: the row of the embedding flattened to ((2H − 1)(2W − 1), dim) that query (a, b) reads
    for position (y, x) — offset (y − a + H − 1, x − b + W − 1), timm's ``rel_pos_indices``."""
    rows, cols = np.divmod(np.arange(height * width), width)
    dy, dx = rows[None, :] - rows[:, None] + height - 1, cols[None, :] - cols[:, None] + width - 1
    return (dy * (2 * width - 1) + dx).astype(np.int64)
