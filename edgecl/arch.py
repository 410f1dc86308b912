"""Architecture specs: one JSON-able description of a trunk that torch training, the ONNX exporter and the runtime all
build from, so the three can never disagree about shapes or parameter names.

A spec is a dict::

    {"name": "mlp", "input_shape": [64], "layers": [
        {"op": "linear", "name": "fc1", "in": 64, "out": 256}, {"op": "relu"}, ...]}

Ops: ``linear`` (name, in, out, bias=True), ``conv`` (name, in, out, k, stride=1, pad=0, bias=True),
``bn`` (name, ch), ``relu``, ``maxpool`` (k), ``flatten``, ``gap`` (global average pool, then flatten),
``block`` (name, in, out, stride=1: a ResNet basic block, conv-bn-relu-conv-bn + shortcut, then relu).
Every task has its own head ``head.weight`` (classes × feature_dim) and ``head.bias``.
Prunable layers are the trunk's linear and conv weights; their GEMM form is (out, in·k·k).
"""
from __future__ import annotations

import copy
from typing import Any

from edgecl.errors import UsageError

Arch = dict[str, Any]

_REQUIRED = {
    "linear": ("name", "in", "out"),
    "conv": ("name", "in", "out", "k"),
    "bn": ("name", "ch"),
    "relu": (),
    "maxpool": ("k",),
    "flatten": (),
    "gap": (),
    "block": ("name", "in", "out"),
}


def validate(arch: Arch) -> Arch:
    """Check a spec and fill defaults; returns a normalised deep copy. Raises UsageError naming the bad field."""
    if not isinstance(arch, dict) or "layers" not in arch or "input_shape" not in arch:
        raise UsageError("architecture spec must be a dict with 'input_shape' and 'layers'")
    arch = copy.deepcopy(arch)
    shape = list(arch["input_shape"])
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UsageError(f"architecture input_shape must be positive ints, got {arch['input_shape']!r}")
    names: set[str] = set()
    for i, layer in enumerate(arch["layers"]):
        op = layer.get("op")
        if op not in _REQUIRED:
            raise UsageError(f"architecture layer {i}: unknown op {op!r} (known: {sorted(_REQUIRED)})")
        for key in _REQUIRED[op]:
            if key not in layer:
                raise UsageError(f"architecture layer {i} ({op}): missing field {key!r}")
        if "name" in layer:
            if layer["name"] in names or layer["name"].startswith("head"):
                raise UsageError(f"architecture layer {i}: duplicate or reserved name {layer['name']!r}")
            names.add(layer["name"])
        layer.setdefault("bias", op in ("linear", "conv"))
        if op == "conv":
            layer.setdefault("stride", 1)
            layer.setdefault("pad", 0)
        if op == "block":
            layer.setdefault("stride", 1)
        shape = _next_shape(layer, shape, i)
    if len(shape) != 1:
        raise UsageError(f"architecture must end in a flat feature vector, ends in shape {shape}")
    arch["feature_dim"] = shape[0]
    arch.setdefault("name", "custom")
    return arch


