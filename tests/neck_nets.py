"""Small user networks with a feature-pyramid neck (kept apart from `layer_nets`, which holds one net per layer
family and is at its size limit): `TinyFPN` up-samples bilinearly in every form `from_torch` follows. Imports torch."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from edgecl.arch import from_torch


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class TinyFPN(nn.Module):
    """An FPN-style neck on a three-level backbone (8×8, 4×4, 2×2 on an 8×8 input): 1×1 lateral convs, the top-down
    path adding each coarser level bilinearly up-sampled — ``F.interpolate(scale_factor=2)`` (align_corners=False),
    ``nn.UpsamplingBilinear2d`` (align_corners=True) and ``F.interpolate(size=…, align_corners=True)`` from the top
    straight to the finest level — then a 3×3 smoothing conv, the mean and a Linear classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        w = width
        self.c1, self.c2, self.c3 = _conv_bn(in_channels, w), _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w, 2)
        self.lat1, self.lat2, self.lat3 = nn.Conv2d(w, w, 1), nn.Conv2d(2 * w, w, 1), nn.Conv2d(2 * w, w, 1)
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)
        self.smooth = _conv_bn(w, w)
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        c1 = self.c1(x)
        c2 = self.c2(c1)
        c3 = self.c3(c2)
        p3 = self.lat3(c3)
        p2 = self.lat2(c2) + F.interpolate(p3, scale_factor=2, mode="bilinear", align_corners=False)
        top = F.interpolate(p3, size=tuple(c1.shape[-2:]), mode="bilinear", align_corners=True)
        p1 = self.lat1(c1) + self.up(p2) + top
        return self.fc(self.smooth(p1).mean((2, 3)))


def fpn_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyFPN(in_channels=input_shape[0]), tuple(input_shape))
