"""The two ops of EdgeNeXt's split depth-wise transposed attention (SDTA) block that no other op computes, their
output shapes and work bounds (`edgecl.arch.op_shapes` asks here), and the Fourier position grid both the torch form
(`edgecl.train.models`) and the ONNX form (`edgecl.graph.sdta_ops`) read, so that the two are the same numbers.

- ``channel_attention`` (inputs q, k, v, maps of equal shape (C, H, W); XCA, timm's ``CrossCovarianceAttn``): per
  head, a contiguous block of d = C / ``heads`` channels, each of q's and k's channels L2-normalised over the H·W
  positions (divided by max(‖·‖, ``eps``), ``F.normalize``), the d × d scores q̂·k̂ᵀ times the head's learned
  ``temperature`` and their softmax over k's channels, times v: output channel i of a head is Σ_j softmax_j ·
  v_j. Tensor ``temperature`` ``(heads,)`` (stored ``(heads, 1, 1)`` as timm's ``MODULE.temperature``, starting at
  1); like an attention's bias it belongs to no channel (`ROWLESS_OPS`: methods keep it per task). DaViT's channel
  attention is the same op with ``normalize`` false (the scores of q and k as they are) and a fixed ``scale`` in
  place of the temperature (no tensor), reading its k, v, q as q, k, v (softmax of kᵀv applied to q). A dead channel
  of q or k is not a dead output (its scores are 0, not −∞, and it still takes its share of the softmax), so every
  channel of q, k and v is pinned and kept in order (`edgecl.arch.channels`); its output is varying, and channels of
  its own (channel i mixes its head's v channels: not 0 when q_i, k_i and v_i are), pinned too.
- ``fourier_pos`` (input a map (C, H, W), read for its height and width only): EdgeNeXt's fixed sine–cosine position
  grid of 2·``hidden`` channels, (2·hidden, H, W), the same for every sample: channel 2m of the first ``hidden`` is
  sin(y / t_m), 2m + 1 cos(y / t_m), with y = 2π·(row + 1) / (H + 1e-6) and t_m = ``temperature`` ^ (2m / hidden);
  the last ``hidden`` the same of the column. No tensors: a pure function of the map's shape, computed when the
  graph is built (never stored in a spec or artifact); the learned 1×1 conv timm applies to it
  (``token_projection``) is an ordinary ``conv`` node reading it. Its channels are a group of their own that nothing
  can cut (they have no producer), varying over the map.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgecl.errors import UsageError

SDTA_OPS = ("channel_attention", "fourier_pos")
MAX_FOURIER = 512  # fourier_pos's hidden channels: timm's is 32


def fourier_periods(hidden: int, temperature: float) -> np.ndarray:
    """t_m = temperature ^ (2⌊m/2⌋ / hidden) for the ``hidden`` channels of one axis, float32 as timm's."""
    f32 = np.float32
    with np.errstate(all="ignore"):  # a hostile temperature: `sdta_shape` refuses what is not finite
        return (f32(temperature) ** (f32(2) * (np.arange(hidden) // 2).astype(f32) / f32(hidden))).astype(f32)


def fourier_grid(hidden: int, temperature: float, height: int, width: int) -> np.ndarray:
    """The ``fourier_pos`` grid, (2·hidden, height, width) float32, in timm's float32 steps (cumulative counts over
    the side plus 1e-6, times 2π, over t_m, sin or cos by channel parity)."""
    f32 = np.float32
    rows = (np.arange(1, height + 1, dtype=f32) / (f32(height) + f32(1e-6)) * f32(2 * math.pi)).astype(f32)
    cols = (np.arange(1, width + 1, dtype=f32) / (f32(width) + f32(1e-6)) * f32(2 * math.pi)).astype(f32)
    dim_t = fourier_periods(hidden, temperature)

    def waves(axis: np.ndarray) -> np.ndarray:  # (hidden, len(axis)): sin on even channels, cos on odd
        arg = (axis[None, :] / dim_t[:, None]).astype(f32)
        return np.where((np.arange(hidden) % 2 == 0)[:, None], np.sin(arg), np.cos(arg)).astype(f32)

    y, x = waves(rows), waves(cols)
    return np.concatenate([np.broadcast_to(y[:, :, None], (hidden, height, width)),
                           np.broadcast_to(x[:, None, :], (hidden, height, width))]).astype(f32)


def sdta_shape(node: dict[str, Any], ins: list[list[int]], where: str) -> list[int]:
    """Output shape of a ``channel_attention`` or ``fourier_pos`` node; UsageError where the inputs do not fit."""
    x = ins[0]
    if node["op"] == "fourier_pos":
        if len(x) != 3 or node["hidden"] > MAX_FOURIER:
            raise UsageError(f"{where}: fourier_pos needs a (channels, height, width) map and hidden at most "
                             f"{MAX_FOURIER}, gets {x} and hidden={node['hidden']}")
        with np.errstate(all="ignore"):  # every angle is at most 2π: the grid is finite when 2π / t_m is
            periods = fourier_periods(node["hidden"], node["temperature"])
            finite = node["temperature"] > 0 and bool(np.isfinite(np.float32(2 * math.pi) / periods).all())
        if not finite:
            raise UsageError(f"{where}: fourier_pos temperature={node['temperature']:g} gives periods "
                             f"{periods.min():g} to {periods.max():g} and a grid that is not finite (an angle "
                             "of at most 2π over each period must be a float32); timm's is 10000")
        return [2 * node["hidden"], *x[1:]]
    h = node["heads"]
    if len(x) != 3 or any(s != x for s in ins) or x[0] % h:
        raise UsageError(f"{where}: channel_attention needs maps q, k and v of one shape whose channels {h} heads "
                         f"divide, gets {ins}")
    return list(x)


def sdta_intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Values held besides inputs and output: ``channel_attention``'s q, k, v as heads, q and k squared, their norms
    and normalised copies, the heads' d × d scores, scaled scores and softmax and the output before its reshape (an
    upper bound); ``fourier_pos``: its grid and the grid over the batch."""
    if node["op"] == "fourier_pos":
        return 2 * 2 * node["hidden"] * math.prod(ins[0][1:])
    c, t, h = ins[0][0], math.prod(ins[0][1:]), node["heads"]
    return 8 * c * t + 2 * c + 3 * c * (c // h)
