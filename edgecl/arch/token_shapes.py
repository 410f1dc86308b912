"""Output shapes of the token and attention ops (`op_shapes.output_shape` dispatches here): the checks that a token map,
an attention's q, k and v, its windows and its bias table fit together, each a UsageError naming the node."""
from __future__ import annotations

import math
from typing import Any

from edgecl.arch.gpsa_ops import grid_side
from edgecl.arch.halo import check_halo_shape
from edgecl.arch.mlp_bias import mlp_extent
from edgecl.arch.ops import MAX_ADAPTIVE_INPUT
from edgecl.arch.rel_pos import check_rel_shape
from edgecl.errors import UsageError


def token_shape(node: dict[str, Any], ins: list[list[int]], where: str) -> list[int]:
    """Output shape of the token ops: every input a ``(C, T, 1)`` token map, except that a position embedding may
    also be added to a feature map ``(C, H, W)`` (PiT, Visformer), one vector per position, H·W of them."""
    op, x = node["op"], ins[0]
    if len(x) != 3 or x[2] != 1 and op != "pos_embed":
        raise UsageError(f"{where}: {op} needs tokens as a (channels, tokens, 1) map, gets {x}")
    if op == "token_mix":
        if x[1] != node["in"]:
            raise UsageError(f"{where}: token_mix mixes {node['in']} tokens, gets {x}")
        return [x[0], node["out"], 1]
    if op == "token":
        if node["index"] + node["count"] > x[1]:
            raise UsageError(f"{where}: tokens {node['index']} to {node['index'] + node['count'] - 1} of {x[1]} tokens")
        return [x[0], node["count"], 1]
    tile = node.get("tile") if op == "pos_embed" else None
    if tile and (x[1] % tile[0] or x[2] % tile[1] or tile[0] * tile[1] != node["tokens"] or node.get("block") or
                 node.get("channels_last")):  # TNT's: one embedding for every window
        raise UsageError(f"{where}: pos_embed tile {tile} needs windows that tile the {x[1:]} map, tokens = "
                         f"{tile[0]}·{tile[1]} (gets {node['tokens']}), and no block or channels_last")
    resize = node.get("resize") if op == "pos_embed" else None
    if resize and (resize[0] * resize[1] != node["tokens"] or tile or node.get("block") or node.get("channels_last")
                   or (node.get("module_shape") or [0, 0, *resize])[2:] != resize or
                   max(*resize, *x[1:]) > MAX_ADAPTIVE_INPUT):  # HieraDet's: its grid resized to the map
        raise UsageError(f"{where}: pos_embed resize {resize} needs tokens = {resize[0]}·{resize[1]} (gets "
                         f"{node['tokens']}) stored (1, ch, {resize[0]}, {resize[1]}), no tile, block or "
                         f"channels_last, and the grid and the {x[1:]} map of sides at most {MAX_ADAPTIVE_INPUT}")
    if x[0] != node["ch"] or op == "pos_embed" and not (tile or resize) and x[1] * x[2] != node["tokens"]:
        tokens = f" and {node['tokens']} positions" if op == "pos_embed" else ""
        raise UsageError(f"{where}: {op} has {node['ch']} channels{tokens}, gets {x}")
    if op == "pos_embed" and node.get("block") and (x[1] != x[2] or x[1] % node["block"]):  # NesT's (`module_state`)
        raise UsageError(f"{where}: pos_embed stored in blocks of {node['block']} × {node['block']} needs a square map "
                         f"of whole blocks, gets {x}")
    return [x[0], x[1] + node["tokens"], 1] if op == "class_token" else list(x)


def attention_shape(node: dict[str, Any], ins: list[list[int]], where: str) -> list[int]:
    """Output shape of ``attention``: q's positions, heads × v's channels per head."""
    q, k, v = ins
    h, kv = node["heads"], node.get("kv_heads") or node["heads"]
    d = q[0] // h if len(q) == 3 and q[0] % h == 0 else 0
    if len(q) != 3 or len(k) != 3 or len(v) != 3 or not d or h % kv or k[0] != kv * d or v[1:] != k[1:] or \
            v[0] % kv or node["scale"] <= 0:
        raise UsageError(f"{where}: attention needs maps q of {h} heads of d channels, k of {kv} heads of d, v of "
                         f"{kv} heads at k's positions ({kv} dividing {h}) and a scale > 0, gets {ins} and scale "
                         f"{node['scale']}")
    window = node.get("window")
    if node.get("halo_blocks"):  # HaloNet's blocks: k and v may be on a larger map (a strided q)
        check_halo_shape(node, q, k, where)
        check_rel_shape(node, q, k, where)
    elif window:
        shift = node.get("shift") or [0, 0]
        if kv != h or q[1:] != k[1:] or q[1] % window[0] or q[2] % window[1] or \
                any(s >= w for s, w in zip(shift, window)) or node.get("dilated") and any(shift):
            raise UsageError(f"{where}: a windowed attention needs q, k and v at the same positions, kv_heads = "
                             f"heads, windows {window} that tile the map and a shift below the window (none when "
                             f"dilated), gets {ins}, kv_heads {kv} and shift {shift}")
        _check_attention_bias(node, math.prod(window), math.prod(window), where)
        check_rel_shape(node, q, k, where)
    else:
        _check_attention_bias(node, math.prod(q[1:]), math.prod(k[1:]), where)
        check_rel_shape(node, q, k, where)
    if node.get("bias_mlp") and (node["bias_offsets"] != math.prod(2 * s - 1 for s in mlp_extent(node, q)) or
                                 q[1:] != k[1:]):
        raise UsageError(f"{where}: an MLP bias (bias_table 'mlp') spans the offsets of its window or map, "
                         f"{mlp_extent(node, q)}: bias_offsets (2·H − 1)(2·W − 1) with q and k at the same "
                         f"positions, gets bias_offsets {node['bias_offsets']}, q {q} and k {k}")
    if node.get("gated_pos") and (q[1:] != k[1:] or grid_side(math.prod(q[1:])) is None):
        raise UsageError(f"{where}: a gated_pos attention needs q and k at the same positions, a square number of "
                         f"them (a grid row by row), gets {ins}")
    return [v[0] // kv * h, *q[1:]]


def _check_attention_bias(node: dict[str, Any], tq: int, tk: int, where: str) -> None:
    """An attention bias needs both its table size and its index, a T_q × T_kv table of offsets below it."""
    offsets, index = node.get("bias_offsets"), node.get("bias_index")
    if offsets is None and index is None:
        return
    if offsets is None or index is None or offsets > tq * tk:
        raise UsageError(f"{where}: an attention bias needs bias_offsets (at most T_q·T_kv = {tq * tk}) and "
                         f"bias_index together, gets bias_offsets {offsets} and "
                         f"{'no' if index is None else 'a'} bias_index")
    if len(index) != tq or any(len(row) != tk for row in index) or max(max(row) for row in index) >= offsets:
        raise UsageError(f"{where}: bias_index must be {tq} rows (query positions) of {tk} offsets (key positions) "
                         f"each below bias_offsets {offsets}")
