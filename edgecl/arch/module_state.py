"""Where a traced module keeps each of a spec's trunk tensors: its state-dict key and the shape it stores there. The
link `from_torch`'s specs keep to the user's module, for starting weights (`edgecl.train.initial`) and for reading
the module's own values (`fx_import.tensors_of`); nothing else needs the module."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgecl.arch.bias_parts import split
from edgecl.arch.op_rules import has_gain, row_table, stored_rows, zero_rows
from edgecl.arch.spec import Arch, node_by_name, param_shapes, state_key
from edgecl.errors import UsageError


def state_keys(arch: Arch) -> dict[str, str]:
    """Trunk tensor name → the key of the same tensor in the traced module's state dict: the same name, except
    where `from_torch` had to name a node otherwise (a trunk layer called ``head``, a name taken) and kept the
    layer's path in the node's ``module`` field. A layer scale is a bare parameter: its key is its path."""
    nodes = node_by_name(arch)
    out = {}
    for name in param_shapes(arch):
        layer, _, tensor = name.rpartition(".")
        out[name] = state_key(nodes[layer], tensor)
    return out


def state_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Trunk tensor name → its shape as the traced module stores it (`param_shapes`, except a weight whose node has
    a ``module_shape``, a position embedding or several prepended tokens, stored ``(1, tokens, ch)``, Swin's
    attention bias table, stored ``(offsets, heads)``, TensorFlow MaxViT's, ``(heads, 2·wh − 1, 2·ww − 1)``,
    talking heads' mixes, stored as (heads, heads, 1, 1) convs (CaiT's Linears as they are), XCA's temperature and Swin V2's
    logit scale, (heads, 1, 1) (V2-CR's as it is), and a standardised conv's gain, ``(out, 1, 1, 1)``, and a lambda layer's position filters,
    ``(dim, 1, r, r, 1)``);
    `from_module` converts."""
    shapes = param_shapes(arch)
    for node in arch["nodes"]:
        if "module_shape" in node:
            shapes[f"{node['name']}.weight"] = tuple(node["module_shape"])
        if "module_shape" in node and node["op"] == "affine":  # ResMLP's alpha and beta, both (1, 1, C)
            shapes[f"{node['name']}.bias"] = tuple(node["module_shape"])
        if has_gain(node):  # timm's ScaledStdConv2d.gain
            shapes[f"{node['name']}.gain"] = (node["out"], 1, 1, 1)
        if _token_grid(node):
            shapes[f"{node['name']}.weight"] = (1, node["tokens"], node["ch"])
        if node["op"] == "pos_embed" and node.get("block"):  # NesT's, block by block: (1, blocks, positions, ch)
            shapes[f"{node['name']}.weight"] = (1, node["tokens"] // node["block"] ** 2, node["block"] ** 2,
                                                node["ch"])
        if _swin_table(node):
            shapes[f"{node['name']}.bias"] = (node["bias_offsets"], node["heads"])
        if node["op"] == "attention" and node.get("talking_heads") and not node.get("talking_linear"):  # 1×1 convs
            for mix in ("talk1_weight", "talk2_weight"):
                shapes[f"{node['name']}.{mix}"] = (node["heads"], node["heads"], 1, 1)
        if node["op"] == "lambda_layer" and node.get("r"):  # timm's Conv3d of kernel (r, r, 1)
            shapes[f"{node['name']}.weight"] = (*shapes[f"{node['name']}.weight"], 1)
        if node["op"] == "channel_attention" and node.get("scale") is None:  # timm's XCA temperature, (heads, 1, 1)
            shapes[f"{node['name']}.temperature"] = (node["heads"], 1, 1)
        if node["op"] == "attention" and node.get("bias_table") == "tf":  # (heads, offsets) with its 2-D offsets
            shapes[f"{node['name']}.bias"] = (node["heads"], *(2 * w - 1 for w in node["window"]))
        if node["op"] == "attention" and node.get("cosine"):  # Swin V2's logit scale, (heads, 1, 1); V2-CR's (heads,)
            shapes[f"{node['name']}.logit_scale"] = (node["heads"],) if node.get("bias_mlp_form") == "swin_v2_cr" \
                else (node["heads"], 1, 1)
        for tensor in ("bias", "weight"):  # its rows of a table of more heads, of a fused weight (`row_table`)
            if (table := row_table(node, tensor)) is not None:
                shapes[f"{node['name']}.{tensor}"] = tuple(table[1])
    return shapes


def from_module(arch: Arch, name: str, array: Any) -> np.ndarray:
    """A tensor as the module stores it (`state_shapes`) → the spec's shape: a reshape (the same values in the same
    order) except a position embedding or several prepended tokens (register tokens), whose tokens-by-channels
    storage is transposed to rows of channels (the tokens are a channels-first map in a spec: `edgecl.arch.ops`), and
    Swin's ``(offsets, heads)`` bias table, transposed to ``(heads, offsets)``."""
    node = node_by_name(arch)[name.rpartition(".")[0]]
    array = np.asarray(array)
    if node["op"] == "pos_embed" and node.get("block"):  # (block row, block col, row, col, ch) → (ch, row, col)
        g, s = _block_grid(node)
        return np.ascontiguousarray(array.reshape(g, g, s, s, node["ch"]).transpose(4, 0, 2, 1, 3)
                                    .reshape(node["ch"], node["tokens"]))
    if _token_grid(node) or node.get("channels_last"):  # (1, tokens, ch) or VOLO's (1, H, W, ch)
        return np.ascontiguousarray(array.reshape(node["tokens"], node["ch"]).T)
    if _swin_table(node) and name.endswith(".bias"):  # not Swin V2's logit scale
        return np.ascontiguousarray(array.reshape(node["bias_offsets"], node["heads"]).T)
    if (table := row_table(node, name.rpartition(".")[2])) is not None:
        rows, stored = table
        return np.ascontiguousarray(array.reshape(stored[0], -1)[rows.start:rows.stop]) \
            .reshape(param_shapes(arch)[name])
    return array.reshape(param_shapes(arch)[name])


