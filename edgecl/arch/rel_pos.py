"""Relative position logits of an ``attention`` (Bottleneck Transformers' ``PosEmbedRel``, timm's BotNet): fields,
shape checks, work bound and tensors (`edgecl.arch.ops`, `op_rules` and `token_shapes` ask here).

Fields ``rel_pos`` [kh, kw] (the keys' extent: the map, H × W, where queries and keys are its positions; with a
halo, `edgecl.arch.halo`, each query block's haloed key window) and
``rel_dim`` d (the channels of one head of q) go together; ``rel_scaled`` true multiplies the logits by the
attention's scale too (timm's ``scale_pos_embed``). Tensors ``rel_h`` (2·kh − 1, d) and ``rel_w`` (2·kw − 1, d),
one learned embedding per relative row and column offset, shared by every head (timm's ``pos_embed.height_rel`` and
``width_rel``). Query (a, b) meets key (y, x) with the extra logit

    q(a, b) · (rel_h[y − a + kh − 1] + rel_w[x − b + kw − 1])     (a, b in the map or the query's block)

(unscaled q unless ``rel_scaled``), added to its score before the softmax. With a ``window`` (no shift, not dilated)
``rel_pos`` is the window and (a, b), (y, x) are positions within one window (SAM's windowed blocks). With
``rel_mvit`` true the tables are read the other way round, at the query's offset minus the key's (MViTv2's
decomposed relative positions, timm's ``get_rel_pos``, also SAM's): rel_h[a − y + kh − 1] (`mvit_index`), and the
module stores them as ``rel_pos_h`` / ``rel_pos_w`` (`MVIT_TENSORS`). Without a window q and k may then lie on maps
of different sizes (MViTv2's pooled queries and keys): ``rel_pos`` is the larger of the two on each axis (the tables
have 2·max − 1 rows, as timm builds them) and `mvit_index` scales the smaller map's coordinates up to it. The
``rel_prefix`` p with ``rel_query`` [qh, qw] and ``rel_key`` [kh, kw] (``rel_mvit``, no window or halo: MViTv2
with a class token, timm's ``cal_rel_pos_type``): q and k are tokens (C, p + qh·qw, 1) and (C, p + kh·kw, 1), the
first p (the class token, prepended) meeting every key and met by every query without relative logits, the rest
the qh × qw and kh × kw maps row by row, whose logits are as above (`prefixed_rel_logits`). The
logit depends on q, so it is no additive bias: the tables are what trains and the index (`rel_index`) follows from
the map alone, so nothing is stored for it. The tables belong to no channel (`ROWLESS_OPS`: methods keep them per task); q and k are pinned and
ordered already (an attention's heads are contiguous blocks), so their d columns never lose a channel. They start
as any (rows, d) tensor does (uniform within d^-½, `edgecl.train.models.init_params`; timm: normal, std d^-½).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgecl.errors import UsageError

REL_TENSORS = {"rel_h": "pos_embed.height_rel", "rel_w": "pos_embed.width_rel"}  # → the name in timm's module
MVIT_TENSORS = {"rel_h": "rel_pos_h", "rel_w": "rel_pos_w"}  # with ``rel_mvit``: timm's SAM and MViTv2 attentions'


def rel_fields(out: dict[str, Any], where: str) -> None:
    """``rel_pos`` and ``rel_dim`` go together; ``rel_scaled`` and ``rel_mvit`` qualify them; not with talking heads,
    fewer k/v heads, a bias table, a shifted or dilated window (no model combines them, and each would need its own
    layout of the logits); an unshifted window is the logits' extent (SAM)."""
    if (out["rel_pos"] is None) != (out["rel_dim"] is None) or \
            (out["rel_scaled"] or out["rel_mvit"]) and out["rel_pos"] is None:
        raise UsageError(f"{where}: attention rel_pos {out['rel_pos']}, rel_dim {out['rel_dim']}, rel_scaled "
                         f"{out['rel_scaled']} and rel_mvit {out['rel_mvit']}: relative position logits need rel_pos "
                         "and rel_dim together")
    prefix = [out["rel_prefix"], out["rel_query"], out["rel_key"]]
    if any(f is not None for f in prefix) and (None in prefix or not out["rel_mvit"] or out["window"] is not None or
                                               out["halo_blocks"] is not None):
        raise UsageError(f"{where}: attention rel_prefix {prefix[0]}, rel_query {prefix[1]} and rel_key {prefix[2]} "
                         "(prefix tokens without relative logits, MViTv2's class token) go together, with rel_mvit "
                         "and no window or halo")
    if out["rel_pos"] is not None and (out["shift"] not in (None, [0, 0]) or out["dilated"] or
                                       out["talking_heads"] or out["bias_offsets"] is not None or
                                       out["kv_heads"] not in (None, out["heads"]) or
                                       out["rel_mvit"] and out["halo_blocks"] is not None):
        raise UsageError(f"{where}: attention rel_pos goes with no shifted or dilated window, talking heads, bias "
                         "table or fewer k/v heads, and rel_mvit with no halo")


