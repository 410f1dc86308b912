"""Which channels of a task's graph hold a constant, and which: the facts structural compaction needs to fold a
channel into its readers' biases instead of keeping it (numpy only, no torch).

A channel is *constant* when every position of it holds the same value for every input: a conv/linear output unit whose
weight row reads nothing that varies (a dead filter: its bias, or its bias plus what it reads of other constants),
pushed through BatchNorm, layer scales, scalar affines (a·c + b: a dead channel's 0 becomes b), activations, ``scale``,
pooling, residual sums (the sum of the branches' constants), gates (a product; a zero gate makes anything zero),
concatenations and softmaxes across branches (a channel whose R logits are all constant). Values are float64 per
channel of the
tensor's channel axis as `edgecl.arch.channel_map` lays it out (``spaces``: after a flatten, one value per source
channel, not per feature); NaN means "depends on the input". A LayerNorm's (and a GRN's) outputs are taken as
varying (each depends on every channel at its position), and so are a ``channel_conv``'s (ECA: each reads its
neighbours) and the token ops' (a class token or position embedding puts other values in some positions; attention
mixes positions; EdgeNeXt's channel attention mixes a head's channels, its Fourier grid varies over the map); a gate
they drive still leaves a channel that is constant 0 at zero.

Exact or not, op by op: a convolution without padding sees a constant channel in every window (its contribution is
the kernel's sum times the constant); with zero padding the border windows see zeros instead, so a constant ≠ 0 read
by a padded convolution leaves that output varying (NaN). Max pooling keeps a constant (padding never wins a max),
average pooling only without padding and ceil mode (partial windows would be averaged with padding), or when the
constant is 0. GELU is evaluated exactly (erf or its tanh form).
"""
from __future__ import annotations

import math

import numpy as np

from edgecl.arch.channels import ChannelMap, Segments
from edgecl.arch.ops import NEIGHBOUR_OPS, NORMALISING_OPS, TOKEN_TENSOR_OPS
from edgecl.arch.spec import INPUT, Arch, is_depthwise

BN_KEYS = ("weight", "bias", "running_mean", "running_var")
_ERF = np.vectorize(math.erf, otypes=[np.float64])
_GELU_TANH = math.sqrt(2.0 / math.pi)
# What each activation makes of a constant (float64; torch and ONNX Runtime compute in float32, within 1e-7)
ACTIVATIONS = {
    "relu": lambda v: np.maximum(v, 0.0), "relu6": lambda v: np.clip(v, 0.0, 6.0),
    "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "tanh": np.tanh,
    "hardsigmoid": lambda v: np.clip(v + 3, 0, 6) / 6, "hardswish": lambda v: v * np.clip(v + 3, 0, 6) / 6,
    "silu": lambda v: v / (1 + np.exp(-v)), "square": np.square}


