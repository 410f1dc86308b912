"""Small torch modules several tests (and tools/agscl_graphs.py) build specs from (`edgecl.arch.from_torch`), the
digits as the 3-channel images ImageNet-style networks take, and a one-torch-thread fixture for their training."""
import numpy as np
import pytest
import torch
from torch import nn

from edgecl.train.data import Stream, make_stream


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread, as `edgecl train` uses: on a busy 2-core machine two threads made small convolutions ~10×
    slower in wall time (measured 20 s vs 1.9 s for a resnet-preset run). Modules that train convs take it with
    `_threads = one_torch_thread`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rgb_digits(stream: str, size: int, n_tasks: int) -> Stream:
    """A digits stream as 3-channel size×size images (bilinear upsampling, the channel repeated)."""
    def up(x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(x).repeat(1, 3, 1, 1)
        return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear").numpy()

    return Stream.from_arrays(f"{stream}-rgb{size}", [(up(t.x_train), t.y_train, up(t.x_test), t.y_test)
                                                      for t in make_stream(stream, n_tasks, seed=0).tasks])


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
