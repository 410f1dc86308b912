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
"""
from __future__ import annotations

import math
from typing import Any

from edgecl.arch.limits import MAX_ACTIVATION
from edgecl.errors import UsageError

MAX_RADIUS = 31  # the position window's side: timm's is 9


def lambda_shape(node: dict[str, Any], ins: list[list[int]], where: str) -> list[int]:
    """Output shape (heads·dv, H, W) of a ``lambda_layer`` node; UsageError where the inputs do not fit."""
    (q, k, v), h, d, r = ins, node["heads"], node["dim"], node["r"]
    if len(q) != 3 or q[1:] != k[1:] or len(v) != 3 or v[1:] != q[1:] or q[0] != h * d or k[0] != d or \
            r % 2 == 0 or r > MAX_RADIUS:
        raise UsageError(f"{where}: lambda_layer needs maps q of {h} heads × dim {d} channels, k of {d} and v at the "
                         f"same positions, and an odd r of at most {MAX_RADIUS}, gets {ins} and r={r}")
    if (products := h * d * v[0] * math.prod(q[1:])) > MAX_ACTIVATION:  # q times the position lambdas before the
        # sum over dim: a spec of a few thousand weights could otherwise ask for hundreds of GB
        raise UsageError(f"{where}: lambda_layer of {h} heads, dim {d}, {v[0]} value channels over {q[1:]} computes "
                         f"{products} products per sample, more than {MAX_ACTIVATION}")
    return [h * v[0], *q[1:]]


def lambda_intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Values held besides inputs and output: k's softmax, the content lambda, one image's r²·T unfolded windows
    (a Conv's im2col), the position lambdas (dim × dv per position) and their product with q before the sum over dim
    (heads × dim × dv per position), and the content output (an upper bound)."""
    (_, *hw), d, dv, h, r = ins[0], node["dim"], ins[2][0], node["heads"], node["r"]
    t = math.prod(hw)
    return d * t + d * dv + r * r * t + d * dv * t + h * d * dv * t + 2 * h * dv * t


def lambda_tensor_shapes(node: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The position filters and their bias."""
    return {"weight": (node["dim"], 1, node["r"], node["r"]), "bias": (node["dim"],)}
