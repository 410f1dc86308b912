"""The list of ONNX nodes a graph is built into, each output named after its op and a counter (shared by the
builder and its per-family modules such as `token_ops`)."""
from __future__ import annotations

import onnx
from onnx import helper


class Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self.count}_{op_type}", **attrs))
        return out
