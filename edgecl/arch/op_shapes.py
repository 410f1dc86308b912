"""What each op computes, in sizes: the output shape of a node from its inputs' shapes (`output_shape`, which
`edgecl.arch.spec` validates whole specs with) and the elements it computes on the way (`intermediates`, which the
runtime's memory costs and the spec's bounds read). The ops and their fields: `edgecl.arch.ops`."""
from __future__ import annotations

import math
from typing import Any

from edgecl.arch.conv_transpose import conv_transpose_intermediates, conv_transpose_shape
from edgecl.arch.halo import halo_intermediates
from edgecl.arch.lambda_ops import lambda_intermediates, lambda_shape
from edgecl.arch.ops import CHANNEL_AFFINE_OPS, MAX_ADAPTIVE, MAX_ADAPTIVE_INPUT, MAX_BLUR, TOKEN_TENSOR_OPS
from edgecl.arch.outlook_ops import outlook_intermediates, outlook_shape
from edgecl.arch.rel_pos import rel_intermediates
from edgecl.arch.rotary_ops import rotary_intermediates, rotary_shape
from edgecl.arch.sdta_ops import SDTA_OPS, sdta_intermediates, sdta_shape
from edgecl.arch.state_ops import STATE_OPS, state_intermediates, state_shape
from edgecl.arch.token_shapes import attention_shape, token_shape
from edgecl.arch.windows import check_pool_windows, conv_window_shape, window_length
from edgecl.errors import UsageError


def intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Elements per sample a node computes on the way to its output, as `edgecl.graph.builder` emits it (0 for
    most). ``attention``: the scores and their softmax (heads × T_q × T_kv each: quadratic in the positions, so a
    small spec file can ask for a huge one; `spec.validate` bounds it) and the heads' copies of q, k, v and the output
    (an upper bound); ``attention_pool``: the logits' softmax and reshaped copies of the logits and the map (an upper
    bound); ``adaptive_avgpool``, ``bicubic``: the map resampled along its width only, (C, H, w), between its two
    MatMuls; a conv with ``window``: its input and output, each once more in the windows' order; ``conv_transpose``:
    its column buffer, out·kh·kw·H·W (`edgecl.arch.conv_transpose`)."""
    if node["op"] == "attention":
        (cq, *q), (ck, *k), (cv, _, _) = ins
        tq, tk, h = math.prod(q), math.prod(k), node["heads"]
        out = cv * h // (node.get("kv_heads") or h)
        if node.get("halo_blocks"):  # HaloNet's blocks and haloed windows
            return halo_intermediates(node, ins) + rel_intermediates(node, tq)
        if node.get("window"):  # each query meets the w = wh·ww keys of its window; the scores, their masked sum and
            # softmax; q, k, v and the output rolled, partitioned and transposed (an upper bound)
            w = math.prod(node["window"])
            cosine = h * tq * w + (cq + ck) * tq if node.get("cosine") else 0  # normalised q, k; scaled scores
            return 3 * h * tq * w + (h * w * w if node.get("bias_offsets") else 0) + 3 * (cq + ck + cv + out) * tq + \
                cosine + rel_intermediates(node, tq)  # SAM's logits: each window's, tq queries in all
        bias = h * tq * tk if node.get("bias_offsets") else 0  # the gathered (heads, T_q, T_kv) bias
        bias += h * tq * tk + cq * tq + ck * tk if node.get("cosine") else 0  # normalised q, k; scaled scores
        bias += 4 * h * tq * tk if node.get("talking_heads") else 0  # the mixed scores and weights, their sums
        bias += rel_intermediates(node, tq)  # BotNet's relative position logits
        bias += 5 * h * tq * tk + 3 * tq * tk if node.get("gated_pos") else 0  # offsets, scores, softmax, the mix
        return 2 * h * tq * tk + bias + 2 * (cq * tq + ck * tk) + 2 * (cv * tk + out * tq)
    if node["op"] == "linear_attention":  # q, k relu'd and reshaped; v reshaped; the heads' dv × d sums, the
        # numerator, the keys' sums, the denominator and the quotient before its reshape (an upper bound)
        (cq, *hw), (ck, _, _), (cv, _, _) = ins
        t, h = math.prod(hw), node["heads"]
        return 2 * (cq + ck) * t + 3 * cv * t + cv * (cq // h) + ck + 2 * h * t
    if node["op"] in SDTA_OPS:
        return sdta_intermediates(node, ins)
    if node["op"] == "lambda_layer":
        return lambda_intermediates(node, ins)
    if node["op"] in STATE_OPS:
        return state_intermediates(node["op"], ins)
    if node["op"] == "rotary":
        return rotary_intermediates(ins[0])
    if node["op"] == "outlook_attention":
        return outlook_intermediates(node, ins)
    if node["op"] == "attention_pool":  # with patches: the map and logits transposed, their product, the pool
        return 2 * math.prod(ins[1]) + (3 if node.get("patch") else 1) * math.prod(ins[0])
    if node["op"] == "layer_norm" and node.get("over") == "map":  # its mean, centred map, square, normalised map
        return 4 * math.prod(ins[0])
    if node["op"] == "layer_norm" and node.get("rms"):  # its square, normalised map, its mean of squares
        return 2 * math.prod(ins[0]) + math.prod(ins[0][1:])
    if node["op"] == "adaptive_avgpool":
        return ins[0][0] * ins[0][1] * node["size"][1]
    if node["op"] == "conv_transpose":  # its col2im buffer
        return conv_transpose_intermediates(node, ins)
    if node["op"] == "token_mix":  # the MatMul's output before the bias is added
        return ins[0][0] * node["out"]
    if node["op"] == "conv" and node.get("window"):  # the input in windows and the conv's windowed output: Transposes
        return math.prod(ins[0]) + math.prod(conv_window_shape(node, ins[0], node["name"]))
    return 0


def fixed_constants(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Elements (float32's; an int64 index counts twice) of the fixed arrays the node's ONNX form holds that no
    tensor stands for (`spec.validate` bounds their sum): ``bicubic`` and ``adaptive_avgpool``'s matrix per axis
    (out × in), a ``pos_embed`` ``resize``'s (map side × grid side), ``outlook_attention``'s one-hot window weight
    (C·k⁴), a relative ``lambda_layer``'s (T, T) index, an attention's gated positions' (3, T²) offsets and a
    shift's window mask (windows × w²); 0 for the others."""
    op = node["op"]
    if op in ("bicubic", "adaptive_avgpool"):
        (_, height, width), (h, w) = ins[0], node["size"]
        return h * height + w * width
    if op == "pos_embed" and node.get("resize"):  # HieraDet's grid resized to the map: the bicubic's matrices
        (_, height, width), (h, w) = ins[0], node["resize"]
        return h * height + w * width
    if op == "outlook_attention":
        return ins[0][0] * node["k"] ** 4
    if op == "lambda_layer" and node.get("rel_pos"):
        return 2 * math.prod(ins[0][1:]) ** 2
    if op != "attention":
        return 0
    tq = math.prod(ins[0][1:])
    gated = 3 * tq * tq if node.get("gated_pos") else 0
    return gated + (tq * math.prod(node["window"]) if node.get("shift") else 0)