def to_module_state(arch: Arch, values: dict[str, Any]) -> dict[str, np.ndarray]:
    """Spec tensors (by name) as the module's state dict holds them (by key, `to_module`); the nodes that are rows of
    one tensor (`op_rules.stored_rows`) fill it together (`spec.validate` has them hold each of its rows once), and a
    tensor some of whose rows are not in `values` is left out (missing, as it is: no row is made up, but a fused
    bias's rows of a bias-less part, `op_rules.zero_rows`, are the zeros the module is given); a bias the
    module stores in parts is its parts (`bias_parts.split`). A tensor the module computes rather than holds is
    refused by name (`_check_held`)."""
    keys, nodes, stored, out, given = state_keys(arch), node_by_name(arch), state_shapes(arch), {}, {}
    _check_held(arch, values)
    for name, array in values.items():
        layer, _, tensor = name.rpartition(".")
        if (rows := stored_rows(nodes[layer], tensor)) is None:
            out[keys[name]] = to_module(arch, name, array)
            continue
        table = out.setdefault(keys[name], np.zeros(stored[name], dtype=np.float32))
        table[rows.start:rows.stop] = np.asarray(array).reshape(len(rows), *table.shape[1:])
        given[keys[name]] = given.get(keys[name], 0) + len(rows)
    for key, parts in zero_rows(arch["nodes"], state_key).items():  # a fused bias's fixed zeros: the table's
        given[key] = given.get(key, 0) + sum(node["out"] for _, node in parts)
    whole = {key: v for key, v in out.items() if key not in given or given[key] == len(v)}  # () tensors have no len
    return split(arch, whole, keys)


def _check_held(arch: Arch, values: dict[str, Any]) -> None:
    """A cosine attention's table (``bias_table`` "swin": specs `from_torch` made of timm's Swin V2 before its MLP
    went in whole, `edgecl.arch.mlp_bias`) is what the module's position-bias MLP computes, and its qkv bias
    cat(q_bias, k_bias, v_bias) with k_bias a fixed zero: no module tensor holds either, so neither goes back."""
    for node in arch["nodes"]:
        name = f"{node['name']}.bias"
        if node["op"] == "attention" and node.get("cosine") and node.get("bias_table") == "swin" and name in values:
            raise UsageError(f"tensor {name!r}: a Swin V2 position-bias table, which its module computes with an MLP "
                             "and cannot hold; re-import the module with this edgecl's from_torch (its MLP goes in "
                             "whole, to train and write back) and train that spec")


def to_module(arch: Arch, name: str, array: Any) -> np.ndarray:
    """The inverse of `from_module`: a spec tensor in the shape the module stores it."""
    node = node_by_name(arch)[name.rpartition(".")[0]]
    array = np.asarray(array)
    if stored_rows(node, name.rpartition(".")[2]) is not None:
        raise ValueError(f"{name} is rows of its module's tensor: `to_module_state` puts them together")
    if node["op"] == "pos_embed" and node.get("block"):  # the inverse of `from_module`'s reordering
        g, s = _block_grid(node)
        return np.ascontiguousarray(array.reshape(node["ch"], g, s, g, s).transpose(1, 3, 2, 4, 0)) \
            .reshape(1, g * g, s * s, node["ch"])
    if _token_grid(node) or node.get("channels_last"):
        return np.ascontiguousarray(array.T).reshape(state_shapes(arch)[name])
    if _swin_table(node) and name.endswith(".bias"):
        return np.ascontiguousarray(array.T)
    return array.reshape(state_shapes(arch)[name])


def _block_grid(node: dict[str, Any]) -> tuple[int, int]:
    """A block-stored position embedding's blocks per side and block side: NesT's square map of square blocks (its
    ``blockify``: blocks row by row, each block's positions row by row), so the spec's map order is a transpose."""
    s = node["block"]
    return math.isqrt(node["tokens"]) // s, s


def _swin_table(node: dict[str, Any]) -> bool:
    """An attention bias table Swin stores offsets by heads, ``(B, heads)`` (its relative_position_bias_table)."""
    return node["op"] == "attention" and node.get("bias_table") == "swin"


def _token_grid(node: dict[str, Any]) -> bool:
    """A node whose weight the module stores tokens by channels, ``(1, tokens, ch)``: a position embedding, or
    several tokens put before the others (one token's ``(ch,)`` reads the same either way); not a feature map's
    position embedding, which its module stores channels-first (``module_shape`` (1, ch, H, W))."""
    if "module_shape" in node or node.get("block"):  # a feature map's position embedding: (1, ch, H, W), the
        return False  # spec's rows reshaped, or NesT's block by block (`_block_grid`)
    return node["op"] == "pos_embed" or node["op"] == "class_token" and node["tokens"] > 1
