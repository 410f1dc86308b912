"""Torch side of an architecture spec: initial parameters and one functional forward.

Methods keep their own (often re-parametrised) tensors and hand this forward a dict of effective tensors, so every
method runs the exact graph the exporter emits. Convolutions are plain conv2d; their GEMM view is (out, in·k·k).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from edgecl.arch import Arch, has_shortcut, param_shapes

Params = dict[str, torch.Tensor]
# Optional hook applied to each linear/conv/block output, keyed by layer name (RGO's feature encoding, AGS-CL's
# activation statistics). It receives (layer_name, activation) and returns the activation to continue with.
Hook = Callable[[str, torch.Tensor], torch.Tensor]


def init_params(arch: Arch, n_classes: int | None = None, generator: torch.Generator | None = None) -> Params:
    """Kaiming-uniform weights (torch's nn.Linear/Conv2d default), zero biases, identity BatchNorm."""
    out: Params = {}
    for name, shape in param_shapes(arch, n_classes).items():
        if name.endswith("running_var"):
            out[name] = torch.ones(shape)
        elif name.endswith("running_mean"):
            out[name] = torch.zeros(shape)
        elif len(shape) == 1:
            is_bn_scale = name.endswith(".weight")
            out[name] = torch.ones(shape) if is_bn_scale else torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            out[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return out


def init_head(arch: Arch, n_classes: int, generator: torch.Generator | None = None) -> Params:
    """A fresh head for one task."""
    full = init_params({**arch, "layers": []}, n_classes, generator)
    return {k: v for k, v in full.items() if k.startswith("head.")}


def forward(arch: Arch, params: Params, x: torch.Tensor, *, train: bool = False, hook: Hook | None = None,
            head: bool = True) -> torch.Tensor:
    """Run the trunk (and the head in `params`) on a batch. BatchNorm uses batch statistics and updates the
    running statistics in `params` when `train` is true, running statistics otherwise."""
    h = x.reshape((x.shape[0],) + tuple(arch["input_shape"]))
    for layer in arch["layers"]:
        op, name = layer["op"], layer.get("name")
        if op == "linear":
            h = F.linear(h, params[f"{name}.weight"], params.get(f"{name}.bias"))
        elif op == "conv":
            h = F.conv2d(h, params[f"{name}.weight"], params.get(f"{name}.bias"), layer["stride"], layer["pad"])
        elif op == "bn":
            h = _bn(params, name, h, train)
        elif op == "relu":
            h = F.relu(h)
        elif op == "maxpool":
            h = F.max_pool2d(h, layer["k"])
        elif op == "flatten":
            h = h.flatten(1)
        elif op == "gap":
            h = h.mean(dim=(2, 3))
        elif op == "block":
            h = _block(params, layer, h, train)
        if hook is not None and op in ("linear", "conv", "block"):
            h = hook(name, h)
    if head:
        h = F.linear(h, params["head.weight"], params["head.bias"])
    return h


def _bn(params: Params, name: str, h: torch.Tensor, train: bool) -> torch.Tensor:
    return F.batch_norm(h, params[f"{name}.running_mean"], params[f"{name}.running_var"], params[f"{name}.weight"],
                        params[f"{name}.bias"], training=train, momentum=0.1, eps=1e-5)


def _block(params: Params, layer: dict, h: torch.Tensor, train: bool) -> torch.Tensor:
    name = layer["name"]
    y = F.conv2d(h, params[f"{name}.conv1.weight"], None, layer["stride"], 1)
    y = F.relu(_bn(params, f"{name}.bn1", y, train))
    y = F.conv2d(y, params[f"{name}.conv2.weight"], None, 1, 1)
    y = _bn(params, f"{name}.bn2", y, train)
    if has_shortcut(layer):
        h = _bn(params, f"{name}.shortbn", F.conv2d(h, params[f"{name}.short.weight"], None, layer["stride"], 0),
                train)
    return F.relu(y + h)


def to_numpy(params: Params) -> dict:
    """Detached float32 numpy copies, the form `PackedModel` holds."""
    return {k: v.detach().cpu().to(torch.float32).numpy().copy() for k, v in params.items()}


def from_numpy(params: dict, device: str | torch.device = "cpu") -> Params:
    return {k: torch.from_numpy(v.copy()).to(device) for k, v in params.items()}
