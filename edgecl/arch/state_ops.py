"""Shapes of the two ops of EfficientViM's hidden-state mixer (HSM-SSD, timm's ``timm.models.efficientvim``), which
carry a map's positions into S hidden states and back:

- ``state_pool`` (inputs x ``(C, H, W)``, logits ``(S, H, W)``, b ``(S, H, W)``): h[c, s] = Σ_n x[c, n] ·
  softmax_n(logits[s])[n] · b[s, n], n over the H·W positions → ``(C, S, 1)``, S state tokens of C channels;
- ``state_read`` (inputs h ``(C, S, 1)``, c ``(S, H, W)``): y[c, n] = Σ_s h[c, s] · c[s, n] → ``(C, H, W)``.

Output channel i reads channel i of x (of h) only; the S channels of the logits, b and c become token positions, so
those are pinned and ordered (`edgecl.arch.channels`). Torch forms: `edgecl.train.models`; ONNX:
`edgecl.graph.state_onnx`."""
from __future__ import annotations

import math

from edgecl.errors import UsageError

STATE_OPS = ("state_pool", "state_read")


def state_shape(op: str, ins: list[list[int]], where: str) -> list[int]:
    """The output shape of a ``state_pool`` or ``state_read`` node from its inputs' shapes; UsageError otherwise."""
    if op == "state_pool":
        x, logits, b = ins
        if len(x) != 3 or len(logits) != 3 or logits != b or logits[1:] != x[1:]:
            raise UsageError(f"{where}: state_pool needs a (channels, height, width) map and logits and b of one "
                             f"(states, height, width) shape, gets {ins}")
        return [x[0], logits[0], 1]
    h, c = ins
    if len(h) != 3 or len(c) != 3 or h[2] != 1 or h[1] != c[0]:
        raise UsageError(f"{where}: state_read needs (channels, states, 1) states and a (states, height, width) "
                         f"map, gets {ins}")
    return [h[0], *c[1:]]


def state_intermediates(op: str, ins: list[list[int]]) -> int:
    """Elements per sample on the way (an upper bound): state_pool's softmax, its product with b and their
    transpose, the map's flat copy; state_read's flat copies of h, c and the output."""
    if op == "state_pool":
        x, logits, _ = ins
        return 3 * math.prod(logits) + math.prod(x)
    h, c = ins
    return math.prod(h) + math.prod(c) + h[0] * math.prod(c[1:])
