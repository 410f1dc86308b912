"""Small torch modules several tests build specs from (with `edgecl.arch.from_torch`)."""
import torch
from torch import nn


class ResCat(nn.Module):
    """A custom trunk + classifier with a residual add, a channel concatenation, a depthwise conv and an SE gate."""

    def __init__(self, classes: int = 5, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_a = nn.Conv2d(8, 8, 3, padding=1)
        self.branch_b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.branch_a(x)
        y = torch.cat([x, self.branch_b(x)], dim=1)
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.fc(torch.flatten(self.pool(y * gate), 1))
