"""Windowed attention's fixed parts (Swin's shifted windows), shared by the torch form (`edgecl.train.models`) and
the ONNX form (`edgecl.graph.token_ops`) so both compute the same network: numpy only (the runtime imports no torch).

An ``attention`` with ``window`` [wh, ww] attends within each wh × ww window of its (C, H, W) map (windows in
row-major order, positions row-major inside a window); with ``shift`` [sh, sw] the map is first rolled by
(−sh, −sw), windows that straddle the roll's seam get a mask that keeps pairs from different original regions apart
(−100 added to their scores, Swin's value), and the result is rolled back. The mask is built from the shape, never
stored.

With ``dilated`` the window's wh × ww positions are spread over the map at stride (H/wh, W/ww) instead of side by
side: attention among the positions at the same offset (i mod H/wh, j mod W/ww), a grid partition (MaxViT's grid
attention with grid size [wh, ww]; MobileViT's attention over the patches at one pixel offset, wh × ww patches of
H/wh × W/ww pixels). Only the 6-D view's factor order changes (`partition`); a dilated window takes no shift."""
from __future__ import annotations

from typing import Any

import numpy as np

MASKED = -100.0  # timm's and torchvision's value: exp(-100) is 0 in float32 next to any unmasked score


def window_of(node: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(wh, ww, sh, sw) of a windowed attention node, None for attention over the whole map."""
    if not node.get("window"):
        return None
    shift = node.get("shift") or [0, 0]
    return (*node["window"], *shift)


def partition(height: int, width: int, wh: int, ww: int, dilated: bool) -> tuple[tuple[int, ...], tuple[int, ...],
                                                                                 tuple[int, ...]]:
    """How (N, C, H, W) becomes (N·windows, C, wh, ww) and back, in both forms: the map's (H, W) as a 4-D grid, the
    6-D permutation that moves the window index into the batch (after reshaping to (N, C, *grid)), and the one that
    puts (N, H/wh, W/ww, C, wh, ww) back to (N, C, *grid). Side by side: H = (H/wh, wh); dilated: H = (wh, H/wh),
    the window's rows H/wh apart; windows are row-major by their first row and column either way."""
    if dilated:
        return (wh, height // wh, ww, width // ww), (0, 3, 5, 1, 2, 4), (0, 3, 4, 1, 5, 2)
    return (height // wh, wh, width // ww, ww), (0, 2, 4, 1, 3, 5), (0, 3, 1, 4, 2, 5)


def window_mask(height: int, width: int, wh: int, ww: int, sh: int, sw: int) -> np.ndarray | None:
    """The (windows, wh·ww, wh·ww) float32 scores mask of a shifted window attention over a height × width map,
    as timm's SwinTransformerBlock.get_attn_mask and torchvision's shifted_window_attention build it; None without
    a shift (nothing masked)."""
    if not (sh or sw):
        return None
    region = np.zeros((height, width), dtype=np.float32)
    count = 0
    for rows in ((0, -wh), (-wh, -sh), (-sh, None)) if sh else ((0, None),):
        for cols in ((0, -ww), (-ww, -sw), (-sw, None)) if sw else ((0, None),):
            region[rows[0]:rows[1], cols[0]:cols[1]] = count
            count += 1
    windows = region.reshape(height // wh, wh, width // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = windows[:, None, :] != windows[:, :, None]
    return np.where(differ, np.float32(MASKED), np.float32(0.0)).astype(np.float32)
