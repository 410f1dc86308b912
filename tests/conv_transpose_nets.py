"""User networks with transposed convolutions (`nn.ConvTranspose2d`, the spec's ``conv_transpose``): a tiny U-Net
(a strided encoder, transposed-conv decoders of several strides, paddings, output paddings, groups and dilations, a
skip concatenation and a residual add) for parity and for every method on graphs."""
from __future__ import annotations

import torch
from torch import nn

from edgecl.arch import from_torch


class TinyUNet(nn.Module):
    """Encoder down by 2 twice, decoder up by transposed convs, the skip joined by cat, a grouped output-padded one
    added back, a classifier on the pooled map."""

    def __init__(self, classes: int = 5, in_channels: int = 1, width: int = 8):
        super().__init__()
        w = width
        self.down1 = nn.Sequential(nn.Conv2d(in_channels, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)  # 2×2 → 4×4, the skip's side
        self.fuse = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        # 4×4 → 8×8: k 3, pad 1, output padding 1, two groups, no bias
        self.up1 = nn.ConvTranspose2d(w, w, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.refine = nn.ConvTranspose2d(w, w, 3, padding=2, dilation=2)  # same side: a dilated one
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        skip = self.down1(x)
        h = self.fuse(torch.cat([self.up2(self.down2(skip)), skip], dim=1))
        h = torch.relu(self.bn1(self.up1(h)))
        h = h + self.refine(h)
        return self.fc(h.mean((2, 3)))


class OutputSized(nn.Module):
    """A ConvTranspose2d called with an output_size: torch picks its output padding per call (refused)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(self.conv(x), output_size=x.shape[2:]).mean((2, 3))


def unet_spec(input_shape=(1, 8, 8)) -> dict:
    """TinyUNet's spec for inputs of `input_shape`."""
    return from_torch(TinyUNet(in_channels=input_shape[0]).eval(), tuple(input_shape))