def _next_shape(layer: dict, shape: list[int], i: int) -> list[int]:
    op = layer["op"]
    if op == "linear":
        if len(shape) != 1 or shape[0] != layer["in"]:
            raise UsageError(f"architecture layer {i} ({layer['name']}): expects {layer['in']} inputs, gets {shape}")
        return [layer["out"]]
    if op in ("conv", "block"):
        if len(shape) != 3 or shape[0] != layer["in"]:
            raise UsageError(f"architecture layer {i} ({layer['name']}): expects {layer['in']} channels, gets {shape}")
        k, s, p = (layer["k"], layer["stride"], layer["pad"]) if op == "conv" else (3, layer["stride"], 1)
        h, w = ((d + 2 * p - k) // s + 1 for d in shape[1:])
        if h <= 0 or w <= 0:
            raise UsageError(f"architecture layer {i} ({layer['name']}): output would be empty from {shape}")
        return [layer["out"], h, w]
    if op == "bn":
        if shape[0] != layer["ch"]:
            raise UsageError(f"architecture layer {i} ({layer['name']}): {layer['ch']} channels, gets {shape}")
        return shape
    if op == "maxpool":
        return [shape[0]] + [d // layer["k"] for d in shape[1:]]
    if op == "flatten":
        n = 1
        for d in shape:
            n *= d
        return [n]
    if op == "gap":
        return [shape[0]]
    return shape  # relu


def shapes_after(arch: Arch) -> list[list[int]]:
    """Activation shape after each layer (without batch), for compaction and memory estimates."""
    shape, out = list(arch["input_shape"]), []
    for i, layer in enumerate(arch["layers"]):
        shape = _next_shape(layer, shape, i)
        out.append(shape)
    return out


def param_shapes(arch: Arch, n_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every trunk tensor (BatchNorm running statistics included) with its shape; the head too if n_classes given."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in arch["layers"]:
        op, name = layer["op"], layer.get("name")
        if op == "linear":
            shapes[f"{name}.weight"] = (layer["out"], layer["in"])
            if layer["bias"]:
                shapes[f"{name}.bias"] = (layer["out"],)
        elif op == "conv":
            shapes[f"{name}.weight"] = (layer["out"], layer["in"], layer["k"], layer["k"])
            if layer["bias"]:
                shapes[f"{name}.bias"] = (layer["out"],)
        elif op == "bn":
            shapes.update(_bn_shapes(name, layer["ch"]))
        elif op == "block":
            cin, cout = layer["in"], layer["out"]
            shapes[f"{name}.conv1.weight"] = (cout, cin, 3, 3)
            shapes.update(_bn_shapes(f"{name}.bn1", cout))
            shapes[f"{name}.conv2.weight"] = (cout, cout, 3, 3)
            shapes.update(_bn_shapes(f"{name}.bn2", cout))
            if has_shortcut(layer):
                shapes[f"{name}.short.weight"] = (cout, cin, 1, 1)
                shapes.update(_bn_shapes(f"{name}.shortbn", cout))
    if n_classes is not None:
        shapes["head.weight"] = (n_classes, arch["feature_dim"])
        shapes["head.bias"] = (n_classes,)
    return shapes


def dense_params(arch: Arch, n_classes: int | None = None) -> int:
    """Numbers in one dense model of this spec: every trunk tensor (BatchNorm statistics included), plus a head of
    `n_classes` when given. The one place dense sizes are counted (audit, inspect, methods' reports, sessions)."""
    total = 0
    for shape in param_shapes(arch, n_classes).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def has_shortcut(block: dict) -> bool:
    """A block needs a projection shortcut when it changes channels or resolution."""
    return block["in"] != block["out"] or block["stride"] != 1


def _bn_shapes(name: str, ch: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{k}": (ch,) for k in ("weight", "bias", "running_mean", "running_var")}


def prunable(arch: Arch) -> list[str]:
    """Names of the trunk's linear/conv weight tensors, in forward order."""
    return [n for n, s in param_shapes(arch).items() if n.endswith(".weight") and len(s) in (2, 4)]


def gemm_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(P, Q) GEMM view of a linear or conv weight: rows are output units, columns are inputs × kernel positions."""
    q = 1
    for d in shape[1:]:
        q *= d
    return shape[0], q


def is_sequential(arch: Arch) -> bool:
    """True when there is no residual block, so each layer's input units are the previous layer's outputs."""
    return all(layer["op"] != "block" for layer in arch["layers"])


def unit_sources(arch: Arch) -> dict[str, tuple[str | None, int]]:
    """For each linear/conv layer of a sequential arch: (layer whose output units feed its inputs, input columns per
    source unit). The repeat is H·W where a flatten sits between a conv and a linear (channel-major order); None
    means the layer reads the network input. Node masks and structural compaction use this map."""
    if not is_sequential(arch):
        raise UsageError(f"architecture {arch.get('name')!r} has residual blocks; unit map needs a sequential arch")
    out: dict[str, tuple[str | None, int]] = {}
    src, repeat, shape = None, 1, list(arch["input_shape"])
    for i, layer in enumerate(arch["layers"]):
        if layer["op"] == "flatten" and len(shape) == 3:
            repeat *= shape[1] * shape[2]
        if layer["op"] in ("linear", "conv"):
            out[layer["name"]] = (src, repeat)
            src, repeat = layer["name"], 1
        shape = _next_shape(layer, shape, i)
    return out


def last_layer(arch: Arch) -> str:
    """The prunable layer whose output units feed the heads."""
    return prunable(arch)[-1].rsplit(".", 1)[0]


PRESETS = ("mlp", "lenet", "resnet")


def check_preset(name: str) -> None:
    """Refuse an unknown preset name before anything is built."""
    if name not in PRESETS:
        raise UsageError(f"unknown architecture preset {name!r} (known: {', '.join(PRESETS)})")


def preset(name: str, input_shape: tuple[int, ...] = (1, 8, 8), width: int = 1) -> Arch:
    """Built-in trunks sized for 8×8 digits: 'mlp' (2×256 hidden by default), 'lenet', 'resnet'.
    `width` scales hidden sizes (the runtime benchmarks use a wide MLP)."""
    check_preset(name)
    flat = 1
    for d in input_shape:
        flat *= d
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
