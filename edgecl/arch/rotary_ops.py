"""The ``rotary`` op (a rotary position embedding, RoPE: EVA-02's and the RoPE ViTs' q and k), its output shape and
work bound (`edgecl.arch.op_shapes` asks here), and the fixed tables both the torch form (`edgecl.train.models`) and the
ONNX form (`edgecl.graph.builder`) read, so that the two are the same numbers.

``rotary`` (input a ``(C, T, 1)`` token map, C = ``heads`` · d, d even): per head, each token's d channels rotated
by fixed angles of its position — output channel j of a head at token t is x_j·cos[t, j] + s_j·x_p(j)·sin[t, j],
with timm's pairing: interleaved (``half`` false) p(2i) = 2i + 1, s = −1 and p(2i + 1) = 2i, s = +1; or ``half``
true, p(j) = j + d/2, s = −1 for j < d/2 and p(j) = j − d/2, s = +1 after. ``table`` holds timm's ``emb``: one row
per token after the first ``prefix`` (the class token, which is left as it is), d sines then d cosines, the same for
every head. No tensors: the table is part of the architecture, like an attention's bias index (timm computes it from
the grid, never learns it); a file stores it once, the other rotary nodes of the same table naming that node
(``table_from``: `share_tables`, `resolve_tables`). Its output channel j reads input channels j and p(j), so its
input's channels are pinned and kept in order (`edgecl.arch.channels`), and a channel constant over the tokens does
not stay constant.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgecl.errors import UsageError

MAX_TABLE_NUMBER = 1.0e4  # timm's entries are sines and cosines: |v| ≤ 1


def is_number_table(value: Any) -> bool:
    """A non-empty list of equally long non-empty lists of finite numbers, each of magnitude at most
    `MAX_TABLE_NUMBER` (a rotary ``table``)."""
    return isinstance(value, list) and bool(value) and all(isinstance(row, list) and row for row in value) and \
        len({len(row) for row in value}) == 1 and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and
            abs(v) <= MAX_TABLE_NUMBER for row in value for v in row)


def rotary_shape(node: dict[str, Any], x: list[int], where: str) -> list[int]:
    """The input's shape, checked: a (C, T, 1) token map of ``heads`` heads of an even d, a table of T − prefix rows
    of 2·d numbers."""
    heads, prefix, table = node["heads"], node["prefix"], node["table"]
    d = x[0] // heads if len(x) == 3 and x[0] % heads == 0 else 0
    if len(x) != 3 or x[2] != 1 or d % 2 or not d or len(table) != x[1] - prefix or len(table[0]) != 2 * d:
        raise UsageError(f"{where}: rotary needs a (channels, tokens, 1) map of {heads} heads of an even size and a "
                         f"table of tokens − {prefix} rows of 2·head size numbers, gets {x} and a table of "
                         f"{len(table)} × {len(table[0])}")
    return list(x)


def rotary_constants(node: dict[str, Any], shape: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cos, signed sin, partner): float32 ``(C, T, 1)`` factors and the int64 ``(C,)`` channel each output channel's
    second term reads, so that output = x·cos + x[partner]·sin (the prefix tokens: cos 1, sin 0)."""
    c, t, _ = shape
    heads, prefix, half = node["heads"], node["prefix"], node.get("half", False)
    d = c // heads
    table = np.asarray(node["table"], dtype=np.float32)  # (T − prefix, 2d): sines, then cosines
    j = np.arange(d)
    if half:
        partner, sign = np.where(j < d // 2, j + d // 2, j - d // 2), np.where(j < d // 2, -1.0, 1.0)
    else:
        partner, sign = j ^ 1, np.where(j % 2 == 0, -1.0, 1.0)
    cos = np.ones((d, t), np.float32)
    sin = np.zeros((d, t), np.float32)
    cos[:, prefix:] = table[:, d:].T
    sin[:, prefix:] = (table[:, :d] * sign.astype(np.float32)).T
    partners = (np.arange(heads)[:, None] * d + partner[None, :]).reshape(-1).astype(np.int64)
    return np.tile(cos, (heads, 1))[:, :, None], np.tile(sin, (heads, 1))[:, :, None], partners


def resolve_tables(nodes: list[Any]) -> list[Any]:
    """A file's rotary nodes as `spec.validate` reads them: one whose ``table_from`` names an earlier rotary node
    with a table of its own has that table (`share_tables` wrote the name in its place)."""
    tables: dict[str, Any] = {}
    out = []
    for node in nodes:
        if isinstance(node, dict) and node.get("op") == "rotary" and "table_from" in node:
            source = node["table_from"]
            if "table" in node or not isinstance(source, str) or source not in tables:
                raise UsageError(f"architecture node {node.get('name')!r}: rotary table_from {str(source)[:60]!r} "
                                 "must name an earlier rotary node with a table of its own (and no table beside it)")
            node = {**{k: v for k, v in node.items() if k != "table_from"}, "table": tables[source]}
        elif isinstance(node, dict) and node.get("op") == "rotary" and isinstance(node.get("name"), str):
            tables[node["name"]] = node.get("table")
        out.append(node)
    return out


def share_tables(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored form of validated nodes: a rotary node whose table equals an earlier one's names that node
    (``table_from``) instead of repeating it — every block of a RoPE ViT rotates by the same table, which written out
    each time would make a 224-pixel model's header tens of MB (`resolve_tables` reads it back)."""
    first: list[tuple[str, Any]] = []
    out = []
    for node in nodes:
        if node["op"] == "rotary":
            source = next((name for name, table in first if table == node["table"]), None)
            if source is None:
                first.append((node["name"], node["table"]))
            else:
                node = {**{k: v for k, v in node.items() if k != "table"}, "table_from": source}
        out.append(node)
    return out


def rotary_intermediates(x: list[int]) -> int:
    """The partners' copy and the two products before their sum."""
    return 3 * math.prod(x)
