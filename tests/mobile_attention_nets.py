"""Tiny networks for the mobile attention families `from_torch` follows beyond `layer_nets_vit`: SwiftFormer's
efficient additive attention (timm's Block: local representation, the attention, its conv MLP, layer scales). Small
enough for every method on real digit tasks (tests/test_methods_on_graphs.py)."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.swiftformer import Block as SwiftFormerBlock  # noqa: E402


class TinySwiftFormer(nn.Module):
    """SwiftFormer in small: a conv stem with BatchNorm and a sigmoid, timm's SwiftFormer Block (its local
    representation, the additive attention over the map's positions, the conv MLP, layer scales), the mean and a
    Linear. The sigmoid keeps the digits' zero background off exact zeros: F.normalize of a zero vector is x / eps,
    whose gradient is 1/eps (1e12), so with zero-initialised biases and BatchNorm at its running statistics (RGO's
    SGD) the first step would diverge, in torch as in the spec."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.Sigmoid())
        self.block = SwiftFormerBlock(width, mlp_ratio=2)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean([2, 3]))


def swiftformer_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinySwiftFormer(in_channels=input_shape[0]), tuple(input_shape))
