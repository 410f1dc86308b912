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
A compacted spec (`edgecl.graph.compact`) may carry ``input_select``: a Gather of the input columns/channels its first
layer still reads, so a compacted graph takes the same input as the dense one.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecl.arch import Arch, has_shortcut, param_shapes

OPSET = 17
INPUT, OUTPUT = "x", "logits"
# A switched (input) weight of at least this many elements is GEMM's left operand; a smaller one (a head) stays the
# right operand, where re-packing it costs less than the two transposes around it (tools/bench_switch.py)
LEFT_OPERAND_MIN = 1 << 16


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self.count}_{op_type}", **attrs))
        return out


def _conv(b: _Builder, h: str, w: str, bias: str | None, k: int, stride: int, pad: int) -> str:
    inputs = [h, w] + ([bias] if bias else [])
    return b.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)


def _bn(b: _Builder, h: str, name: str) -> str:
    return b.op("BatchNormalization", [h] + [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")],
                epsilon=1e-5)


def _select_inputs(b: _Builder, h: str, index: list[int]) -> str:
    """Gather the input columns/channels a compacted first layer still reads (see `edgecl.graph.compact`)."""
    const = b.op("Constant", [], value=numpy_helper.from_array(np.asarray(index, dtype=np.int64), "input_select"))
    return b.op("Gather", [h, const], axis=1)


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


def _conv_factored(b: _Builder, h: str, layer: dict, form: str | None, parts: dict) -> str:
    """A convolution around a constant kernel W with the task's delta applied to the activations: node
    rows ⊙ conv(cols ⊙ x, W); lowrank r ⊙ conv(s ⊙ x, W) + U ∗ (V ∗ windowsum(x)) (the residual is constant over
    kernel positions, so it sees the sum of each input window; U carries the kernel area, `edgecl.runtime.plan`);
    permute gather(conv(x, W) (+ b), perm) over channels."""
    name, k, stride, pad = layer["name"], layer["k"], layer["stride"], layer["pad"]
    w, bias = f"{name}.weight", f"{name}.bias" if layer["bias"] else None
    if form is None:
        return _conv(b, h, w, bias, k, stride, pad)

    def residual(h: str, y: str) -> str:
        window = b.op("AveragePool", [h], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                      count_include_pad=1)
        return b.op("Add", [y, _conv(b, _conv(b, window, f"{w}:v", None, 1, 1, 0), f"{w}:u", None, 1, 1, 0)])

    return _apply_factors(b, h, w, bias, form, parts,
                          main=lambda x, c: _conv(b, x, w, c, k, stride, pad), residual=residual,
                          gather=lambda y: b.op("Gather", [y, f"{w}:perm"], axis=1),
                          add_bias=lambda y, c: _add_bias(b, y, c, [1, 2]))


def _nodes(arch: Arch, b: _Builder, weights_left: bool = False, constants: frozenset = frozenset(),
           factors: dict | None = None) -> tuple[str, bool]:
    """The trunk's nodes; returns the feature tensor and whether it is transposed (features, batch)."""
    factors = factors or {}
    h, transposed = INPUT, False
    select = arch.get("input_select")
    for layer in arch["layers"]:
        op, name = layer["op"], layer.get("name")
        if select is not None and op in ("linear", "conv"):
            h, select = _select_inputs(b, h, select), None
        if transposed and op not in ("linear", "relu"):  # (a factored linear layer transposes back itself)
            h, transposed = b.op("Transpose", [h], perm=[1, 0]), False
        if op == "linear" and weights_left and f"{name}.weight" in constants:
            if transposed:
                h, transposed = b.op("Transpose", [h], perm=[1, 0]), False
            form, parts = factors.get(name, (None, {}))
            h, transposed = _linear_factored(b, h, name, layer["bias"], form, parts)
        elif op == "linear" and weights_left and (transposed or layer["in"] * layer["out"] >= LEFT_OPERAND_MIN):
            if not transposed:
                h, transposed = b.op("Transpose", [h], perm=[1, 0]), True
            h = _linear_left(b, h, name, layer["bias"])
        elif op == "linear":
            h = b.op("Gemm", [h, f"{name}.weight"] + ([f"{name}.bias"] if layer["bias"] else []), transB=1)
        elif op == "conv":  # a plain Conv unless the layer is factored
            form, parts = factors.get(name, (None, {}))
            h = _conv_factored(b, h, layer, form, parts)
        elif op == "bn":
            h = _bn(b, h, name)
        elif op == "relu":
            h = b.op("Relu", [h])
        elif op == "maxpool":
            h = b.op("MaxPool", [h], kernel_shape=[layer["k"]] * 2, strides=[layer["k"]] * 2)
        elif op == "flatten":
            h = b.op("Flatten", [h], axis=1)
        elif op == "gap":
            h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
        elif op == "block":
            y = _conv(b, h, f"{name}.conv1.weight", None, 3, layer["stride"], 1)
            y = b.op("Relu", [_bn(b, y, f"{name}.bn1")])
            y = _bn(b, _conv(b, y, f"{name}.conv2.weight", None, 3, 1, 1), f"{name}.bn2")
            if has_shortcut(layer):
                h = _bn(b, _conv(b, h, f"{name}.short.weight", None, 1, layer["stride"], 0), f"{name}.shortbn")
            h = b.op("Relu", [b.op("Add", [y, h])])
    return h, transposed


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
    `external_constants`: the constants are declared as external data with no bytes in the model, to be supplied
    from memory (`SessionOptions.add_external_initializers`): no serialised copy of the weights is ever made.
    """
    b = _Builder()
    constants = constants or {}
    factors = factors or {}
    feat, transposed = _nodes(arch, b, weights_as_inputs, frozenset(constants), factors)
    if transposed:  # the head is small: left operand only when the features are transposed already
        logits_t = _linear_left(b, feat, "head", True)
        b.nodes.append(helper.make_node("Transpose", [logits_t], [OUTPUT], name="head_out", perm=[1, 0]))
    else:
        b.nodes.append(helper.make_node("Gemm", [feat, "head.weight", "head.bias"], [OUTPUT], name="head", transB=1))
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *arch["input_shape"]])
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
