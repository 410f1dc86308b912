"""Architecture specs as graphs: one JSON-able description of a trunk that torch training, the ONNX builder, the
runtime and compaction all build from, so none of them can disagree about shapes or tensor names.

A spec (normal form, what `validate` returns)::

    {"name": "resnet18", "input_shape": [3, 32, 32], "output": "flatten", "feature_dim": 512,
     "nodes": [{"name": "conv1", "op": "conv", "inputs": ["input"], "in": 3, "out": 64, "k": [7, 7],
                "stride": [2, 2], "pad": [3, 3], "dilation": [1, 1], "groups": 1, "bias": false}, ...]}

Nodes are in topological order; each reads the named outputs of earlier nodes (``"input"`` is the network input) and
its ``name`` is unique. Shapes leave out the batch axis. Ops, their fields and what each computes: `edgecl.arch.ops`.

Every task's head (``head.weight`` classes × feature_dim, ``head.bias``) reads the ``output`` node, which must be a
flat feature vector. Prunable layers are the trunk's conv and linear weights; their GEMM view is
``(out, in/groups·kh·kw)``.

Specs written as a plain list of layers (``{"layers": [...]}``, the format of edgecl ≤ 0.1 artifacts, with the
``block`` op for a ResNet basic block) are converted to this form by `validate`, keeping every tensor name.
Validation is strict and bounded (types, ranges, `MAX_NODES`, `MAX_EDGES`, `MAX_ACTIVATION`): specs come from files,
and this is the one function that both checks a spec and says what the graph computes.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Any

from edgecl.arch.bias_parts import check_null_parts, check_part_keys
from edgecl.arch.conv_transpose import conv_transpose_tensor_shapes
from edgecl.arch.later_fields import drop_defaults
from edgecl.arch.legacy import layers_to_nodes
from edgecl.arch.limits import MAX_ACTIVATION
from edgecl.arch.op_rules import (FIELD_RULES, attention_state_name, attention_tensor_shapes, check_minus_inf_pads,
                                   check_table_rows, has_gain, is_standardized,
                                   stored_rows)
from edgecl.arch.op_shapes import output_shape
from edgecl.arch.ops import NORMALISING_OPS, OPS, ROWLESS_OPS, TENSOR_OPS, TOKEN_TENSOR_OPS, WEIGHT_OPS
from edgecl.arch.rotary_ops import resolve_tables
from edgecl.arch.spec_fields import MAX_DIM, field_value, is_size, shape_list
from edgecl.errors import UsageError

Arch = dict[str, Any]
INPUT = "input"
MAX_NODES = 10_000  # ~20× a ResNet-152; bounds the work a spec read from a file can cause
MAX_INPUTS = 256
MAX_EDGES = 2 * MAX_NODES  # inputs of all nodes: 10,000 adds of 256 inputs (an 18 MB file) took 2 min, 8.7 GB to run
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,159}")

# op → (fewest, most) inputs; every other op reads one
_ARITY = {"add": (2, MAX_INPUTS), "cat": (2, MAX_INPUTS), "mul": (2, 2), "attention_pool": (2, 2), "attention": (3, 3),
          "linear_attention": (3, 3), "channel_attention": (3, 3), "lambda_layer": (3, 3),
          "outlook_attention": (2, 2)}


def validate(arch: Any) -> Arch:
    """Check a spec (graph or legacy layer list) and fill defaults; returns a normalised deep copy. Raises
    UsageError naming the node and field that is wrong."""
    if not isinstance(arch, dict) or "input_shape" not in arch or not ("nodes" in arch or "layers" in arch):
        raise UsageError("architecture spec must be a JSON object with 'input_shape' and 'nodes' (or 'layers')")
    if "nodes" not in arch:
        arch = {**arch, "nodes": layers_to_nodes(arch["layers"])}
    shape = shape_list(arch["input_shape"], "input_shape")
    nodes = arch["nodes"]
    if not isinstance(nodes, list) or not nodes or len(nodes) > MAX_NODES:
        raise UsageError(f"architecture nodes must be a non-empty list of at most {MAX_NODES} objects")
    nodes = resolve_tables(nodes)  # a rotary table a file stores once (`rotary_ops.share_tables`)
    name = arch.get("name", "custom")
    if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable():
        raise UsageError(f"architecture name {name!r} must be 1-128 printable characters")
    edges = sum(len(n["inputs"]) for n in nodes if isinstance(n, dict) and isinstance(n.get("inputs"), list))
    if edges > MAX_EDGES:
        raise UsageError(f"architecture has {edges} node inputs in all, more than {MAX_EDGES}")
    shapes: dict[str, list[int]] = {INPUT: shape}
    out_nodes = [_node(node, i, shapes) for i, node in enumerate(nodes)]
    output = arch.get("output", out_nodes[-1]["name"])
    if not isinstance(output, str) or output not in shapes or output == INPUT:
        raise UsageError(f"architecture output {output!r} is not a node")
    if len(shapes[output]) != 1:
        raise UsageError(f"architecture output {output!r} must be a flat feature vector, has shape {shapes[output]} "
                         "(end the trunk with a flatten)")
    check_minus_inf_pads(out_nodes, shapes)
    check_null_parts(out_nodes)
    result = {"name": name, "input_shape": shape, "nodes": out_nodes, "output": output,
              "feature_dim": shapes[output][0]}
    _check_state_keys(result)
    return result


def state_key(node: dict[str, Any], tensor: str) -> str:
    """The state-dict key of a node's tensor in the traced module (`edgecl.arch.module_state`): the node's name or
    its ``module`` path, then the tensor; a layer scale, a class token and a position embedding are bare parameters,
    whose key is that path itself (a scalar affine's without bias too: NFNet's ``skipinit_gain``), a scalar
    affine's weight is otherwise its module's ``scale`` (timm's LearnableAffineBlock)
    and a per-channel affine's weight and bias its module's ``alpha`` and ``beta`` (ResMLP's Affine),
    and an attention's bias table its module's ``attention_biases`` (timm's LeViT) or, ``bias_table`` "swin" or
    "tf", its ``relative_position_bias_table`` (talking heads: `op_rules.attention_state_name`).
    A ``module`` ending in ``*`` has the tensor's name in place of the ``*``: torch's packed parameters
    (``nn.MultiheadAttention``'s ``in_proj_weight`` / ``in_proj_bias``, module ``….in_proj_*``); a path that merely
    ends in ``_`` (``self.conv_``) is an ordinary one. A ``module`` ending in ``=`` is the key itself, less the
    ``=``: a bare parameter a layer of one tensor uses as its weight (SwiftFormer's ``w_g``, a bias-less 1×1 conv)."""
    path = node.get("module", node["name"])
    if path.endswith("="):
        return path[:-1]
    if tensor == "bias" and node.get("bias_parts"):  # stored in parts (`bias_parts.gather`): the node's own name
        return f"{node['name']}.bias"
    if node["op"] in ("layer_scale", *TOKEN_TENSOR_OPS) or node["op"] == "scalar_affine" and "bias" in node:
        return path
    tensor = "scale" if node["op"] == "scalar_affine" and tensor == "weight" else \
        attention_state_name(node, tensor) if node["op"] == "attention" else \
        {"weight": "alpha", "bias": "beta"}[tensor] if node["op"] == "affine" else tensor
    return f"{path[:-1]}{tensor}" if path.endswith("*") else f"{path}.{tensor}"


def _check_state_keys(arch: Arch) -> None:
    """Two tensors read from one state-dict key would be one weight in the module and two in training (unless each
    is its own rows of it: `op_rules.stored_rows`)."""
    nodes, seen, tables = node_by_name(arch), {}, {}
    for name in param_shapes(arch):
        layer, _, tensor = name.rpartition(".")
        key, rows = state_key(nodes[layer], tensor), stored_rows(nodes[layer], tensor)
        for other, taken in seen.get(key, []):
            if rows is None or taken is None:
                raise UsageError(f"architecture tensors {other!r} and {name!r} both name the module's {key!r} (a "
                                 "node's 'module' field, or its bias_rows / weight_rows): one weight cannot be two")
        seen.setdefault(key, []).append((name, rows))
        if rows is not None:
            tables.setdefault(key, []).append((name, nodes[layer]))
    check_table_rows(tables)
    check_part_keys(arch, set(seen))


def _node(node: Any, i: int, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """One node, normalised, with its output shape recorded in `shapes`."""
    if not isinstance(node, dict):
        raise UsageError(f"architecture node {i}: not an object")
    op, name = node.get("op"), node.get("name")
    where = f"architecture node {i} ({name if isinstance(name, str) else op!s:.60})"
    if op not in OPS:
        raise UsageError(f"{where}: unknown op {str(op)[:60]!r} (known: {', '.join(OPS)})")
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name or name == INPUT \
            or name.startswith("head"):
        raise UsageError(f"{where}: name {str(name)[:60]!r} is not allowed (letters, digits, _ . : -; ≤ 160 chars; "
                         f"not 'input' or 'head…')")
    if name in shapes:
        raise UsageError(f"{where}: duplicate name {name!r}")
    fields = OPS[op]
    unknown = set(node) - set(fields) - {"op", "name", "inputs"} - \
        ({"module", "module_shape"} if op in TENSOR_OPS else set())
    if unknown:
        raise UsageError(f"{where}: unknown fields {sorted(unknown)[:5]} for op {op!r}")
    out = {"name": name, "op": op, "inputs": _inputs(node.get("inputs"), op, where, shapes)}
    for key, (kind, default) in fields.items():
        if key not in node:
            if default is ...:
                raise UsageError(f"{where}: missing field {key!r}")
            value = copy.copy(default)
        else:
            value = field_value(node[key], kind, f"{where}: {key}")
        out[key] = value
    if op in ("maxpool", "avgpool") and out["stride"] is None:
        out["stride"] = list(out["k"])
    if op == "attention" and out["kv_heads"] is None:
        out["kv_heads"] = out["heads"]
    if op in FIELD_RULES:  # attention, conv (weight standardisation), scalar_affine (bias), layer_norm (groups)
        FIELD_RULES[op](out, where)
    if op == "upsample" and out["align_corners"] and out["mode"] != "bilinear":
        raise UsageError(f"{where}: upsample align_corners needs mode 'bilinear', gets {out['mode']!r}")
    drop_defaults(out)  # the later fields at their default: the spec as before they existed
    if "module" in node:  # the layer's path in the user's module where the node name had to differ (`module_state`)
        if not isinstance(node["module"], str) or not 0 < len(node["module"]) <= 512 or \
                not node["module"].isprintable():
            raise UsageError(f"{where}: module {str(node['module'])[:60]!r} must be a module path")
        if node["module"].endswith("=") and (len(node["module"]) == 1 or len(node_tensor_shapes(out)) != 1):
            raise UsageError(f"{where}: module {node['module'][:60]!r} names one bare parameter (a key ending in "
                             f"'='): it needs a path and a node of one tensor, has {sorted(node_tensor_shapes(out))}")
        out["module"] = node["module"]
    if "module_shape" in node:
        out["module_shape"] = _module_shape(node["module_shape"], out, where)
    elif out.get("channels_last") or out.get("tile") or out.get("resize"):  # how a module stores the weight
        raise UsageError(f"{where}: pos_embed channels_last, tile or resize needs a module_shape (1, H, W, ch) or "
                         "(1, ch, wh, ww)")
    shapes[name] = output_shape(out, [shapes[s] for s in out["inputs"]], where)
    if math.prod(shapes[name]) > MAX_ACTIVATION or max(shapes[name]) > MAX_DIM:
        raise UsageError(f"{where}: output {shapes[name]} has more than {MAX_ACTIVATION} elements per sample")
    if op == "attention" and (scores := out["heads"] * math.prod(shapes[out["inputs"][0]][1:]) *
                              math.prod(out.get("window") or shapes[out["inputs"][1]][1:])) > MAX_ACTIVATION:
        raise UsageError(f"{where}: attention over {shapes[out['inputs'][0]][1:]} query and "
                         f"{out.get('window') or shapes[out['inputs'][1]][1:]} key positions with {out['heads']} "
                         f"heads computes {scores} scores per sample, more than {MAX_ACTIVATION}")
    return out


def _module_shape(value: Any, node: dict[str, Any], where: str) -> list[int]:
    """A weight's shape as the traced module stores it: the spec's shape with axes of 1 added or removed, so the
    values are the same in the same order (a Linear over channels as a 1×1 conv, a γ of shape (C, 1, 1))."""
    # a LayerNorm's pair (and a GRN's) is stored as (C,) by torch: nothing to reshape
    # a Conv1d stores a channel_conv's (k,) as (1, 1, k), timm a class token's (C,) as (1, 1, C); several tokens
    # are stored transposed, (1, tokens, C), as a position embedding (`module_state`)
    if node["op"] == "pos_embed":  # a feature map's embedding, stored channels-first (1, ch, H, W): H·W positions;
        # channels_last (VOLO's): (1, H, W, ch)
        last = bool(node.get("channels_last"))
        listed = value if isinstance(value, list) else []  # a hostile file's number or dict: refused below
        ch, hw = (listed[3:], listed[1:3]) if last else (listed[1:2], listed[2:])
        if not isinstance(value, list) or len(value) != 4 or not all(is_size(d) for d in value) or value[0] != 1 or \
                ch != [node["ch"]] or math.prod(hw) != node["tokens"] or node.get("block"):
            form = f"(1, H, W, {node['ch']})" if last else f"(1, {node['ch']}, H, W)"
            raise UsageError(f"{where}: module_shape {str(value)[:60]} of a position embedding must be {form} with "
                             f"H·W = {node['tokens']} positions, and without a block")
        return list(value)
    with_shape = (*WEIGHT_OPS, "layer_scale", "affine", "channel_conv", "class_token", "scalar_affine")  # () skipinit
    one = node["op"] != "class_token" or node["tokens"] == 1
    weight = list(node_tensor_shapes(node)["weight"]) if node["op"] in with_shape and one else None
    if weight is None:
        raise UsageError(f"{where}: module_shape is for conv, linear, layer_scale, affine, channel_conv, "
                         f"scalar_affine, pos_embed and one class_token's weights, not {node['op']}"
                         f"{'' if one else ' of several tokens'}")
    if not isinstance(value, list) or not 0 < len(value) + (node["op"] == "scalar_affine") <= 4 or \
            not all(is_size(d) for d in value) or [d for d in value if d != 1] != [d for d in weight if d != 1]:
        raise UsageError(f"{where}: module_shape {str(value)[:60]} must be the weight's shape {weight} with axes of "
                         "1 added or removed")
    return list(value)


def _inputs(value: Any, op: str, where: str, shapes: dict[str, list[int]]) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_INPUTS:
        raise UsageError(f"{where}: inputs must be a non-empty list of node names")
    for s in value:
        if not isinstance(s, str) or s not in shapes:
            raise UsageError(f"{where}: input {str(s)[:60]!r} is not an earlier node (nodes are in topological order)")
    fewest, most = _ARITY.get(op, (1, 1))
    if not fewest <= len(value) <= most:
        want = f"{fewest} or more" if most == MAX_INPUTS else f"{fewest}"
        raise UsageError(f"{where}: {op} takes {want} inputs, got {len(value)}")
    return list(value)


def node_shapes(arch: Arch) -> dict[str, list[int]]:
    """Output shape of every node of a validated spec (and of ``"input"``), without the batch axis."""
    shapes = {INPUT: list(arch["input_shape"])}
    for node in arch["nodes"]:
        shapes[node["name"]] = output_shape(node, [shapes[s] for s in node["inputs"]], node["name"])
    return shapes


def param_shapes(arch: Arch, n_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every trunk tensor (BatchNorm running statistics included) with its shape, in node order; the head too when
    `n_classes` is given."""
    shapes: dict[str, tuple[int, ...]] = {}
    for node in arch["nodes"]:
        shapes.update({f"{node['name']}.{k}": shape for k, shape in node_tensor_shapes(node).items()})
    if n_classes is not None:
        shapes["head.weight"] = (n_classes, arch["feature_dim"])
        shapes["head.bias"] = (n_classes,)
    return shapes


BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def node_tensor_shapes(node: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """One node's tensors (``weight``, ``bias``, BatchNorm's statistics) with their shapes; none for ops without."""
    op = node["op"]
    if op in WEIGHT_OPS:
        weight = (node["out"], node["in"] // node["groups"], *node["k"]) if op == "conv" else (node["out"], node["in"])
        return {"weight": weight, **({"bias": (node["out"],)} if node["bias"] else {}),
                **({"gain": (node["out"],)} if has_gain(node) else {})}
    if op == "bn":
        return {k: (node["ch"],) for k in BN_TENSORS}
    if op == "channel_conv":
        return {"weight": (node["k"],)}
    if op == "conv_transpose":  # (in, out/groups, kh, kw), as torch stores it
        return conv_transpose_tensor_shapes(node)
    if op == "token_mix":  # rows and columns are token positions, not channels
        return {"weight": (node["out"], node["in"]), **({"bias": (node["out"],)} if node["bias"] else {})}
    if op == "scalar_affine":
        return {"weight": (1,), **({"bias": (1,)} if node.get("bias", True) else {})}
    if op in ("attention", "channel_attention", "lambda_layer"):  # LeViT's per-head table of relative offsets, the
        return attention_tensor_shapes(node)  # talking heads' mixes, XCA's temperature, a lambda layer's filters
    if op in TOKEN_TENSOR_OPS:
        return {"weight": (node["ch"],) if op == "class_token" and node["tokens"] == 1 else (node["ch"], node["tokens"])}
    if op == "affine":  # ResMLP's per-channel factor and offset
        return {"weight": (node["ch"],), "bias": (node["ch"],)}
    if op in NORMALISING_OPS and node.get("affine", True) or op == "layer_scale":  # a bias-less LayerNorm's weight
        return {k: (node["ch"],) for k in ("weight", "bias")[:1 + (op != "layer_scale" and node.get("bias", True))]}
    return {}


def dense_params(arch: Arch, n_classes: int | None = None) -> int:
    """Numbers in one dense model of this spec: every trunk tensor (BatchNorm statistics included), plus a head of
    `n_classes` when given. The one place dense sizes are counted (audit, inspect, methods' reports, sessions)."""
    return sum(math.prod(s) for s in param_shapes(arch, n_classes).values())


def rowless_tensors(arch: Arch) -> list[str]:
    """The tensors that belong to no channel, in node order: every ``channel_conv``'s k weights (ECA), every
    ``scalar_affine``'s weight and bias, every attention's bias table (LeViT), every ``channel_attention``'s
    per-head temperature (EdgeNeXt) and every ``lambda_layer``'s position filters and bias. No per-channel rule
    (pruning, node masks, BatchNorm's) covers them; methods that share a trunk keep them per task."""
    return [f"{n['name']}.{k}" for n in arch["nodes"] if n["op"] in ROWLESS_OPS for k in node_tensor_shapes(n)]


def standardized_tensors(arch: Arch) -> list[str]:
    """Every tensor of the weight-standardised convs (weight, bias, gain), in node order: their output is not linear
    in the weight (each filter is standardised first), so a method whose rule assumes it (RGO's input-side
    projection) keeps them per task instead."""
    return [f"{n['name']}.{k}" for n in arch["nodes"] if is_standardized(n)
            for k in node_tensor_shapes(n)]


def token_tensors(arch: Arch) -> list[str]:
    """The learned class tokens and position embeddings (ViTs), in node order: one row per channel like a bias, and
    kept as a method keeps biases (RGO has no projection for them: per task). Frozen ones are not learned: not here."""
    frozen = frozen_tensors(arch)
    return [f"{n['name']}.weight" for n in arch["nodes"] if n["op"] in TOKEN_TENSOR_OPS and
            f"{n['name']}.weight" not in frozen]


def frozen_tensors(arch: Arch) -> list[str]:
    """Constants of the trunk (a frozen position embedding: MAE's fixed sin-cos), in node order: the training
    forward detaches them, so no gradient reaches them in any method, and every method stores them once, shared by
    all tasks, at their starting values."""
    return [f"{n['name']}.weight" for n in arch["nodes"] if n["op"] == "pos_embed" and n["frozen"]]


def prunable(arch: Arch) -> list[str]:
    """Names of the trunk's conv and linear weight tensors, in node order."""
    return [f"{n['name']}.weight" for n in arch["nodes"] if n["op"] in WEIGHT_OPS]


def gemm_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(P, Q) GEMM view of a linear or conv weight: rows are output units, columns are inputs × kernel positions."""
    return shape[0], math.prod(shape[1:])


def node_by_name(arch: Arch) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in arch["nodes"]}


def consumers(arch: Arch) -> dict[str, list[str]]:
    """Node name (or "input") → the nodes that read its output, in node order."""
    out: dict[str, list[str]] = {INPUT: [], **{n["name"]: [] for n in arch["nodes"]}}
    for node in arch["nodes"]:
        for s in node["inputs"]:
            out[s].append(node["name"])
    return out


def is_sequential(arch: Arch) -> bool:
    """True when every node reads the one before it and keeps its channels whole and in order (a chain: no residual
    adds, gates, concatenation, slices, shuffles or softmaxes across branches)."""
    previous = INPUT
    for node in arch["nodes"]:
        if node["inputs"] != [previous] or node["op"] in ("slice", "shuffle", "branch_softmax"):
            return False
        previous = node["name"]
    return previous == arch["output"]


def is_depthwise(node: dict[str, Any]) -> bool:
    """A convolution whose every output channel reads exactly the input channel of the same index."""
    return node["op"] == "conv" and node["groups"] == node["in"] == node["out"] and node["groups"] > 1


def shapes_after(arch: Arch) -> list[list[int]]:
    """Activation shape after each node (without batch), for memory estimates."""
    shapes = node_shapes(arch)
    return [shapes[n["name"]] for n in arch["nodes"]]


def unit_sources(arch: Arch) -> dict[str, tuple[str | None, int]]:
    """For each linear/conv layer of a chain (`is_sequential`): (layer whose output units feed its inputs, input
    columns per source unit) — the repeat is H·W where a flatten sits between a conv and a linear; None means the
    network input. The general form for any graph is `channel_map`."""
    if not is_sequential(arch):
        raise UsageError(f"architecture {arch.get('name')!r} is not a chain; use edgecl.arch.channel_map")
    out: dict[str, tuple[str | None, int]] = {}
    src, repeat = None, 1
    shapes = node_shapes(arch)
    previous = INPUT
    for node in arch["nodes"]:
        if node["op"] == "flatten" and len(shapes[previous]) == 3:
            repeat *= shapes[previous][1] * shapes[previous][2]
        if node["op"] in WEIGHT_OPS:
            out[node["name"]] = (src, repeat)
            src, repeat = node["name"], 1
        previous = node["name"]
    return out


def last_layer(arch: Arch) -> str:
    """The conv/linear layer whose output units feed the heads (on a chain)."""
    return prunable(arch)[-1].rsplit(".", 1)[0]
