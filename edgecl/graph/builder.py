"""Build an ONNX graph from an architecture spec (numpy + onnx only, no torch).

Two forms from one builder:
- folded: a task's materialised tensors become initializers (one self-contained model per task);
- switchable: every tensor is a graph input, so one ONNX Runtime session serves all tasks and a task switch only
  rebinds buffers (initializers cannot be replaced in a live session). ONNX Runtime pre-packs only constant weights;
  a weight that arrives as an input is re-packed by MLAS on every call when it is GEMM's right operand (1.1–1.5×
  slower, tools/bench_switch.py). So linear layers here compute ``W @ hᵀ`` with the weight as the *left* operand,
  which MLAS reads in place, and only the (small) activations get packed; activations stay transposed through
  consecutive linear layers and are transposed back before any other layer and at the output.
The node sequence mirrors `edgecl.train.models.forward` op for op, so exported and trained models agree.
A compacted spec (`edgecl.graph.compact`) may carry ``input_select`` and ``input_select_from``: the graph then takes
inputs of the dense shape ``input_select_from`` and gathers the channels (or, when the spec's ``input_shape`` is
flat and the dense one is not, the flattened features) its trunk still reads, so a compacted graph takes the same
input as the dense one.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecl.arch.op_rules import is_standardized
from edgecl.arch.spec import INPUT as SPEC_INPUT
from edgecl.arch.spec import Arch, node_shapes, param_shapes
from edgecl.graph.conv_transpose_onnx import conv_transpose
from edgecl.graph.lambda_onnx import lambda_layer
from edgecl.graph.outlook_onnx import outlook_attention
from edgecl.graph.linear_ops import linear_attention, map_norm, patch_context, rms_norm
from edgecl.graph.nodes import Builder as _Builder
from edgecl.graph.onnx_spatial import SPATIAL_OPS, spatial_op
from edgecl.graph.plain_onnx import PLAIN_OPS, plain_op
from edgecl.graph.sdta_ops import channel_attention, fourier_pos, normalize
from edgecl.graph.state_onnx import STATE_OPS, state_op
from edgecl.graph.standardize import fold_standardized, standardized_onnx
from edgecl.graph.token_ops import TOKEN_OPS, attention, in_windows, pos_embed, rotary

OPSET = 17
INPUT, OUTPUT = "x", "logits"
# A switched (input) weight of at least this many elements is GEMM's left operand; a smaller one (a head) stays the
# right operand, where re-packing it costs less than the two transposes around it (tools/bench_switch.py)
LEFT_OPERAND_MIN = 1 << 16


def _conv(b: _Builder, h: str, w: str, bias: str | None, k: list[int], stride: list[int] = (1, 1),
          pad: list[int] = (0, 0), dilation: list[int] = (1, 1), groups: int = 1) -> str:
    inputs = [h, w] + ([bias] if bias else [])
    return b.op("Conv", inputs, kernel_shape=list(k), strides=list(stride), pads=[*pad, *pad],
                dilations=list(dilation), group=groups)


def _conv_node(b: _Builder, h: str, node: dict, bias: str | None) -> str:
    weight = f"{node['name']}.weight"
    if is_standardized(node):  # the switchable graph: a folded one has none left (`fold_standardized`)
        weight = standardized_onnx(b, node, weight)
    return _conv(b, h, weight, bias, node["k"], node["stride"], node["pad"], node["dilation"],
                 node["groups"])


def _bn(b: _Builder, h: str, node: dict) -> str:
    name = node["name"]
    return b.op("BatchNormalization", [h] + [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")],
                epsilon=node["eps"])


def _layer_norm(b: _Builder, h: str, node: dict, shape: list[int]) -> str:
    """LayerNormalization normalises the trailing axes: an NCHW map (or NCL) is transposed to NHWC around it (as the
    torch model it comes from permutes), features (N, C) go in as they are; `shape` is the input's without N. Without affine tensors: scale 1, no bias;
    ``bias`` false: the weight, no bias (LayerNormalization's bias is optional)."""
    name, ch = node["name"], node["ch"]
    scale = f"{name}.weight" if node["affine"] else b.constant(np.ones(ch, dtype=np.float32))
    bias = [f"{name}.bias"] if node["affine"] and node.get("bias", True) else []
    if len(shape) == 1:
        return b.op("LayerNormalization", [h, scale, *bias], axis=-1, epsilon=node["eps"])
    rank = len(shape) + 1  # (N, C, H, W), or (N, C, L)
    last = b.op("Transpose", [h], perm=[0, *range(2, rank), 1])
    normed = b.op("LayerNormalization", [last, scale, *bias], axis=-1, epsilon=node["eps"])
    return b.op("Transpose", [normed], perm=[0, rank - 1, *range(1, rank - 1)])


def _grn(b: _Builder, h: str, node: dict) -> str:
    """x + bias + weight·x·n, n = ‖x‖ over space ÷ (its mean over channels + eps), as `edgecl.train.models`."""
    name, axes = node["name"], b.ints(1, 2)
    spatial = b.op("ReduceL2", [h], axes=[2, 3], keepdims=1)
    n = b.op("Div", [spatial, b.op("Add", [b.op("ReduceMean", [spatial], axes=[1], keepdims=1),
                                           b.constant(float(node["eps"]))])])
    scaled = b.op("Mul", [b.op("Mul", [h, n]), b.op("Unsqueeze", [f"{name}.weight", axes])])
    return b.op("Add", [h, b.op("Add", [scaled, b.op("Unsqueeze", [f"{name}.bias", axes])])])


def _channel_conv(b: _Builder, h: str, node: dict) -> str:
    """ECA's 1-D convolution along the channels, as `edgecl.train.models`: (N, C, 1, 1) → (N, 1, C), zero padding by
    Conv's pads or, circular, the last and first (k−1)/2 channels concatenated around it; Conv 1-D; back."""
    c, pad = node["ch"], (node["k"] - 1) // 2
    seq = b.op("Reshape", [h, b.ints(-1, 1, c)])
    if node["circular"] and pad:
        def part(start: int, stop: int) -> str:
            return b.op("Slice", [seq, *(b.ints(v) for v in (start, stop, 2))])
        seq = b.op("Concat", [part(c - pad, c), seq, part(0, pad)], axis=2)
    weight = b.op("Reshape", [f"{node['name']}.weight", b.ints(1, 1, node["k"])])
    pads = [0, 0] if node["circular"] else [pad, pad]
    out = b.op("Conv", [seq, weight], kernel_shape=[node["k"]], strides=[1], pads=pads, dilations=[1], group=1)
    return b.op("Reshape", [out, b.ints(-1, c, 1, 1)])


def _select_inputs(b: _Builder, arch: Arch) -> str:
    """The network input as a compacted spec reads it: the channels (or flattened features) it still reads, gathered
    from an input of the dense shape (see `edgecl.graph.compact`)."""
    h = INPUT
    if len(arch["input_select_from"]) > len(arch["input_shape"]):
        h = b.op("Flatten", [h], axis=1)
    index = numpy_helper.from_array(np.asarray(arch["input_select"], dtype=np.int64), "input_select")
    return b.op("Gather", [h, b.op("Constant", [], value=index)], axis=1)


def _add_bias(b: _Builder, y: str, bias: str, axes: list[int]) -> str:
    """y + bias unsqueezed at `axes`: (features, batch) activations take [1], NCHW takes [1, 2]."""
    const = b.op("Constant", [], value=numpy_helper.from_array(np.array(axes, dtype=np.int64), f"{bias}_axes"))
    return b.op("Add", [y, b.op("Unsqueeze", [bias, const])])


def _linear_left(b: _Builder, h_t: str, name: str, bias: bool) -> str:
    """(W @ hᵀ + b[:, None]) on activations already transposed to (features, batch)."""
    y = b.op("MatMul", [f"{name}.weight", h_t])
    return _add_bias(b, y, f"{name}.bias", [1]) if bias else y


def _apply_factors(b: _Builder, h: str, w: str, bias: str | None, form: str, parts: dict, main, residual, gather,
                   add_bias) -> str:
    """The task's delta around a constant weight w, shared by linear and conv layers (see `edgecl.runtime.plan`):
    inputs scaled by cols/s, the constant op `main(x, bias)`, outputs scaled by rows/r, then the low-rank
    `residual(h, y)` or the permutation `gather(y)`; the bias goes in before a gather when it is permuted too."""
    x = h
    for part in ("cols", "s"):
        if part in parts:
            x = b.op("Mul", [x, f"{w}:{part}"])
    gathered_bias = form == "permute+bias" and bias is not None
    y = main(x, bias if gathered_bias else None)
    for part in ("rows", "r"):
        if part in parts:
            y = b.op("Mul", [y, f"{w}:{part}"])
    if form == "lowrank":
        y = residual(h, y)
    if form.startswith("permute"):
        y = gather(y)
    return add_bias(y, bias) if bias is not None and not gathered_bias else y


def _linear_factored(b: _Builder, h: str, name: str, bias: bool, form: str | None,
                     parts: dict) -> tuple[str, bool]:
    """A linear layer around a constant weight W (pre-packed by ONNX Runtime) with the task's delta applied to the
    activations: node rows ⊙ (W (cols ⊙ x)); lowrank r ⊙ (W (s ⊙ x)) + (x V) Uᵀ; permute gather(W x (+ b), perm).
    Returns the output and whether it is transposed (features, batch)."""
    w, b_name = f"{name}.weight", f"{name}.bias" if bias else None
    if form is None:
        return b.op("Gemm", [h, w] + ([b_name] if bias else []), transB=1), False
    permute = form.startswith("permute")
    y = _apply_factors(
        b, h, w, b_name, form, parts,
        main=lambda x, c: b.op("Gemm", [x, w] + ([c] if c else []), transB=1),
        residual=lambda h, y: b.op("Gemm", [b.op("MatMul", [h, f"{w}:v"]), f"{w}:u", y], transB=1),
        # rows of the transposed activations: ONNX Runtime gathers along axis 1 element by element (5× slower at
        # batch 64); the result stays transposed for the next layer
        gather=lambda y: b.op("Gather", [b.op("Transpose", [y], perm=[1, 0]), f"{w}:perm"], axis=0),
        add_bias=lambda y, c: _add_bias(b, y, c, [1]) if permute else b.op("Add", [y, c]))
    return y, permute


def _conv_factored(b: _Builder, h: str, node: dict, form: str | None, parts: dict) -> str:
    """A convolution around a constant kernel W with the task's delta applied to the activations: node
    rows ⊙ conv(cols ⊙ x, W); lowrank r ⊙ conv(s ⊙ x, W) + U ∗ (V ∗ windowsum(x)) (the residual is constant over
    kernel positions, so it sees the sum of each input window; U carries the kernel area, `edgecl.runtime.plan`;
    plain convolutions only: no groups, no dilation); permute gather(conv(x, W) (+ b), perm) over channels."""
    name = node["name"]
    w, bias = f"{name}.weight", f"{name}.bias" if node["bias"] else None
    if form is None:
        return _conv_node(b, h, node, bias)

    def residual(h: str, y: str) -> str:
        if node["groups"] != 1 or node["dilation"] != [1, 1]:
            raise ValueError(f"conv {name!r}: a low-rank residual needs groups=1 and dilation=1")
        window = b.op("AveragePool", [h], kernel_shape=node["k"], strides=node["stride"], pads=node["pad"] * 2,
                      count_include_pad=1)
        return b.op("Add", [y, _conv(b, _conv(b, window, f"{w}:v", None, [1, 1]), f"{w}:u", None, [1, 1])])

    return _apply_factors(b, h, w, bias, form, parts,
                          main=lambda x, c: _conv_node(b, x, node, c), residual=residual,
                          gather=lambda y: b.op("Gather", [y, f"{w}:perm"], axis=1),
                          add_bias=lambda y, c: _add_bias(b, y, c, [1, 2]))


_KEEP_TRANSPOSED = ("relu", "relu6", "sigmoid", "tanh", "hardswish", "hardsigmoid", "silu", "gelu", "leaky_relu",
                    "square", "scale")


def _op(b: _Builder, node: dict, ins: list[str], factors: dict, shapes: list[list[int]]) -> str:
    """One non-linear node of the spec (conv included), exactly as `edgecl.train.models` runs it; `shapes`: its
    inputs' shapes without the batch axis."""
    op, h, in_shape = node["op"], ins[0], shapes[0]
    flat = len(in_shape) == 1
    if op == "conv":
        form, parts = factors.get(node["name"], (None, {}))
        if node.get("window"):
            return in_windows(b, h, in_shape, node, lambda x: _conv_factored(b, x, node, form, parts))
        return _conv_factored(b, h, node, form, parts)
    if op == "conv_transpose":
        return conv_transpose(b, h, node)
    if op == "bn":
        return _bn(b, h, node)
    if op == "layer_norm" and node.get("over") == "map":
        return map_norm(b, h, node, in_shape)
    if op == "layer_norm" and node.get("rms"):
        return rms_norm(b, h, node, in_shape)
    if op == "layer_norm":
        return _layer_norm(b, h, node, in_shape)
    if op in ("layer_scale", "affine"):  # (C,) tensors on (N, C) features or, unsqueezed to (C, 1, …), a map
        w, bias = (f"{node['name']}.{k}" for k in ("weight", "bias"))
        w = b.op("Sigmoid", [w]) if node.get("sigmoid") else w  # EfficientViM's gates: σ of the learned weight
        axes = b.ints(*range(1, len(in_shape)))  # a (C, H, W) map's 1, 2; a (C, L) one's 1
        scaled = b.op("Mul", [h, w if flat else b.op("Unsqueeze", [w, axes])])
        return scaled if op == "layer_scale" else b.op("Add", [scaled, bias if flat else
                                                              b.op("Unsqueeze", [bias, axes])])
    if op == "grn":
        return _grn(b, h, node)
    if op == "normalize":
        return normalize(b, h, node, in_shape)
    if op == "scalar_affine":  # (1,) initializers broadcast over any shape
        scaled = b.op("Mul", [h, f"{node['name']}.weight"])
        return b.op("Add", [scaled, f"{node['name']}.bias"]) if node.get("bias", True) else scaled
    if op == "channel_conv":
        return _channel_conv(b, h, node)
    if op == "attention":
        return attention(b, *ins, node, shapes)
    if op == "linear_attention":
        return linear_attention(b, *ins, node, shapes)
    if op == "channel_attention":
        return channel_attention(b, *ins, node, shapes)
    if op == "fourier_pos":
        return fourier_pos(b, h, node, in_shape)
    if op == "lambda_layer":
        return lambda_layer(b, *ins, node, shapes)
    if op == "outlook_attention":
        return outlook_attention(b, *ins, node, shapes)
    if op in STATE_OPS:
        return state_op(b, ins, node, shapes)
    if op == "pos_embed":
        return pos_embed(b, h, node, in_shape)
    if op == "rotary":
        return rotary(b, h, node, in_shape)
    if op in TOKEN_OPS:
        return TOKEN_OPS[op](b, h, node)
    if op in PLAIN_OPS:
        return plain_op(b, h, ins, node, in_shape)
    if op == "attention_pool" and node.get("patch"):
        return patch_context(b, h, ins[1], node, in_shape)
    if op == "attention_pool":  # (N, C, H·W) MatMul softmax(logits over H·W) as (N, H·W, 1) → (N, C, 1, 1)
        weights = b.op("Softmax", [b.op("Flatten", [ins[1]], axis=1)], axis=1)
        flat = b.op("Reshape", [h, b.ints(0, in_shape[0], -1)])
        pooled = b.op("MatMul", [flat, b.op("Unsqueeze", [weights, b.ints(2)])])
        return b.op("Unsqueeze", [pooled, b.ints(3)])
    if op in SPATIAL_OPS:
        return spatial_op(b, h, node, in_shape)
    raise ValueError(f"node {node['name']!r}: op {op!r} has no ONNX form")


def _nodes(arch: Arch, b: _Builder, weights_left: bool = False, constants: frozenset = frozenset(),
           factors: dict | None = None) -> tuple[str, bool]:
    """The trunk's nodes; returns the feature tensor and whether it is transposed (features, batch).

    With weights as inputs, large linear layers take the weight as GEMM's left operand on transposed activations
    (see the module docstring); a transposed tensor stays so through element-wise activations and further linear
    layers, and is transposed back before anything else reads it."""
    factors = factors or {}
    shapes = node_shapes(arch)
    env: dict[str, tuple[str, bool]] = {
        SPEC_INPUT: (_select_inputs(b, arch) if "input_select" in arch else INPUT, False)}

    def plain(name: str) -> str:
        h, transposed = env[name]
        if transposed:
            h = b.op("Transpose", [h], perm=[1, 0])
            env[name] = (h, False)
        return h

    for node in arch["nodes"]:
        op, name = node["op"], node["name"]
        if op == "linear":
            env[name] = _linear(b, node, env[node["inputs"][0]], plain, weights_left, constants, factors)
        elif op in _KEEP_TRANSPOSED and env[node["inputs"][0]][1]:
            env[name] = (_op(b, node, [env[node["inputs"][0]][0]], factors, [shapes[node["inputs"][0]]]),
                         True)
        else:
            env[name] = (_op(b, node, [plain(s) for s in node["inputs"]], factors,
                             [shapes[s] for s in node["inputs"]]), False)
    return env[arch["output"]]


def _linear(b: _Builder, node: dict, source: tuple[str, bool], plain, weights_left: bool, constants: frozenset,
            factors: dict) -> tuple[str, bool]:
    name, (h, transposed) = node["name"], source
    if weights_left and f"{name}.weight" in constants:
        form, parts = factors.get(name, (None, {}))
        return _linear_factored(b, plain(node["inputs"][0]), name, node["bias"], form, parts)
    if weights_left and (transposed or node["in"] * node["out"] >= LEFT_OPERAND_MIN):
        if not transposed:
            h = b.op("Transpose", [h], perm=[1, 0])
        return _linear_left(b, h, name, node["bias"]), True
    return b.op("Gemm", [plain(node["inputs"][0]), f"{name}.weight"] + ([f"{name}.bias"] if node["bias"] else []),
                transB=1), False


def _external(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A float32 initializer whose bytes live outside the model (supplied by the caller at session creation)."""
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape),
                              data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "edgecl-memory"), ("offset", "0"), ("length", str(4 * array.size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def tensor_names(arch: Arch) -> list[str]:
    """Names of every tensor the graph reads besides the input, in a fixed order (trunk, then head)."""
    return list(param_shapes(arch, 1))


def build_onnx(arch: Arch, params: dict[str, np.ndarray] | None = None, *, weights_as_inputs: bool = False,
               constants: dict[str, np.ndarray] | None = None, factors: dict | None = None,
               external_constants: bool = False, graph_name: str | None = None,
               opset: int = OPSET) -> onnx.ModelProto:
    """A float32 ONNX model of trunk + head with a dynamic batch dimension.

    folded (default): `params` (e.g. `materialize(packed, t)`) become initializers; the head size comes from them.
    switchable (`weights_as_inputs=True`): tensors are inputs named as in `tensor_names`; the head's class count is a
    symbolic dimension, so tasks with different class counts share the graph. `params` is ignored. `constants`
    (switchable only) are embedded as initializers instead; `factors` maps a linear layer whose weight is constant
    to (form, {part: shape}) — the per-task vectors ``LAYER.weight:PART`` it reads as inputs (`edgecl.runtime.plan`).
    A weight-standardised conv is folded into a plain one in the folded form (`edgecl.graph.standardize`) and
    standardised in the graph in the switchable one, where its weight is bound per task.
    `external_constants`: the constants are declared as external data with no bytes in the model, to be supplied
    from memory (`SessionOptions.add_external_initializers`): no serialised copy of the weights is ever made.
    """
    if not weights_as_inputs and params is not None:  # a task's model: standardised convs become plain ones
        arch, params = fold_standardized(arch, params)
    b = _Builder()
    constants = constants or {}
    factors = factors or {}
    feat, transposed = _nodes(arch, b, weights_as_inputs, frozenset(constants), factors)
    if transposed:  # the head is small: left operand only when the features are transposed already
        logits_t = _linear_left(b, feat, "head", True)
        b.nodes.append(helper.make_node("Transpose", [logits_t], [OUTPUT], name="head_out", perm=[1, 0]))
    else:
        b.nodes.append(helper.make_node("Gemm", [feat, "head.weight", "head.bias"], [OUTPUT], name="head", transB=1))
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *arch.get("input_select_from",
                                                                                 arch["input_shape"])])
    initializers, inputs = [], [x]
    if weights_as_inputs:
        shapes = param_shapes(arch, 1)
        for name in tensor_names(arch):
            dims = list(shapes[name])
            if name.startswith("head."):
                dims[0] = "classes"
            if name not in constants:
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        for layer, (_, parts) in factors.items():
            for part, dims in parts.items():
                dtype = TensorProto.INT64 if part == "perm" else TensorProto.FLOAT
                dims = list(dims)
                # the rank varies per task: u, v are (J, k) / (I, k), or 1×1 kernels (J, k, 1, 1) / (k, I, 1, 1)
                if part in ("u", "v"):
                    dims[1 if part == "u" or len(dims) == 2 else 0] = f"rank_{layer}"
                inputs.append(helper.make_tensor_value_info(f"{layer}.weight:{part}", dtype, dims))
        initializers = [_external(n, a) if external_constants else
                        numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), n)
                        for n, a in constants.items()]
        classes: int | str = "classes"
    else:
        if params is None:
            raise ValueError("build_onnx: params are required for a folded graph")
        initializers = [numpy_helper.from_array(np.ascontiguousarray(params[n], dtype=np.float32), n)
                        for n in tensor_names(arch)]
        classes = int(params["head.bias"].shape[0])
    y = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])
    graph = helper.make_graph(b.nodes, graph_name or arch.get("name", "edgecl"), inputs, [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgecl")
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime releases of the last two years
    return model
