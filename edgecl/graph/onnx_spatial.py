"""ONNX forms of the parameter-free ops that resample a map along its spatial axes (``pad``, ``blur``,
``upsample``), for `edgecl.graph.builder`: each channel alone, with fixed numbers only, exactly as
`edgecl.train.models` runs them in torch."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgecl.arch.ops import blur_filter

SPATIAL_OPS = ("pad", "blur", "upsample")
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}  # the spec's → ONNX Pad's


def spatial_op(b: Any, node: dict, h: str, constant: Callable[[Any], str], in_shape: list[int]) -> str:
    """One `SPATIAL_OPS` node on the (N, C, H, W) tensor `h`; `b` is the builder, `constant` makes a Constant."""
    op = node["op"]
    if op == "pad":  # ONNX pads: every axis's start, then every axis's end (N, C, H, W)
        top, left, bottom, right = node["pads"]
        pads = constant(np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64))
        if node["mode"] != "constant":
            return b.op("Pad", [h, pads], mode=_PAD_MODES[node["mode"]])
        return b.op("Pad", [h, pads, constant(np.array(float(node["value"]), dtype=np.float32))], mode="constant")
    if op == "blur":  # one fixed binomial filter per channel: a depthwise Conv with a constant weight
        k, c = node["k"], in_shape[0]
        weight = constant(np.ascontiguousarray(np.broadcast_to(blur_filter(k), (c, 1, k, k))))
        return b.op("Conv", [h, weight], kernel_shape=[k, k], strides=[node["stride"]] * 2, pads=[0, 0, 0, 0],
                    dilations=[1, 1], group=c)
    if op == "upsample":  # out[i] = in[floor(i / scale)]: every value repeated, no interpolation
        scales = constant(np.array([1.0, 1.0, *node["scale"]], dtype=np.float32))
        return b.op("Resize", [h, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor")
    raise ValueError(f"node {node['name']!r}: op {op!r} is not a spatial op")
