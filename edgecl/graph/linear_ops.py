"""ONNX forms of the attentions linear in the positions (EfficientViT's (MIT) ReLU linear attention, MobileViTv2's
context vector over the patches) and of GroupNorm1 and RMSNorm, as `edgecl.train.models` computes them; beside
`token_ops`. Only ops ONNX Runtime's CPU and CUDA providers both have: Reshape, Relu, Transpose, MatMul, ReduceSum,
ReduceMean, Softmax, Tile, Sqrt, Add, Sub, Mul, Div."""
from __future__ import annotations

import math

from edgecl.graph.nodes import Builder


def linear_attention(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]]) -> str:
    """A ``linear_attention`` node: per head, (v·relu(k)ᵀ)·relu(q) over (relu(k) summed over the positions)ᵀ ·
    relu(q) + eps, by MatMuls on (N, heads, channels, T) views; the output head-major (N, heads·dv, H, W). Kernel
    "softmax" (CoaT's factorised attention): (v·softmax(k)ᵀ)·q, k's Softmax over the positions, no denominator."""
    (c, *hw), cv, h = shapes[0], shapes[2][0], node["heads"]
    t, d, dv = math.prod(hw), c // h, cv // h
    if node["kernel"] == "softmax":
        qh, kh = (b.op("Reshape", [x, b.ints(0, h, d, t)]) for x in (q, k))
        keys = b.op("Transpose", [b.op("Softmax", [kh], axis=-1)], perm=[0, 1, 3, 2])  # (N, h, T, d)
        kv = b.op("MatMul", [b.op("Reshape", [v, b.ints(0, h, dv, t)]), keys])  # (N, h, dv, d)
        return b.op("Reshape", [b.op("MatMul", [kv, qh]), b.ints(0, h * dv, *hw)])

    qh, kh = (b.op("Relu", [b.op("Reshape", [x, b.ints(0, h, d, t)])]) for x in (q, k))  # (N, h, d, T)
    vh = b.op("Reshape", [v, b.ints(0, h, dv, t)])
    kv = b.op("MatMul", [vh, b.op("Transpose", [kh], perm=[0, 1, 3, 2])])  # (N, h, dv, d)
    keys = b.op("Transpose", [b.op("ReduceSum", [kh, b.ints(3)], keepdims=1)], perm=[0, 1, 3, 2])  # (N, h, 1, d)
    below = b.op("Add", [b.op("MatMul", [keys, qh]), b.constant(float(node["eps"]))])  # (N, h, 1, T)
    out = b.op("Div", [b.op("MatMul", [kv, qh]), below])
    return b.op("Reshape", [out, b.ints(0, h * dv, *hw)])


def patch_context(b: Builder, x: str, logits: str, node: dict, shape: list[int]) -> str:
    """An ``attention_pool`` with ``patch``: the map and its logits unfolded to (N, C, ph, pw, patches) by Reshape +
    Transpose, Softmax over the patches, Mul, ReduceSum, and the (N, C, ph, pw) pools tiled over the map."""
    (c, height, width), (ph, pw) = shape, node["patch"]
    nh, nw = height // ph, width // pw

    def unfolded(t: str, ch: int) -> str:
        six = b.op("Transpose", [b.op("Reshape", [t, b.ints(0, ch, nh, ph, nw, pw)])], perm=[0, 1, 3, 5, 2, 4])
        return b.op("Reshape", [six, b.ints(0, ch, ph, pw, nh * nw)])

    weights = b.op("Softmax", [unfolded(logits, 1)], axis=-1)
    pooled = b.op("ReduceSum", [b.op("Mul", [unfolded(x, c), weights]), b.ints(4)], keepdims=0)
    return b.op("Tile", [pooled, b.ints(1, 1, nh, nw)])


def map_norm(b: Builder, h: str, node: dict, shape: list[int]) -> str:
    """A ``layer_norm`` over the whole map (a GroupNorm): (h − mean) / √(variance + eps) over C, H, W per sample
    (GroupNorm1) or, with G ``groups``, over each group of the map Reshaped to (N, G, C/G·H·W) and back; then the
    per-channel affine (unsqueezed to (C, 1, 1)), its bias left out with ``bias`` false (GroupNorm1NoBias). One group
    keeps the graph it had before groups existed."""
    groups = node.get("groups", 1)
    x = h if groups == 1 else b.op("Reshape", [h, b.ints(0, groups, -1)])
    axes = [1, 2, 3] if groups == 1 else [2]
    centred = b.op("Sub", [x, b.op("ReduceMean", [x], axes=axes, keepdims=1)])
    variance = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=axes, keepdims=1)
    normed = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [variance, b.constant(float(node["eps"]))])])])
    if groups > 1:
        normed = b.op("Reshape", [normed, b.ints(0, *shape)])
    if not node["affine"]:
        return normed
    axes = b.ints(1, 2)
    scaled = b.op("Mul", [normed, b.op("Unsqueeze", [f"{node['name']}.weight", axes])])
    if not node.get("bias", True):
        return scaled
    return b.op("Add", [scaled, b.op("Unsqueeze", [f"{node['name']}.bias", axes])])


def rms_norm(b: Builder, h: str, node: dict, shape: list[int]) -> str:
    """A ``layer_norm`` with ``rms`` (timm's RmsNorm2d): h / √(mean of h² over the channels + eps) at each position of
    a map (or of features: `shape` is the input's without N), then the weight per channel (unsqueezed to (C, 1, …))
    when affine; no mean is subtracted and there is no bias."""
    mean_square = b.op("ReduceMean", [b.op("Mul", [h, h])], axes=[1], keepdims=1)
    normed = b.op("Div", [h, b.op("Sqrt", [b.op("Add", [mean_square, b.constant(float(node["eps"]))])])])
    if not node["affine"]:
        return normed
    weight = f"{node['name']}.weight"
    if len(shape) > 1:
        weight = b.op("Unsqueeze", [weight, b.ints(*range(1, len(shape)))])
    return b.op("Mul", [normed, weight])
