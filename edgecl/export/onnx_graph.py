"""Build an ONNX graph from an architecture spec (numpy + onnx only, no torch).

Two forms from one builder:
- folded: a task's materialised tensors become initializers (one self-contained model per task);
- switchable: every tensor is a graph input, so one ONNX Runtime session serves all tasks and a task switch only
  rebinds buffers (initializers cannot be replaced in a live session).
The node sequence mirrors `edgecl.train.models.forward` op for op, so exported and trained models agree.
A compacted spec (`edgecl.export.compact`) may carry ``input_select``: a Gather of the input columns/channels its first
layer still reads, so a compacted graph takes the same input as the dense one.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecl.arch import Arch, has_shortcut, param_shapes

OPSET = 17
INPUT, OUTPUT = "x", "logits"


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
    """Gather the input columns/channels a compacted first layer still reads (see `edgecl.export.compact`)."""
    const = b.op("Constant", [], value=numpy_helper.from_array(np.asarray(index, dtype=np.int64), "input_select"))
    return b.op("Gather", [h, const], axis=1)


def _nodes(arch: Arch, b: _Builder) -> str:
    h = INPUT
    select = arch.get("input_select")
    for layer in arch["layers"]:
        op, name = layer["op"], layer.get("name")
        if select is not None and op in ("linear", "conv"):
            h, select = _select_inputs(b, h, select), None
        if op == "linear":
            h = b.op("Gemm", [h, f"{name}.weight"] + ([f"{name}.bias"] if layer["bias"] else []), transB=1)
        elif op == "conv":
            h = _conv(b, h, f"{name}.weight", f"{name}.bias" if layer["bias"] else None, layer["k"], layer["stride"],
                      layer["pad"])
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
    return h


def tensor_names(arch: Arch) -> list[str]:
    """Names of every tensor the graph reads besides the input, in a fixed order (trunk, then head)."""
    return list(param_shapes(arch, 1))


def build_onnx(arch: Arch, params: dict[str, np.ndarray] | None = None, *, weights_as_inputs: bool = False,
               graph_name: str | None = None, opset: int = OPSET) -> onnx.ModelProto:
    """A float32 ONNX model of trunk + head with a dynamic batch dimension.

    folded (default): `params` (e.g. `materialize(packed, t)`) become initializers; the head size comes from them.
    switchable (`weights_as_inputs=True`): tensors are inputs named as in `tensor_names`; the head's class count is a
    symbolic dimension, so tasks with different class counts share the graph. `params` is ignored.
    """
    b = _Builder()
    feat = _nodes(arch, b)
    b.nodes.append(helper.make_node("Gemm", [feat, "head.weight", "head.bias"], [OUTPUT], name="head", transB=1))
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *arch["input_shape"]])
    initializers, inputs = [], [x]
    if weights_as_inputs:
        shapes = param_shapes(arch, 1)
        for name in tensor_names(arch):
            dims = list(shapes[name])
            if name.startswith("head."):
                dims[0] = "classes"
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
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
