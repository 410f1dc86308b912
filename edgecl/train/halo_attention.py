"""Torch side of HaloNet's blocked attention (`edgecl.arch.halo`), as `edgecl.graph.halo_onnx` emits it: q cut into
its blocks and k, v into their haloed windows, each block one batch entry (`halo_blocks`), the attention run on
them, the blocks put back (`halo_unblock`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.arch.attention_windows import partition
from edgecl.arch.halo import halo_window


def halo_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, node: dict
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N·blocks, C, bq, bq) query blocks, row-major as Swin's windows; (N·blocks, C, win, win) key and value
    windows: the map zero-padded by the halo, windows of win = bk + 2h every bk rows and columns."""
    n, c, height, width = q.shape
    (bq, bk), pad, win = node["halo_blocks"], node["halo"], halo_window(node)
    grid, into, _ = partition(height, width, bq, bq, False)

    def haloed(t: torch.Tensor) -> torch.Tensor:  # (N, C, nh, nw, win, win) → (N·blocks, C, win, win)
        windows = F.pad(t, [pad] * 4).unfold(2, win, bk).unfold(3, win, bk)
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, t.shape[1], win, win)

    return q.reshape(n, c, *grid).permute(*into).reshape(-1, c, bq, bq), haloed(k), haloed(v)


def halo_unblock(out: torch.Tensor, node: dict, height: int, width: int) -> torch.Tensor:
    """(N·blocks, C, bq, bq) back to the (N, C, H, W) map of q."""
    bq, c = node["halo_blocks"][0], out.shape[1]
    _, _, back = partition(height, width, bq, bq, False)
    return out.reshape(-1, height // bq, width // bq, c, bq, bq).permute(*back).reshape(-1, c, height, width)