def check_rel_shape(node: dict[str, Any], q: list[int], k: list[int], where: str) -> None:
    """q's heads of ``rel_dim`` channels; q and k on the ``rel_pos`` map, or with a halo (`edgecl.arch.halo`) the
    haloed key window ``rel_pos``; with a ``window``, that window; with ``rel_mvit`` (no window) q and k maps of
    any sizes whose larger is ``rel_pos`` on each axis; with ``rel_prefix``, q and k tokens of the prefix then
    the ``rel_query`` and ``rel_key`` maps."""
    rel = node.get("rel_pos")
    if rel is None:
        return
    win = node["halo_blocks"][1] + 2 * node["halo"] if node.get("halo_blocks") else None
    if win:
        maps = list(rel) == [win, win]
    elif node.get("window"):
        maps = list(rel) == list(node["window"])
    elif node.get("rel_prefix"):  # MViTv2's class token before the maps of q and k
        (qh, qw), (kh, kw), p = node["rel_query"], node["rel_key"], node["rel_prefix"]
        maps = list(rel) == [max(qh, kh), max(qw, kw)] and q[1:] == [p + qh * qw, 1] and k[1:] == [p + kh * kw, 1]
    elif node.get("rel_mvit"):  # MViTv2's pooled q or k: the tables span the larger map
        maps = list(rel) == [max(q[1], k[1]), max(q[2], k[2])]
    else:
        maps = q[1:] == list(rel) and k[1:] == list(rel)
    if not maps or q[0] != node["heads"] * node["rel_dim"]:
        keys = f"a haloed window of {win} × {win}" if win else f"windows of {node['window']}" \
            if node.get("window") else f"q and k tokens: {node['rel_prefix']} prefix tokens, then maps " \
            f"{node['rel_query']} and {node['rel_key']} whose larger is {rel} on each axis" if node.get("rel_prefix") \
            else f"q and k maps whose larger is {rel} on each axis (rel_mvit)" if node.get("rel_mvit") \
            else f"q and k on a {rel} map"
        raise UsageError(f"{where}: attention rel_pos {rel} with rel_dim {node['rel_dim']} needs q of "
                         f"{node['heads']} heads × {node['rel_dim']} and {keys}, gets q {q} and k {k}")


def rel_tensor_shapes(node: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The row and column embeddings, (2·kh − 1, d) and (2·kw − 1, d)."""
    if node.get("rel_pos") is None:
        return {}
    (kh, kw), d = node["rel_pos"], node["rel_dim"]
    return {"rel_h": (2 * kh - 1, d), "rel_w": (2 * kw - 1, d)}


def rel_intermediates(node: dict[str, Any], tq: int) -> int:
    """Values the logits hold besides the scores: q per head by position, the two gathered (k, k, d) tables, the
    per-row and per-column logits and their sum over the scores (an upper bound)."""
    if node.get("rel_pos") is None:
        return 0
    (kh, kw), d, h = node["rel_pos"], node["rel_dim"], node["heads"]
    padded = h * tq * (tq + kh * kw) if node.get("rel_prefix") else 0  # the map's logits padded for the prefix
    return h * d * tq + (kh * kh + kw * kw) * d + h * tq * (kh + kw) + h * tq * kh * kw + padded


def rel_index(queries: int, keys: int, mvit: bool = False) -> np.ndarray:
    """(queries, keys) int64: row a, column y holds y − a + keys − 1, the table row query a reads for key y (the
    query's position in its map, block or window, the key's in its map or window); with `mvit` (``rel_mvit``),
    `mvit_index`."""
    if mvit:
        return mvit_index(queries, keys)
    return (np.arange(keys)[None, :] - np.arange(queries)[:, None] + keys - 1).astype(np.int64)


def mvit_index(queries: int, keys: int) -> np.ndarray:
    """(queries, keys) int64, as timm's ``get_rel_pos`` (MViTv2, SAM) computes it in float32 and truncates: row
    a, column y holds a·max(k/q, 1) − y·max(q/k, 1) + (k − 1)·max(q/k, 1), rows of a table of 2·max(q, k) − 1;
    for q = k, a − y + k − 1."""
    q_ratio, k_ratio = np.float32(max(keys / queries, 1.0)), np.float32(max(queries / keys, 1.0))
    coords = np.arange(queries, dtype=np.float32)[:, None] * q_ratio - np.arange(keys, dtype=np.float32)[None, :] * \
        k_ratio
    return (coords + np.float32((keys - 1) * max(queries / keys, 1.0))).astype(np.int64)


def rel_scale(node: dict[str, Any]) -> float:
    """What q is multiplied by before the logits: the attention's scale with ``rel_scaled``, else 1."""
    return float(node["scale"]) if node.get("rel_scaled") else 1.0
