"""The list of ONNX nodes a graph is built into, each output named after its op and a counter (shared by the
builder and its per-family modules such as `token_ops`), and the Constant nodes they read."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self.count}_{op_type}", **attrs))
        return out

    def constant(self, value) -> str:
        """A Constant node holding `value` (a Python float becomes a float32 scalar)."""
        array = np.asarray(value, dtype=np.float32) if isinstance(value, float) else value
        return self.op("Constant", [], value=numpy_helper.from_array(array, f"c{self.count + 1}"))

    def ints(self, *dims: int) -> str:
        """A Constant int64 vector, as Reshape, Slice, ReduceSum and Tile read their shapes and axes."""
        return self.constant(np.array(dims, dtype=np.int64))
