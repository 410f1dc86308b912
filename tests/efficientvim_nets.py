"""EfficientViM's hidden-state mixer (timm's HSMSSD) and blocks in small user networks, for the parity tests and
every method's and AGS-CL's graph runs, and a small timm EfficientViM (its head: `torch_nets.weighted_heads`)."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.models.efficientvim import HSMSSD, EfficientViM, EfficientViMBlock  # noqa: E402


class TinyHsmNet(nn.Module):
    """A conv stem with BatchNorm and ReLU, the HSM-SSD mixer (its map output, the block's residual added, as
    EfficientViM's blocks do), the mean and a Linear."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, states: int = 5,
                 expand: float = 1.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.mixer = HSMSSD(width, ssd_expand=expand, state_dim=states)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        y, _ = self.mixer(x)
        return self.fc((x + y).mean([2, 3]))


def hsm_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyHsmNet(in_channels=input_shape[0]), tuple(input_shape))


class TinyVimNet(nn.Module):
    """A conv stem with BatchNorm and ReLU, `depth` EfficientViM blocks (dwconv, mixer, dwconv and FFN, each
    through its σ(α[i]) gate), the mean and a Linear."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, states: int = 4, depth: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(EfficientViMBlock(width, mlp_ratio=2.0, state_dim=states) for _ in range(depth))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.fc(x.mean([2, 3]))


def vim_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyVimNet(in_channels=input_shape[0]), tuple(input_shape))


def tiny_vim(**kwargs) -> nn.Module:
    """A small timm EfficientViM: three stages of one block (their hidden states and the last map in its head)."""
    return EfficientViM(**{"num_classes": 3, "embed_dim": (16, 24, 32), "depths": (1, 1, 1), "state_dim": (4, 3, 2),
                           "mlp_ratio": 2.0, **kwargs})
