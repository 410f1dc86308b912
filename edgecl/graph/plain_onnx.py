"""The ONNX forms of the spec's plain ops: activations, pooling, arithmetic, concatenation, slices and the
reshaping ops (shuffle, space-to-depth, the branch softmax, flatten, reshape). They take no tensor of their own and
need no factors, so `edgecl.graph.builder` hands them here whole; each mirrors `edgecl.train.models` op for op."""
from __future__ import annotations

import numpy as np

from edgecl.graph.nodes import Builder

UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}
PLAIN_OPS = frozenset({*UNARY, "relu6", "hardsigmoid", "silu", "square", "leaky_relu", "gelu", "maxpool", "avgpool",
                       "gap", "scale", "add", "mul", "cat", "slice", "shuffle", "space_to_depth", "branch_softmax",
                       "flatten", "reshape"})


def plain_op(b: Builder, h: str, ins: list[str], node: dict, in_shape: list[int]) -> str:
    """One plain node on its first input `h` (all of them: `ins`) of shape `in_shape` (without the batch axis)."""
    op = node["op"]
    if op in UNARY:
        return b.op(UNARY[op], [h])
    if op == "relu6":
        return b.op("Clip", [h, b.constant(0.0), b.constant(6.0)])
    if op == "hardsigmoid":  # torch: relu6(x + 3) / 6
        return b.op("HardSigmoid", [h], alpha=1.0 / 6.0, beta=0.5)
    if op == "silu":
        return b.op("Mul", [h, b.op("Sigmoid", [h])])
    if op == "square":  # x · x, as torch.square (MetaFormer's StarReLU and SquaredReLU square a ReLU)
        return b.op("Mul", [h, h])
    if op == "leaky_relu":
        return b.op("LeakyRelu", [h], alpha=node["slope"])
    if op == "gelu":
        if node["approximate"] == "tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
            cube = b.op("Mul", [b.op("Mul", [h, h]), h])
            inner = b.op("Mul", [b.op("Add", [h, b.op("Mul", [cube, b.constant(0.044715)])]),
                                 b.constant(float(np.sqrt(2.0 / np.pi)))])
            half = b.op("Add", [b.op("Tanh", [inner]), b.constant(1.0)])
        else:  # 0.5·x·(1 + erf(x/√2))
            half = b.op("Add", [b.op("Erf", [b.op("Mul", [h, b.constant(float(1 / np.sqrt(2.0)))])]), b.constant(1.0)])
        return b.op("Mul", [b.op("Mul", [h, half]), b.constant(0.5)])
    if op in ("maxpool", "avgpool"):
        attrs = dict(kernel_shape=node["k"], strides=node["stride"], pads=node["pad"] * 2,
                     ceil_mode=int(node["ceil_mode"]))
        if op == "maxpool":
            return b.op("MaxPool", [h], dilations=node["dilation"], **attrs)
        return b.op("AveragePool", [h], count_include_pad=int(node["count_include_pad"]), **attrs)
    if op == "gap":
        return b.op("GlobalAveragePool", [h])
    if op == "scale":
        h = h if node["factor"] == 1.0 else b.op("Mul", [h, b.constant(node["factor"])])
        return h if node["offset"] == 0.0 else b.op("Add", [h, b.constant(node["offset"])])
    if op == "add":
        for other in ins[1:]:
            h = b.op("Add", [h, other])
        return h
    if op == "mul":
        return b.op("Mul", ins)
    if op == "cat":
        return b.op("Concat", ins, axis=1)
    if op == "slice":
        starts, ends, axes = (b.ints(v) for v in (node["start"], node["stop"], 1))
        return b.op("Slice", [h, starts, ends, axes])
    if op == "shuffle":  # (N, g, C/g, H·W) → (N, C/g, g, H·W) → (N, C, H, W)
        c, height, width = in_shape
        grouped = b.op("Reshape", [h, b.ints(0, node["groups"], c // node["groups"], -1)])
        swapped = b.op("Transpose", [grouped], perm=[0, 2, 1, 3])
        return b.op("Reshape", [swapped, b.ints(0, c, height, width)])
    if op == "space_to_depth" and node.get("order") == "wh":  # Swin's (bw·b + bh)·C + c: a 6-D transpose
        c, height, width, k = *in_shape, node["block"]
        grid = b.op("Reshape", [h, b.ints(0, c, height // k, k, width // k, k)])
        moved = b.op("Transpose", [grid], perm=[0, 5, 3, 1, 2, 4])
        return b.op("Reshape", [moved, b.ints(0, c * k * k, height // k, width // k)])
    if op == "space_to_depth":  # the channel order of timm's SpaceToDepth: (bh·b + bw)·C + c
        return b.op("SpaceToDepth", [h], blocksize=node["block"])
    if op == "branch_softmax":  # (N, R, C·H·W), Softmax over axis 1, back to (N, R·C, H, W)
        c, height, width = in_shape
        branches = b.op("Reshape", [h, b.ints(0, node["branches"], -1)])
        weights = b.op("Softmax", [branches], axis=1)
        return b.op("Reshape", [weights, b.ints(0, c, height, width)])
    if op == "flatten":
        return b.op("Flatten", [h], axis=1)
    if op == "reshape":
        return b.op("Reshape", [h, b.ints(0, *node["shape"])])
    raise ValueError(f"node {node['name']!r}: op {op!r} is no plain op")
