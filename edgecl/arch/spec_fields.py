"""The kinds of value a spec node's fields hold (`edgecl.arch.ops.OPS` names a kind for each field): what each
accepts, and the typed error naming the field and what it must be otherwise. `edgecl.arch.spec` validates with these."""
from __future__ import annotations

import math
from typing import Any

from edgecl.arch.bias_parts import is_bias_parts
from edgecl.arch.mlp_bias import MLP_FORMS
from edgecl.arch.ops import MAX_NUMBER, MIN_EPS, PAD_MODES
from edgecl.arch.rotary_ops import is_number_table
from edgecl.errors import UsageError

MAX_DIM = 1 << 31
MAX_NDIM = 3


def shape_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_NDIM or not all(is_size(d) for d in value):
        raise UsageError(f"architecture {what} {value!r} must be 1-{MAX_NDIM} positive ints")
    return list(value)


def is_size(x: Any, lo: int = 1) -> bool:
    return type(x) is int and lo <= x <= MAX_DIM


def field_value(value: Any, kind: str, where: str) -> Any:
    if kind == "size" and is_size(value):
        return value
    if kind == "index" and is_size(value, 0):
        return value
    if kind in ("pair", "pad"):
        lo = 0 if kind == "pad" else 1
        pair = [value, value] if type(value) is int else value
        if isinstance(pair, list) and len(pair) == 2 and all(is_size(v, lo) for v in pair):
            return list(pair)
    if kind == "pads" and isinstance(value, list) and len(value) == 4 and \
            all(type(v) is int and abs(v) <= MAX_DIM for v in value):  # a negative side crops
        return list(value)
    if kind == "fill" and value == "-inf":
        return value
    if kind == "pad_mode" and value in PAD_MODES:
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "eps" and isinstance(value, (int, float)) and not isinstance(value, bool) and MIN_EPS <= value < 1:
        return float(value)
    if kind == "momentum" and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    if kind in ("number", "fill") and isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and abs(value) <= MAX_NUMBER:
        return float(value)
    if kind == "approximate" and value in ("none", "tanh") or kind == "upsample_mode" and value in ("nearest",
                                                                                                   "bilinear", "tile"):
        return value
    if kind == "shape" and isinstance(value, list):
        return shape_list(value, "reshape shape")
    if kind == "axis" and value == 1:
        return 1
    if kind == "order" and value in ("hw", "wh") or kind == "bias_table" and value in ("levit", "swin", "tf", "mlp") or \
            kind == "bias_mlp_form" and value in MLP_FORMS or \
            kind == "kernel" and value in ("relu", "softmax") or kind == "norm_over" and value in ("channels", "map"):
        return value
    if kind == "bias_parts" and is_bias_parts(value):
        return list(value)
    if kind == "number_table" and is_number_table(value):
        return [[float(v) for v in row] for row in value]
    if kind == "index_table" and isinstance(value, list) and value and \
            all(isinstance(row, list) and row and all(is_size(i, 0) for i in row) for row in value):
        return [list(row) for row in value]
    expect = {"size": f"an int from 1 to {MAX_DIM}", "pair": "an int ≥ 1 or two of them",
              "pad": "an int ≥ 0 or two of them",
              "pads": "four ints (top, left, bottom, right; a negative one crops)",
              "pad_mode": " or ".join(map(repr, PAD_MODES)),
              "fill": f"a finite number of magnitude at most {MAX_NUMBER:g}, or \"-inf\"",
              "index": f"an int from 0 to {MAX_DIM}", "bool": "true or false",
              "eps": f"a number in (0, 1), at least {MIN_EPS:.3g} (float32 rounds a smaller one to 0)",
              "momentum": "a number in (0, 1]", "approximate": "'none' or 'tanh'", "axis": "1 (channels)", "order": "'hw' or 'wh'",
              "bias_table": "'levit', 'swin', 'tf' or 'mlp'", "bias_mlp_form": " or ".join(map(repr, MLP_FORMS)), "kernel": "'relu' or 'softmax'",
              "norm_over": "'channels' or 'map'",
              "upsample_mode": "'nearest', 'bilinear' or 'tile'",
              "index_table": "a non-empty list of non-empty lists of ints ≥ 0",
              "bias_parts": "1-8 distinct tensor names (Python names) or nulls, at least one a name",
              "number_table": "a non-empty list of equally long lists of finite numbers (|v| ≤ 1e4)",
              "number": f"a finite number of magnitude at most {MAX_NUMBER:g}"}.get(kind, kind)
    shown = repr(value) if isinstance(value, str) else str(value)  # "1" is not 1
    raise UsageError(f"{where} = {shown[:60]} must be {expect}")
