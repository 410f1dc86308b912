"""Networks with graph structure shared by the tests (and `tools/methods_on_graphs.py`): `ResCat`, a custom trunk
with a residual add, a channel concatenation, a depthwise convolution and a squeeze-and-excitation gate, and the
digits streams at the 3×32×32 size torchvision/timm image models expect."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ResCat(nn.Module):
    """A custom trunk + classifier with a residual add, a channel concatenation, a depthwise conv and an SE gate."""

    def __init__(self, classes: int = 5, in_channels: int = 3, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.branch_a = nn.Conv2d(w, w, 3, padding=1)
        self.branch_b = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(2 * w, w // 2, 1), nn.Conv2d(w // 2, 2 * w, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.branch_a(x)
        y = torch.cat([x, self.branch_b(x)], dim=1)
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.fc(torch.flatten(self.pool(y * gate), 1))


def rescat_spec(input_shape=(1, 8, 8), width: int = 8) -> dict:
    """ResCat's spec for inputs of `input_shape` (`width` channels in the stem and each branch)."""
    from edgecl.arch import from_torch

    return from_torch(ResCat(in_channels=input_shape[0], width=width), tuple(input_shape))


def upsampled(stream, size: int = 32, channels: int = 3):
    """The same tasks with each 8×8 digit enlarged (nearest) to size×size and repeated over `channels`: the input
    shape of ImageNet-style networks (whose five stride-2 stages would shrink 8×8 to nothing useful)."""
    from edgecl.train.data import Stream

    k = size // stream.input_shape[-1]

    def grow(x: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(np.repeat(x, k, axis=2), k, axis=3), channels, axis=1)

    tasks = [(grow(t.x_train), t.y_train, grow(t.x_test), t.y_test) for t in stream.tasks]
    return Stream.from_arrays(f"{stream.name}@{channels}x{size}x{size}", tasks)


def dwres_spec(input_shape=(1, 8, 8)) -> dict:
    """A MobileNet-style residual block as a spec: stem conv, depthwise conv + BatchNorm, pointwise conv + BatchNorm
    added back to the stem. The depthwise rows, both BatchNorms and both convs' rows are one channel group."""
    from edgecl.arch import validate

    c = input_shape[0]
    return validate({"name": "dwres", "input_shape": list(input_shape), "nodes": [
        {"name": "stem", "op": "conv", "inputs": ["input"], "in": c, "out": 6, "k": 3, "pad": 1},
        {"name": "stem_act", "op": "relu", "inputs": ["stem"]},
        {"name": "dw", "op": "conv", "inputs": ["stem_act"], "in": 6, "out": 6, "k": 3, "pad": 2, "dilation": 2,
         "groups": 6},
        {"name": "dwbn", "op": "bn", "inputs": ["dw"], "ch": 6},
        {"name": "dw_act", "op": "relu6", "inputs": ["dwbn"]},
        {"name": "pw", "op": "conv", "inputs": ["dw_act"], "in": 6, "out": 6, "k": 1, "bias": False},
        {"name": "pwbn", "op": "bn", "inputs": ["pw"], "ch": 6},
        {"name": "add", "op": "add", "inputs": ["pwbn", "stem_act"]},
        {"name": "pool", "op": "gap", "inputs": ["add"]},
        {"name": "flat", "op": "flatten", "inputs": ["pool"]}]})
