"""The ``outlook_attention`` op (VOLO's outlook attention, timm's ``OutlookAttention``): its fields, output shape and
work bound (`edgecl.arch.ops` and `edgecl.arch.op_shapes` ask here), and the fixed one-hot filter that gathers and scatters its windows.

Inputs v (C, H, W) — ``heads`` contiguous blocks of d = C / heads channels — and logits (heads·k⁴, h, w), the
attention weights a 1×1 conv predicted at each of the h × w window positions (timm: a Linear of the map average-pooled
by ``stride``); fields ``heads``, ``k`` (the window side), ``pad``, ``stride``, ``scale``. Window n (top-left at
(i·stride − pad, j·stride − pad), zeros outside the map: torch's ``F.unfold``, whose positions must be the logits' h ×
w) gathers v's k × k neighbourhood; head g's logits at n, channel g·k⁴ + a·k² + b, are a k² × k² matrix softmaxed
(times ``scale``) over b; output slot a of the window is Σ_b weight[a, b] · v at slot b (per channel, the head's
weights for all d channels); the k² slots of every window are summed back onto the map (``F.fold``: overlapping
windows add, padding dropped). Each output channel mixes v's same channel only, at other positions: the output's
channels are v's (`edgecl.arch.channels`), but v and the logits are pinned and ordered (heads are contiguous blocks,
and a dead logit still takes its share of the softmax), and a channel constant over the map is not constant after it
(the fold adds a border's fewer windows): varying. No tensors: its Linears are ``conv`` nodes around it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgecl.arch.limits import MAX_ACTIVATION
from edgecl.arch.windows import window_length
from edgecl.errors import UsageError

MAX_OUTLOOK = 15  # the window side: VOLO's is 3; k⁴ logits per head and position

OUTLOOK_FIELDS = {"heads": ("size", ...), "k": ("size", ...), "pad": ("index", 0), "stride": ("size", 1),
                  "scale": ("number", ...)}


def outlook_shape(node: dict[str, Any], ins: list[list[int]], where: str) -> list[int]:
    """Output shape (C, H, W): v's; UsageError where v, the logits and the windows do not fit together."""
    (v, logits), h, k, p, s = ins, node["heads"], node["k"], node["pad"], node["stride"]
    grid = [window_length(d, k, s, p, 1, False) for d in v[1:]] if len(v) == 3 and k <= MAX_OUTLOOK else []
    if len(v) != 3 or v[0] % h or len(logits) != 3 or logits != [h * k ** 4, *grid] or p >= k or \
            min(grid) < 1 or node["scale"] <= 0:
        raise UsageError(f"{where}: outlook_attention needs a map v of {h} heads, logits of heads·k⁴ = "
                         f"{h * k ** 4} channels at its {k} × {k} windows' positions (stride {s}, pad {p}: {grid}), "
                         f"k at most {MAX_OUTLOOK}, a pad below k and a scale > 0, gets {ins} and scale "
                         f"{node['scale']}")
    if (products := v[0] * k ** 4 * math.prod(grid)) > MAX_ACTIVATION:
        raise UsageError(f"{where}: outlook_attention of {v[0]} channels, k {k}, over {grid} windows computes "
                         f"{products} products per sample, more than {MAX_ACTIVATION}")
    return list(v)


def outlook_intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Values held besides inputs and output: the gathered windows and their transpose, the logits' transposed,
    scaled and softmaxed copies, the product and its transpose (an upper bound)."""
    (c, *_), (logits, *grid) = ins
    windows = c * node["k"] ** 2 * math.prod(grid)
    return 4 * windows + 3 * logits * math.prod(grid)


def one_hot_windows(channels: int, k: int) -> np.ndarray:
    """(channels·k², 1, k, k) float32: output channel c·k² + a of a grouped conv with it is channel c at window slot
    a (row a // k, column a % k), torch's ``F.unfold`` order; the same array as a grouped ConvTranspose's weight
    adds each slot back where it came from (``F.fold``)."""
    w = np.zeros((channels, k * k, k * k), dtype=np.float32)
    w[:, np.arange(k * k), np.arange(k * k)] = 1.0
    return w.reshape(channels * k * k, 1, k, k)