def output_shape(node: dict[str, Any], ins: list[list[int]], where: str = "node") -> list[int]:
    """Shape (without batch) of a normalised node's output from its inputs' shapes; UsageError when they do not
    fit the op."""
    op, x = node["op"], ins[0]
    if op == "linear":
        if x != [node["in"]]:
            raise UsageError(f"{where}: linear expects [{node['in']}] features, gets {x}")
        return [node["out"]]
    if op in ("conv", "maxpool", "avgpool"):
        if len(x) != 3:
            raise UsageError(f"{where}: {op} needs a (channels, height, width) input, gets {x}")
        if op == "conv":
            if x[0] != node["in"]:
                raise UsageError(f"{where}: conv expects {node['in']} channels, gets {x}")
            g = node["groups"]
            if node["in"] % g or node["out"] % g:
                raise UsageError(f"{where}: groups={g} must divide in={node['in']} and out={node['out']}")
        if op == "conv" and node.get("window"):
            return conv_window_shape(node, x, where)
        pad = node["pad"]
        dil = node.get("dilation", [1, 1])
        if op != "conv" and any(2 * p > k for p, k in zip(pad, node["k"])):
            raise UsageError(f"{where}: pad {pad} must be at most half the window {node['k']}")
        hw = [window_length(x[1 + a], node["k"][a], node["stride"][a], pad[a], dil[a], node.get("ceil_mode", False))
              for a in range(2)]
        if min(hw) <= 0:
            raise UsageError(f"{where}: the window {node['k']} does not fit the input {x}; output would be empty")
        if op != "conv":
            check_pool_windows(node, x, hw, where)
        return [node["out"] if op == "conv" else x[0], *hw]
    if op == "conv_transpose":
        return conv_transpose_shape(node, x, where)
    if op in CHANNEL_AFFINE_OPS:
        of_map = op == "grn" or node.get("over") == "map"  # statistics over the map (GRN, GroupNorm1)
        if x[0] != node["ch"] or of_map and len(x) != 3:
            raise UsageError(f"{where}: {op} has {node['ch']} channels{' of a map' * of_map}, gets {x}")
        return list(x)
    if op == "normalize" and node["over"] == "map" and len(x) != 3:
        raise UsageError(f"{where}: normalize over the map needs a (channels, height, width) map, gets {x}")
    if op == "channel_conv":
        k, c = node["k"], node["ch"]
        if x != [c, 1, 1] or k % 2 == 0 or node["circular"] and k // 2 > c:
            raise UsageError(f"{where}: channel_conv needs a pooled ({c}, 1, 1) input and an odd k (circular: at most "
                             f"{2 * c + 1}), gets {x} and k={k}")
        return list(x)
    if op == "attention":
        return attention_shape(node, ins, where)
    if op == "linear_attention":
        q, k, v = ins
        h = node["heads"]
        if len(q) != 3 or q != k or v[1:] != q[1:] or q[0] % h or v[0] % h:
            raise UsageError(f"{where}: linear_attention needs maps q and k of {h} heads of d channels and v of {h} "
                             f"heads, all at the same positions, gets {ins}")
        return list(v)
    if op in SDTA_OPS:
        return sdta_shape(node, ins, where)
    if op == "lambda_layer":
        return lambda_shape(node, ins, where)
    if op in STATE_OPS:
        return state_shape(op, ins, where)
    if op == "rotary":
        return rotary_shape(node, x, where)
    if op == "outlook_attention":
        return outlook_shape(node, ins, where)
    if op in (*TOKEN_TENSOR_OPS, "token", "token_mix"):
        return token_shape(node, ins, where)
    if op == "shuffle":
        if len(x) != 3 or x[0] % node["groups"]:
            raise UsageError(f"{where}: shuffle needs a (channels, height, width) input whose channels "
                             f"{node['groups']} groups divide, gets {x}")
        return list(x)
    if op == "branch_softmax":
        if len(x) != 3 or x[0] % node["branches"]:
            raise UsageError(f"{where}: branch_softmax needs a (channels, height, width) input whose channels "
                             f"{node['branches']} branches divide, gets {x}")
        return list(x)
    if op == "adaptive_avgpool":
        if len(x) != 3 or max(node["size"]) > MAX_ADAPTIVE or max(x[1:]) > MAX_ADAPTIVE_INPUT:
            raise UsageError(f"{where}: adaptive_avgpool needs a (channels, height, width) map of sides at most "
                             f"{MAX_ADAPTIVE_INPUT} and a size of at most {MAX_ADAPTIVE}, gets {x} and "
                             f"size={node['size']}")
        return [x[0], *node["size"]]
    if op == "bicubic":
        if len(x) != 3 or max(*node["size"], *x[1:]) > MAX_ADAPTIVE_INPUT:
            raise UsageError(f"{where}: bicubic needs a (channels, height, width) map and a size of sides at most "
                             f"{MAX_ADAPTIVE_INPUT}, gets {x} and size={node['size']}")
        return [x[0], *node["size"]]
    if op == "gap":
        if len(x) != 3:
            raise UsageError(f"{where}: gap needs a (channels, height, width) input, gets {x}")
        return [x[0], 1, 1]
    if op == "attention_pool":
        patch = node.get("patch") or x[1:]  # one patch: the whole map
        if len(x) != 3 or ins[1] != [1, *x[1:]] or x[1] % patch[0] or x[2] % patch[1]:
            raise UsageError(f"{where}: attention_pool needs a (channels, height, width) map and (1, height, width) "
                             f"logits (and patches that tile the map), gets {ins} and patch {node.get('patch')}")
        return list(x) if node.get("patch") else [x[0], 1, 1]
    if op == "space_to_depth":
        b = node["block"]
        if len(x) != 3 or x[1] % b or x[2] % b:
            raise UsageError(f"{where}: space_to_depth needs a (channels, height, width) map whose height and width "
                             f"block={b} divides, gets {x}")
        return [x[0] * b * b, x[1] // b, x[2] // b]
    if op == "pad":
        return _pad_shape(node, x, where)
    if op == "blur":
        k, s = node["k"], node["stride"]
        if len(x) != 3 or not 2 <= k <= MAX_BLUR or min(x[1:]) < k:
            raise UsageError(f"{where}: blur needs a (channels, height, width) map at least k × k and k from 2 to "
                             f"{MAX_BLUR}, gets {x} and k={k}")
        return [x[0], *(window_length(d, k, s, 0, 1, False) for d in x[1:])]
    if op == "upsample":
        if len(x) != 3:
            raise UsageError(f"{where}: upsample needs a (channels, height, width) input, gets {x}")
        return [x[0], x[1] * node["scale"][0], x[2] * node["scale"][1]]
    if op == "flatten":
        return [math.prod(x)]
    if op == "reshape":
        if math.prod(node["shape"]) != math.prod(x):
            raise UsageError(f"{where}: cannot reshape {x} to {node['shape']}")
        return list(node["shape"])
    if op == "add":  # equal shapes, or spatial axes of 1 broadcast (never the channels: channel i meets channel i)
        out = [max(d) for d in zip(*ins)]
        if any(len(s) != len(x) or s[0] != x[0] or any(d not in (1, o) for d, o in zip(s[1:], out[1:])) for s in ins):
            raise UsageError(f"{where}: add needs equal shapes or spatial axes of 1, gets {ins}")
        return out
    if op == "mul":
        a, b = ins
        if len(a) != len(b) or any(p != q and 1 not in (p, q) for p, q in zip(a, b)):
            raise UsageError(f"{where}: mul needs broadcastable shapes of one rank, gets {a} and {b}")
        return [max(p, q) for p, q in zip(a, b)]
    if op == "cat":
        if any(len(s) != len(x) or s[1:] != x[1:] for s in ins):
            raise UsageError(f"{where}: cat needs inputs that differ only in channels, gets {ins}")
        return [sum(s[0] for s in ins), *x[1:]]
    if op == "slice":
        if not node["start"] < node["stop"] <= x[0]:
            raise UsageError(f"{where}: slice {node['start']}:{node['stop']} must be a non-empty range of the input's "
                             f"{x[0]} channels")
        return [node["stop"] - node["start"], *x[1:]]
    return list(x)  # element-wise activations


def _pad_shape(node: dict[str, Any], x: list[int], where: str) -> list[int]:
    """Output shape of ``pad``; a reflection must be smaller than the side it mirrors (torch and ONNX refuse
    otherwise), and only a constant pad has a value."""
    if len(x) != 3:
        raise UsageError(f"{where}: pad needs a (channels, height, width) input, gets {x}")
    top, left, bottom, right = node["pads"]
    mode = node["mode"]
    if mode != "constant" and node["value"] != 0.0:
        raise UsageError(f"{where}: pad mode {mode!r} takes no value (gets {node['value']}); only mode 'constant' does")
    if (problem := crop_problem(x, node["pads"], mode, node["value"])) is not None:
        raise UsageError(f"{where}: {problem}")
    if mode == "reflect" and (max(top, bottom) >= x[1] or max(left, right) >= x[2]):
        raise UsageError(f"{where}: reflect pad {node['pads']} (top, left, bottom, right) must be smaller than the "
                         f"input's height and width {x[1:]}")
    return [x[0], x[1] + top + bottom, x[2] + left + right]


def crop_problem(x: list[int], pads: list[int], mode: str, value: Any) -> str | None:
    """Why negative ``pads`` (top, left, bottom, right; a crop, as torch's F.pad and ONNX Pad take them) cannot
    apply to a (C, H, W) map, or None: a crop leaves at least one row and column, crops only with mode 'constant'
    (which torch and ONNX agree on) and never with a -inf fill (which exists for a max pool's windows)."""
    if min(pads) >= 0:
        return None
    top, left, bottom, right = pads
    if x[1] + top + bottom < 1 or x[2] + left + right < 1 or min(top, bottom) <= -x[1] or min(left, right) <= -x[2]:
        return f"pad {pads} (top, left, bottom, right) crops the whole {x[1]}×{x[2]} map away"
    if mode != "constant" or value in ("-inf", -math.inf):
        return (f"pad {pads} crops (negative sides) with mode {mode!r} and value {value!r}; a crop needs mode "
                "'constant' and a finite value")
    return None
