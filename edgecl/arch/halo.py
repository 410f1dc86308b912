"""Blocked local attention with halos (HaloNet's ``HaloAttn``, timm's ``halonet*``): an ``attention`` with
``halo_blocks`` [bq, bk] and ``halo`` h, shared by the torch form (`edgecl.train.halo_attention`) and the ONNX form
(`edgecl.graph.halo_onnx`) so both compute the same network: numpy only (the runtime imports no torch).

q's map is cut into bq × bq blocks (row-major, positions row-major inside a block, as Swin's windows); k's and v's
map into as many bk × bk blocks (bk = bq · the query stride: timm's strided q conv), each read with h more rows and
columns on every side — zeros beyond the map (timm pads k and v after their conv) — so each query block attends
over the (bk + 2h)² keys of its haloed window. With ``rel_pos`` [bk + 2h, bk + 2h] (`edgecl.arch.rel_pos`) query
(a, b) of its block meets key (y, x) of its window with q·(rel_h[y − a + bk + 2h − 1] + rel_w[x − b + bk + 2h − 1]).
The windows overlap, so they are gathered by a fixed index into the padded map (`halo_index`), built from the
shape, never stored. No window, shift, bias table, talking heads or fewer k/v heads goes with a halo."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgecl.arch.limits import MAX_ACTIVATION
from edgecl.errors import UsageError

MAX_HALO = 64  # rows and columns around a block: timm's are 2 and 3


def halo_fields(out: dict[str, Any], where: str) -> None:
    """``halo_blocks`` and ``halo`` go together, alone among the attention's layouts."""
    if (out["halo_blocks"] is None) != (out["halo"] is None):
        raise UsageError(f"{where}: attention halo_blocks {out['halo_blocks']} and halo {out['halo']} go together")
    if out["halo"] is not None and (out["window"] is not None or out["talking_heads"] or
                                    out["bias_offsets"] is not None or out["kv_heads"] not in (None, out["heads"])):
        raise UsageError(f"{where}: attention halo goes with no window, talking heads, bias table or fewer k/v heads")


def halo_window(node: dict[str, Any]) -> int:
    """The side of each query block's key window, bk + 2h."""
    return node["halo_blocks"][1] + 2 * node["halo"]


def check_halo_shape(node: dict[str, Any], q: list[int], k: list[int], where: str) -> tuple[int, int]:
    """q's map whole blocks of bq, k's as many blocks of bk (v at k's positions is checked already); (T_q, T_kv) of
    one block."""
    (bq, bk), win = node["halo_blocks"], halo_window(node)
    if q[1] % bq or q[2] % bq or [k[1], k[2]] != [q[1] // bq * bk, q[2] // bq * bk] or node["halo"] > MAX_HALO:
        raise UsageError(f"{where}: attention halo_blocks [{bq}, {bk}] needs q's map in whole {bq} × {bq} blocks, "
                         f"k's in as many {bk} × {bk} blocks and a halo of at most {MAX_HALO}, gets q {q}, k {k} and "
                         f"halo {node['halo']}")
    if (scores := node["heads"] * q[1] * q[2] * win * win) > MAX_ACTIVATION:  # each query meets its window's keys
        raise UsageError(f"{where}: attention over {q[1:]} queries in blocks of {bq}, each meeting {win} × {win} keys "
                         f"with {node['heads']} heads, computes {scores} scores per sample, more than {MAX_ACTIVATION}")
    return bq * bq, win * win


def halo_intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Values per sample besides inputs and output: the scores, their softmax and weights (heads × T_q × window²),
    k and v padded and gathered into windows, q and the output in blocks (an upper bound)."""
    (cq, hq, wq), (ck, hk, wk), (cv, _, _) = ins
    win, h, blocks = halo_window(node), node["heads"], (hq // node["halo_blocks"][0]) * (wq // node["halo_blocks"][0])
    pad = node["halo"]
    return 3 * h * hq * wq * win * win + 2 * (ck + cv) * ((hk + 2 * pad) * (wk + 2 * pad) + blocks * win * win) + \
        2 * (cq + cv) * hq * wq


def halo_index(height: int, width: int, block: int, halo: int) -> np.ndarray:
    """(blocks, window²) int64: the positions of each block's haloed window in the (height + 2h) × (width + 2h)
    padded map, flattened row-major; blocks row-major, positions row-major in a window."""
    win, padded_w = block + 2 * halo, width + 2 * halo
    rows, cols = np.arange(0, height, block), np.arange(0, width, block)
    inside = (np.arange(win)[:, None] * padded_w + np.arange(win)[None, :]).reshape(-1)
    starts = (rows[:, None] * padded_w + cols[None, :]).reshape(-1)
    return (starts[:, None] + inside[None, :]).astype(np.int64)