def _gelu(v: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * v * (1 + np.tanh(_GELU_TANH * (v + 0.044715 * v ** 3)))
    return 0.5 * v * (1 + _ERF(v / math.sqrt(2.0)))


def width(cm: ChannelMap, segments: Segments) -> int:
    """Channels (not features) of an axis made of `segments`."""
    return sum(cm.groups[g] for g, _ in segments)


def expand(values: np.ndarray, segments: Segments, cm: ChannelMap) -> np.ndarray:
    """Per-channel values → per position of the axis (each channel repeated as its segment says)."""
    out, start = [], 0
    for g, r in segments:
        n = cm.groups[g]
        out.append(np.repeat(values[start:start + n], r))
        start += n
    return np.concatenate(out) if out else values[:0]


def collapse(values: np.ndarray, segments: Segments, cm: ChannelMap) -> np.ndarray:
    """Per position → per channel: a channel is constant only when all its positions hold one value."""
    out, start = [], 0
    for g, r in segments:
        n = cm.groups[g]
        block = values[start:start + n * r].reshape(n, r)
        same = (block == block[:, :1]).all(axis=1)
        out.append(np.where(same, block[:, 0], np.nan))
        start += n * r
    return np.concatenate(out) if out else values[:0]


def channel_constants(arch: Arch, params: dict[str, np.ndarray], cm: ChannelMap) -> dict[str, np.ndarray]:
    """Node name (and ``"input"``) → float64 per channel of its output (`cm.spaces`): the constant, or NaN."""
    values = {INPUT: np.full(width(cm, cm.spaces[INPUT]), np.nan)}
    for node in arch["nodes"]:
        ins = [values[s] for s in node["inputs"]]
        values[node["name"]] = _node(node, ins, params, cm)
    return values


def _token_mix_constants(node: dict, v: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """Per channel: the token mix of a channel holding c at every token, where every output token gets one value."""
    w = params[f"{node['name']}.weight"].astype(np.float64)
    b = params[f"{node['name']}.bias"].astype(np.float64) if node["bias"] else np.zeros(w.shape[0])
    tokens = v[:, None] * w.sum(axis=1)[None, :] + b[None, :]  # (channels, out tokens); NaN stays NaN
    return np.where((tokens == tokens[:, :1]).all(axis=1), tokens[:, 0], np.nan)


def _node(node: dict, ins: list[np.ndarray], params: dict[str, np.ndarray], cm: ChannelMap) -> np.ndarray:
    op, name, v = node["op"], node["name"], ins[0]
    source = cm.spaces[node["inputs"][0]]
    if op in ("conv", "linear"):
        return collapse(weighted_constants(node, params, expand(v, source, cm)), cm.spaces[name], cm)
    if op == "bn":
        g, b, m, var = (params[f"{name}.{k}"].astype(np.float64) for k in BN_KEYS)
        return collapse((expand(v, source, cm) - m) / np.sqrt(var + node["eps"]) * g + b, source, cm)
    if op == "layer_scale":  # a gate's factor is σ(weight)
        w = params[f"{name}.weight"].astype(np.float64)
        return collapse(expand(v, source, cm) * (1.0 / (1.0 + np.exp(-w)) if node.get("sigmoid") else w), source, cm)
    if op == "affine":  # a constant c (a dead channel's 0 too) is w·c + b on its channel
        w, b = (params[f"{name}.{k}"].astype(np.float64) for k in ("weight", "bias"))
        return collapse(expand(v, source, cm) * w + b, source, cm)
    if op == "scalar_affine":  # one number for every channel: a constant c (a dead channel's 0 too) is a·c + b after
        a = float(params[f"{name}.weight"].reshape(-1)[0])
        b = float(params[f"{name}.bias"].reshape(-1)[0]) if node.get("bias", True) else 0.0  # none: a skipinit gain
        return v * a + b
    if op == "token_mix":  # channel c constant over the tokens is c·rowsum(W) + b at each token: constant only where
        # those agree (0 without a bias stays 0)
        return _token_mix_constants(node, v, params)
    if op in (*NORMALISING_OPS, *NEIGHBOUR_OPS, *TOKEN_TENSOR_OPS, "attention", "linear_attention",
              "channel_attention", "fourier_pos", "lambda_layer", "outlook_attention", "conv_transpose",
              "rotary", "normalize", "state_pool", "state_read"):  # varying: each
        return np.full(width(cm, cm.spaces[name]), np.nan)  # depends on other channels, or positions differ
    if op in ACTIVATIONS:
        return ACTIVATIONS[op](v)
    if op == "gelu":
        return _gelu(v, node["approximate"])
    if op == "leaky_relu":
        return np.where(v < 0, v * node["slope"], v)
    if op == "scale":
        return v * node["factor"] + node["offset"]
    if op == "slice":  # whole groups of the input's channel axis (`channel_map` splits a group a slice cuts)
        i, j = cm.sliced(source, node["start"], node["stop"])
        first = width(cm, source[:i])
        return v[first:first + width(cm, source[i:j])]
    if op == "pad":  # a constant border holds the value: still one constant only where the channel's equals it
        # (a reflected or replicated border copies the channel's own values)
        if node["mode"] != "constant" or max(node["pads"]) <= 0:  # (a crop adds no border)
            return v
        return np.where(v == float(node["value"]), v, np.nan)
    if op == "avgpool" and (any(node["pad"]) or node["ceil_mode"]):
        return np.where(v == 0, 0.0, np.nan)
    if op == "space_to_depth":  # block² copies of the channels, each a sub-grid of the map: constant where it was
        return np.tile(v, node["block"] ** 2)
    if op == "reshape" and len(node["shape"]) == 3 and node["shape"][0] != len(v):  # k channels' maps stacked
        # along the rows (one value where all k agree), or back (`channels.stacks`)
        if node["shape"][0] > len(v):
            return np.repeat(v, node["shape"][0] // len(v))
        block = v.reshape(-1, len(v) // node["shape"][0])
        return np.where((block == block[:, :1]).all(axis=1), block[:, 0], np.nan)
    if op == "shuffle":  # one value per channel, in the output's order
        return v.reshape(node["groups"], -1).T.reshape(-1)
    if op == "branch_softmax":  # a channel's R logits: its R outputs are constant when all R are (NaN spreads)
        logits = v.reshape(node["branches"], -1)
        e = np.exp(logits - logits.max(axis=0))
        return (e / e.sum(axis=0)).reshape(-1)
    if op == "add":
        return np.sum(ins, axis=0)
    if op == "mul":
        a, b = ins
        product = a * b  # one side may be a single broadcast channel
        return np.where((a == 0) | (b == 0), 0.0, product)
    if op == "cat":
        return np.concatenate(ins)
    # maxpool, avgpool without padding, gap, flatten, reshape, attention_pool (its weights sum to 1, so a channel
    # constant over the map pools to that constant, whatever the logits), blur (no padding, taps summing to 1),
    # adaptive_avgpool (every window an average): a constant channel stays one
    return v


def weighted_constants(node: dict, params: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """Per output unit of a conv/linear node: its constant value given its inputs' per-position constants (NaN
    unknown), or NaN when a nonzero weight reads a varying input (or, through zero padding, a constant ≠ 0)."""
    w = params[f"{node['name']}.weight"]
    out = w.shape[0]
    groups = node["groups"] if node["op"] == "conv" else 1
    per_group = inputs.size // groups
    block = w.reshape(out, w.shape[1], -1)
    read = block.any(axis=2)
    seen = inputs.reshape(groups, per_group)[np.arange(out) // (out // groups)]  # (out, inputs of its group)
    unknown = np.isnan(seen)
    padded = node["op"] == "conv" and any(node["pad"])
    varying = (read & (unknown | (padded & (seen != 0)))).any(axis=1)
    bias = params.get(f"{node['name']}.bias")
    value = np.zeros(out) if bias is None else bias.astype(np.float64)
    rows = np.flatnonzero(~varying)
    if len(rows):
        sums = block[rows].sum(axis=2, dtype=np.float64)
        value[rows] += (sums * np.where(unknown[rows], 0.0, seen[rows])).sum(axis=1)
    value[varying] = np.nan
    return value


def is_reader(node: dict) -> bool:
    """Conv/linear nodes whose input channels are columns of their weight (a depthwise conv's are its rows)."""
    return node["op"] == "linear" or (node["op"] == "conv" and not is_depthwise(node))
