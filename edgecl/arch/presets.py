"""The built-in trunks, sized for 8×8 digits by default: ordinary specs, written as layer lists for brevity and
normalised by `validate` like any other spec."""
from __future__ import annotations

import math

from edgecl.arch.spec import Arch, validate
from edgecl.errors import UsageError

PRESETS = ("mlp", "lenet", "resnet")


def check_preset(name: str) -> None:
    """Refuse an unknown preset name before anything is built."""
    if name not in PRESETS:
        raise UsageError(f"unknown architecture preset {name!r} (known: {', '.join(PRESETS)})")


def preset(name: str, input_shape: tuple[int, ...] = (1, 8, 8), width: int = 1) -> Arch:
    """'mlp' (2×256 hidden by default), 'lenet', 'resnet' (two basic blocks); `width` scales hidden sizes (the
    runtime benchmarks use a wide MLP)."""
    check_preset(name)
    flat = math.prod(input_shape)
    if name == "mlp":
        h = 256 * width
        layers = [{"op": "flatten"}, {"op": "linear", "name": "fc1", "in": flat, "out": h}, {"op": "relu"},
                  {"op": "linear", "name": "fc2", "in": h, "out": h}, {"op": "relu"}]
    elif name in ("lenet", "resnet") and len(input_shape) != 3:
        raise UsageError(f"architecture {name!r} needs image inputs (channels, height, width), got {input_shape}")
    elif name == "lenet":
        c, hh, ww = input_shape
        c1, c2, f = 20 * width, 50 * width, 256 * width
        layers = [{"op": "conv", "name": "conv1", "in": c, "out": c1, "k": 3, "pad": 1}, {"op": "relu"},
                  {"op": "maxpool", "k": 2},
                  {"op": "conv", "name": "conv2", "in": c1, "out": c2, "k": 3, "pad": 1}, {"op": "relu"},
                  {"op": "maxpool", "k": 2}, {"op": "flatten"},
                  {"op": "linear", "name": "fc1", "in": c2 * (hh // 4) * (ww // 4), "out": f}, {"op": "relu"}]
    else:  # resnet
        c = input_shape[0]
        w1, w2 = 16 * width, 32 * width
        layers = [{"op": "conv", "name": "stem", "in": c, "out": w1, "k": 3, "pad": 1, "bias": False},
                  {"op": "bn", "name": "stembn", "ch": w1}, {"op": "relu"},
                  {"op": "block", "name": "b1", "in": w1, "out": w1},
                  {"op": "block", "name": "b2", "in": w1, "out": w2, "stride": 2}, {"op": "gap"}]
    return validate({"name": name, "input_shape": list(input_shape), "layers": layers})
