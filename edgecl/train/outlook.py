"""VOLO's outlook attention in torch (the ``outlook_attention`` op, `edgecl.arch.outlook_ops`), as timm's
``OutlookAttention`` computes it between its Linears: ``F.unfold`` of v, the softmaxed per-window weights, ``F.fold``
back; `edgecl.graph.outlook_onnx` is its ONNX form."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def outlook_attention(v: torch.Tensor, logits: torch.Tensor, node: dict) -> torch.Tensor:
    """v (N, C, H, W), logits (N, heads·k⁴, h, w) → (N, C, H, W)."""
    (n, c, height, width), (h, w) = v.shape, logits.shape[2:]
    heads, k, pad, stride = node["heads"], node["k"], node["pad"], node["stride"]
    windows = F.unfold(v, k, padding=pad, stride=stride).reshape(n, heads, c // heads, k * k, h * w)
    weights = logits.permute(0, 2, 3, 1).reshape(n, h * w, heads, k * k, k * k).permute(0, 2, 1, 3, 4)
    weights = (weights * node["scale"]).softmax(dim=-1)  # (N, heads, windows, slot a, slot b)
    out = weights @ windows.permute(0, 1, 4, 3, 2)  # (N, heads, windows, k², d)
    out = out.permute(0, 1, 4, 3, 2).reshape(n, c * k * k, h * w)
    return F.fold(out, (height, width), k, padding=pad, stride=stride)
