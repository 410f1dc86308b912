"""ONNX forms of the parameter-free ops that resample a map along its spatial axes (``pad``, ``blur``,
``upsample``, ``adaptive_avgpool``, ``bicubic``), for `edgecl.graph.builder`: each channel alone, with fixed numbers
only, exactly as `edgecl.train.models` runs them in torch."""
from __future__ import annotations

import math

import numpy as np

from edgecl.arch.ops import blur_filter
from edgecl.graph.nodes import Builder

SPATIAL_OPS = ("pad", "blur", "upsample", "adaptive_avgpool", "bicubic")
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}  # the spec's → ONNX Pad's


def adaptive_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) float32: row i averages torch's adaptive window i, input ⌊i·size/out⌋ to ⌈(i+1)·size/out⌉ − 1."""
    m = np.zeros((out, size), dtype=np.float64)
    for i in range(out):
        start, stop = i * size // out, -(-(i + 1) * size // out)
        m[i, start:stop] = 1.0 / (stop - start)
    return m.astype(np.float32)


def bicubic_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) float32: torch's bicubic resampling of one axis (align_corners=False, sizes given): output i reads
    source x = (i + ½)·s − ½ with s = size/out in float32, the four inputs ⌊x⌋ − 1 … ⌊x⌋ + 2 clamped to the
    axis, weighted by the cubic convolution kernel with A = −0.75 at t = x − ⌊x⌋ (rows sum to 1)."""
    a, scale = -0.75, np.float32(size) / np.float32(out)
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| ≤ 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    m = np.zeros((out, size), dtype=np.float64)
    for i in range(out):
        # rounded to float32 once, as torch's fused multiply-add computes it (the product rounded first, as written,
        # put weights 1e-5 away from torch's at 240 → 224: float32's step near 128 is 7.6e-6)
        x = float(np.float32(float(scale) * (i + 0.5) - 0.5))
        base, t = math.floor(x), x - math.floor(x)
        for j, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[i, min(max(base - 1 + j, 0), size - 1)] += w
    return m.astype(np.float32)


def spatial_op(b: Builder, h: str, node: dict, in_shape: list[int]) -> str:
    """One `SPATIAL_OPS` node on the (N, C, H, W) tensor `h`."""
    op = node["op"]
    if op == "pad":  # ONNX pads: every axis's start, then every axis's end (N, C, H, W)
        top, left, bottom, right = node["pads"]
        pads = b.ints(0, 0, top, left, 0, 0, bottom, right)
        if node["mode"] != "constant":
            return b.op("Pad", [h, pads], mode=_PAD_MODES[node["mode"]])
        return b.op("Pad", [h, pads, b.constant(np.array(float(node["value"]), dtype=np.float32))], mode="constant")
    if op == "blur":  # one fixed binomial filter per channel: a depthwise Conv with a constant weight
        k, c = node["k"], in_shape[0]
        weight = b.constant(np.ascontiguousarray(np.broadcast_to(blur_filter(k), (c, 1, k, k))))
        return b.op("Conv", [h, weight], kernel_shape=[k, k], strides=[node["stride"]] * 2, pads=[0, 0, 0, 0],
                    dilations=[1, 1], group=c)
    if op == "upsample" and node.get("mode") == "tile":  # out[i] = in[i mod size]: the whole map repeated
        return b.op("Tile", [h, b.ints(1, 1, *node["scale"])])
    if op == "upsample":  # out[i] = in[floor(i / scale)]: every value repeated, no interpolation; or bilinear
        scales = b.constant(np.array([1.0, 1.0, *node["scale"]], dtype=np.float32))
        if node.get("mode") == "bilinear":  # torch's align_corners=False: source (i + ½)/scale − ½, edges clamped;
            # align_corners=True: source i·(in − 1)/(out − 1), the corner pixels' centres kept
            corners = "align_corners" if node.get("align_corners") else "half_pixel"
            return b.op("Resize", [h, "", scales], mode="linear", coordinate_transformation_mode=corners)
        return b.op("Resize", [h, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor")
    if op == "adaptive_avgpool":  # A_h · X · A_wᵀ: (N, C, H, W) MatMul (W, w), then (h, H) MatMul that (broadcast)
        (_, height, width), (h_out, w_out) = in_shape, node["size"]
        rows = b.op("MatMul", [h, b.constant(np.ascontiguousarray(adaptive_matrix(width, w_out).T))])
        return b.op("MatMul", [b.constant(adaptive_matrix(height, h_out)), rows])
    if op == "bicubic":  # B_h · X · B_wᵀ, as adaptive_avgpool (ONNX Runtime's Resize cubic with A = −0.75 measured
        # 1.3e-4 from torch at 240 → 224, these matrices 2e-6)
        (_, height, width), (h_out, w_out) = in_shape, node["size"]
        rows = b.op("MatMul", [h, b.constant(np.ascontiguousarray(bicubic_matrix(width, w_out).T))])
        return b.op("MatMul", [b.constant(bicubic_matrix(height, h_out)), rows])
    raise ValueError(f"node {node['name']!r}: op {op!r} is not a spatial op")
