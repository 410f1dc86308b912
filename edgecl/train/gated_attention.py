"""The torch side of ConViT's gated positional attention (`edgecl.arch.gpsa_ops`), mixed into
`edgecl.train.models.attention`'s weights."""
from __future__ import annotations

import torch

from edgecl.arch.gpsa_ops import grid_side, relative_offsets


def gated_positions(weights: torch.Tensor, pos_weight: torch.Tensor, pos_bias: torch.Tensor,
                    gating: torch.Tensor) -> torch.Tensor:
    """The content softmax `weights` (N, h, T, T) mixed per head with the softmax of the learned offsets' scores,
    (1 − σ(g))·w + σ(g)·softmax(P), renormalised over the keys (as timm's GPSA divides by the sum)."""
    t, h = weights.shape[-1], weights.shape[1]
    offsets = torch.from_numpy(relative_offsets(grid_side(t))).to(weights.device, weights.dtype)  # (3, T, T)
    scores = (pos_weight @ offsets.reshape(3, t * t) + pos_bias.reshape(h, 1)).reshape(1, h, t, t)
    gate = torch.sigmoid(gating).reshape(1, h, 1, 1)
    mixed = (1.0 - gate) * weights + gate * torch.softmax(scores, dim=-1)
    return mixed / mixed.sum(dim=-1, keepdim=True)
