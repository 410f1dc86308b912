"""ONNX forms of the token ops (Vision Transformers: tokens are a (N, C, T, 1) map) and of attention, as
`edgecl.train.models` computes them; split from `builder` so the builder stays one screenful per family."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from edgecl.arch.attention_windows import partition, window_mask, window_of
from edgecl.arch.gpsa_ops import grid_side, relative_offsets
from edgecl.arch.rotary_ops import rotary_constants
from edgecl.arch.windows import conv_window_shape
from edgecl.graph.halo_onnx import halo_blocks, halo_unblock
from edgecl.graph.nodes import Builder
from edgecl.graph.onnx_spatial import bicubic_matrix
from edgecl.graph.sdta_ops import l2_normalised
from edgecl.graph.rel_pos_onnx import mlp_bias_table, prefixed_rel_logits, rel_logits


def attention(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]]) -> str:
    """An ``attention`` node: over the whole map, or windowed (Swin: `window_attention`)."""
    if window_of(node):
        return window_attention(b, q, k, v, node, shapes)
    if node.get("halo_blocks"):  # HaloNet: q's blocks, k's and v's haloed windows into the batch, and back
        blocks, inner = halo_blocks(b, q, k, v, node, shapes)
        return halo_unblock(b, _attention(b, *blocks, node, inner), node, [shapes[2][0], *shapes[0][1:]])
    return _attention(b, q, k, v, node, shapes)


def window_attention(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]]) -> str:
    """Swin's (shifted) window attention, as `edgecl.train.models.window_attention`: roll by Slice + Concat, windows
    (side by side or dilated) into the batch by Reshape + Transpose, attention with the shift's mask as a constant,
    and back."""
    wh, ww, sh, sw = window_of(node)
    (c, height, width), cv = shapes[0], shapes[2][0]  # kv_heads = heads: the output has v's channels

    def roll(h: str, by: tuple[int, int]) -> str:  # torch.roll along H and W: the last `r` rows first
        for axis, (r, size) in enumerate(zip(by, (height, width)), start=2):
            if r % size:
                cut = size - r % size
                parts = [b.op("Slice", [h, b.ints(cut), b.ints(size), b.ints(axis)]),
                         b.op("Slice", [h, b.ints(0), b.ints(cut), b.ints(axis)])]
                h = b.op("Concat", parts, axis=axis)
        return h

    grid, into, back = partition(height, width, wh, ww, bool(node.get("dilated")))

    def windows(h: str, ch: int) -> str:  # (N, C, H, W) → (N·windows, C, wh, ww)
        six = b.op("Reshape", [h, b.ints(0, ch, *grid)])
        return b.op("Reshape", [b.op("Transpose", [six], perm=list(into)), b.ints(-1, ch, wh, ww)])

    q, k, v = (windows(roll(t, (-sh, -sw)), s[0]) for t, s in zip((q, k, v), shapes))
    mask = window_mask(height, width, wh, ww, sh, sw)
    inner = [[c, wh, ww], [shapes[1][0], wh, ww], [shapes[2][0], wh, ww]]
    out = _attention(b, q, k, v, node, inner, None if mask is None else (b.constant(mask[:, None]), len(mask)))
    grid = b.op("Reshape", [out, b.ints(-1, height // wh, width // ww, cv, wh, ww)])
    out = b.op("Reshape", [b.op("Transpose", [grid], perm=list(back)), b.ints(0, cv, height, width)])
    return roll(out, (sh, sw))


def in_windows(b: Builder, h: str, shape: list[int], node: dict, fn: Callable[[str], str]) -> str:
    """`fn` (a conv's ONNX form) on each window of a conv with ``window``, as `edgecl.train.models.in_windows`: the
    windows into the batch by Reshape + Transpose, and back; ``shape`` is the (C, H, W) input's."""
    (c, height, width), (wh, ww) = shape, node["window"]
    oc, oh, ow = conv_window_shape(node, shape, node["name"])
    oh, ow = oh // (height // wh), ow // (width // ww)  # one window's output
    grid, into, back = partition(height, width, wh, ww, False)
    six = b.op("Reshape", [h, b.ints(0, c, *grid)])
    out = fn(b.op("Reshape", [b.op("Transpose", [six], perm=list(into)), b.ints(-1, c, wh, ww)]))
    six = b.op("Reshape", [out, b.ints(-1, height // wh, width // ww, oc, oh, ow)])
    return b.op("Reshape", [b.op("Transpose", [six], perm=list(back)), b.ints(0, oc, height // wh * oh,
                                                                           width // ww * ow)])


def _attention(b: Builder, q: str, k: str, v: str, node: dict, shapes: list[list[int]],
               mask: tuple[str, int] | None = None) -> str:
    """Multi-head attention over the positions of (N, C, H, W) maps, as `edgecl.train.models.attention`: per head (a
    block of channels) softmax((scale·q)ᵀk) over the keys times v, by Reshape, Transpose, MatMul and Softmax; with
    fewer k/v heads, each one's query heads stacked along the query positions; a bias table (LeViT) is gathered by
    its constant index and added to the scores, then a window mask (windows, 1, T, T) over a window-minor batch;
    with ``cosine`` (Swin V2) q and k L2-normalised per head and the scores times exp(min(logit_scale, ln 100))."""
    (c, *hw), (_, *khw), cv = shapes[0], shapes[1], shapes[2][0]
    h, kv = node["heads"], node["kv_heads"]
    t, tk, d, dv = math.prod(hw), math.prod(khw), c // h, cv // kv

    qh, kh = b.op("Reshape", [q, b.ints(0, h, d, t)]), b.op("Reshape", [k, b.ints(0, kv, d, tk)])
    if node.get("cosine"):  # Swin V2's: q and k L2-normalised per head (kv = h)
        eps = b.constant(1e-12)
        qh, kh = l2_normalised(b, qh, 2, eps), l2_normalised(b, kh, 2, eps)
    qh = b.op("Mul", [b.op("Transpose", [qh], perm=[0, 1, 3, 2]), b.constant(float(node["scale"]))])  # (N, h, T, d)
    if kv != h:
        qh = b.op("Reshape", [qh, b.ints(0, kv, h // kv * t, d)])
    scores = b.op("MatMul", [qh, kh])
    if node.get("cosine"):  # times each head's exp(min(logit_scale, ln 100))
        clamped = b.op("Min", [f"{node['name']}.logit_scale", b.constant(math.log(100.0))])
        scores = b.op("Mul", [scores, b.op("Reshape", [b.op("Exp", [clamped]), b.ints(h, 1, 1)])])
    if node.get("bias_offsets"):  # LeViT's bias: the (heads, B) table gathered by the fixed (T_q, T_kv) offsets
        index = b.constant(np.array(node["bias_index"], dtype=np.int64))
        table = mlp_bias_table(b, node, shapes[0]) if node.get("bias_mlp") else f"{node['name']}.bias"
        bias = b.op("Gather", [table, index], axis=1)
        scores = b.op("Add", [scores, b.op("Reshape", [bias, b.ints(kv, h // kv * t, tk)])])
    if node.get("rel_pos"):  # BotNet's relative position logits (kv = h, no window)
        keys = shapes[1][1:] if node.get("rel_mvit") else None  # MViTv2: pooled keys, their own map
        logits = prefixed_rel_logits(b, q, node, tk) if node.get("rel_prefix") else \
            rel_logits(b, q, node, shapes[0], keys)  # MViTv2's class token: none of its own
        scores = b.op("Add", [scores, logits])
    if mask is not None:  # windows need kv = h: (N·windows, h, T, T) as (N, windows, h, T, T) + (windows, 1, T, T)
        per_window = b.op("Reshape", [scores, b.ints(-1, mask[1], h, t, tk)])
        scores = b.op("Reshape", [b.op("Add", [per_window, mask[0]]), b.ints(-1, h, t, tk)])
    if node.get("talking_heads"):  # kv = h: (N, h, T, Tk) mixed across the heads before and after the softmax
        scores = _mix_heads(b, scores, node, "talk1", (h, t, tk))
    weights = b.op("Softmax", [scores], axis=-1)
    if node.get("talking_heads"):
        weights = _mix_heads(b, weights, node, "talk2", (h, t, tk))
    if node.get("gated_pos"):
        weights = _gated_positions(b, weights, node, h, t)
    out = b.op("MatMul", [weights, b.op("Transpose", [b.op("Reshape", [v, b.ints(0, kv, dv, tk)])], perm=[0, 1, 3, 2])])
    if kv != h:
        out = b.op("Reshape", [out, b.ints(0, h, t, dv)])
    return b.op("Reshape", [b.op("Transpose", [out], perm=[0, 1, 3, 2]), b.ints(0, h * dv, *hw)])


def _mix_heads(b: Builder, scores: str, node: dict, which: str, dims: tuple[int, int, int]) -> str:
    """A talking-head mix, as `edgecl.train.models._mix_heads`: (h, h) MatMul (N, h, T·Tk), plus (h, 1)."""
    h, t, tk = dims
    flat = b.op("MatMul", [f"{node['name']}.{which}_weight", b.op("Reshape", [scores, b.ints(0, h, t * tk)])])
    bias = b.op("Reshape", [f"{node['name']}.{which}_bias", b.ints(h, 1)])
    return b.op("Reshape", [b.op("Add", [flat, bias]), b.ints(0, h, t, tk)])


def _gated_positions(b: Builder, weights: str, node: dict, h: int, t: int) -> str:
    """ConViT's mix, as `edgecl.train.gated_attention.gated_positions`: the offsets' scores (h, 3) MatMul (3, T·T)
    plus (h, 1), their Softmax, (1 − σ(g))·w + σ(g)·that, divided by its ReduceSum over the keys."""
    offsets = b.constant(relative_offsets(grid_side(t)).reshape(3, t * t))
    scores = b.op("Add", [b.op("MatMul", [f"{node['name']}.pos_weight", offsets]),
                          b.op("Reshape", [f"{node['name']}.pos_bias", b.ints(h, 1)])])
    positions = b.op("Softmax", [b.op("Reshape", [scores, b.ints(1, h, t, t)])], axis=-1)
    gate = b.op("Sigmoid", [b.op("Reshape", [f"{node['name']}.gating", b.ints(1, h, 1, 1)])])
    mixed = b.op("Add", [b.op("Mul", [b.op("Sub", [b.constant(1.0), gate]), weights]),
                         b.op("Mul", [gate, positions])])
    return b.op("Div", [mixed, b.op("ReduceSum", [mixed, b.ints(-1)], keepdims=1)])


def _class_token(b: Builder, h: str, node: dict) -> str:
    """The learned tokens, expanded over the batch (Shape of the input's first axis), put before the others."""
    grid = [node["ch"], node["tokens"], 1]
    token = b.op("Reshape", [f"{node['name']}.weight", b.ints(1, *grid)])
    batch = b.op("Shape", [h], start=0, end=1)
    size = b.op("Concat", [batch, b.ints(*grid)], axis=0)
    return b.op("Concat", [b.op("Expand", [token, size]), h], axis=2)


def pos_embed(b: Builder, h: str, node: dict, shape: list[int]) -> str:
    """The (C, T) embedding unsqueezed to tokens (C, T, 1), or reshaped to the feature map's (C, H, W), broadcast
    over the batch."""
    weight = f"{node['name']}.weight"
    if node.get("resize"):  # HieraDet's: B_h · (C, gh, gw) · B_wᵀ, torch's bicubic as the `bicubic` op's matrices
        (gh, gw), (c, height, width) = node["resize"], shape
        grid = b.op("Reshape", [weight, b.ints(c, gh, gw)])
        rows = b.op("MatMul", [grid, b.constant(np.ascontiguousarray(bicubic_matrix(gw, width).T))])
        return b.op("Add", [h, b.op("MatMul", [b.constant(bicubic_matrix(gh, height)), rows])])
    if node.get("tile"):  # TNT's: the (C, wh, ww) embedding tiled over the windows
        (wh, ww), (c, height, width) = node["tile"], shape
        tiled = b.op("Tile", [b.op("Reshape", [weight, b.ints(c, wh, ww)]), b.ints(1, height // wh, width // ww)])
        return b.op("Add", [h, tiled])
    if shape[2] == 1:
        return b.op("Add", [h, b.op("Unsqueeze", [weight, b.ints(2)])])
    return b.op("Add", [h, b.op("Reshape", [weight, b.ints(*shape)])])


def _token(b: Builder, h: str, node: dict) -> str:
    """`count` tokens from `index` on (the class token, or the tokens after a prefix of class/register tokens)."""
    bounds = (node["index"], node["index"] + node["count"], 2)
    starts, ends, axes = (b.ints(v) for v in bounds)
    return b.op("Slice", [h, starts, ends, axes])


def _token_mix(b: Builder, h: str, node: dict) -> str:
    """MLP-Mixer's Linear over the tokens, as `edgecl.train.models`: (N, C, T, 1) squeezed to (N, C, T), MatMul by
    the transposed (out, T) weight, plus the (out,) bias, unsqueezed back to (N, C, out, 1)."""
    name = node["name"]
    mixed = b.op("MatMul", [b.op("Squeeze", [h, b.ints(3)]), b.op("Transpose", [f"{name}.weight"], perm=[1, 0])])
    if node["bias"]:
        mixed = b.op("Add", [mixed, f"{name}.bias"])
    return b.op("Unsqueeze", [mixed, b.ints(3)])


def rotary(b: Builder, h: str, node: dict, shape: list[int]) -> str:
    """A ``rotary`` node (`edgecl.arch.rotary_ops`): x·cos + Gather(x, partners)·sin, its tables Constants of the
    map's (C, T, 1) shape broadcast over the batch."""
    cos, sin, partners = rotary_constants(node, shape)
    turned = b.op("Gather", [h, b.constant(partners)], axis=1)
    return b.op("Add", [b.op("Mul", [h, b.constant(cos)]), b.op("Mul", [turned, b.constant(sin)])])


TOKEN_OPS = {"class_token": _class_token, "token": _token, "token_mix": _token_mix}
