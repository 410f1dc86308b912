"""EfficientViM's hidden-state mixer (timm's HSMSSD) in a small user network, for the parity tests and every
method's and AGS-CL's graph runs."""
from __future__ import annotations

import numpy as np
import torch
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


def vim_head(module: nn.Module) -> dict[str, np.ndarray]:
    """timm's EfficientViM head, Σ_i softmax(weights)_i·heads[i](x_i), as the one linear head of the features side by
    side: [s_0·W_0 … s_n·W_n] and Σ_i s_i·b_i (computed here from the module, not by edgecl); a distilled model's
    two such sums averaged."""
    def weighted(weights: torch.Tensor, heads: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
        s = weights.softmax(-1)
        return (torch.cat([s[i] * head.weight for i, head in enumerate(heads)], dim=1),
                sum(s[i] * head.bias for i, head in enumerate(heads)))

    with torch.no_grad():
        pairs = [weighted(module.weights, module.heads)]
        if hasattr(module, "heads_dist"):
            pairs.append(weighted(module.weights_dist, module.heads_dist))
        weight, bias = (sum(p[k] for p in pairs) / len(pairs) for k in (0, 1))
    return {"head.weight": weight.numpy().copy(), "head.bias": bias.numpy().copy()}


def tiny_vim(**kwargs) -> nn.Module:
    """A small timm EfficientViM: three stages of one block (their hidden states and the last map in its head)."""
    return EfficientViM(**{"num_classes": 3, "embed_dim": (16, 24, 32), "depths": (1, 1, 1), "state_dim": (4, 3, 2),
                           "mlp_ratio": 2.0, **kwargs})
