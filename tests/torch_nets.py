"""Real user networks for the graph tests (from_torch, compaction, runtime parity): torchvision, timm and a custom
module with every structure the channel map follows. Imports torch, torchvision and timm."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports
from edgecl.arch.fx_import import tensors_of

ensure_torchvision_imports()
import timm  # noqa: E402
import torchvision  # noqa: E402


class ResCat(nn.Module):
    """A custom trunk + classifier with a residual add, a channel concatenation, a depthwise conv and an SE gate."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
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


def randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (fresh modules have identity BatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=g))


MODELS = {
    "torchvision resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "torchvision mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25),
    "timm mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),
    "custom residual + concat": ResCat,
}


def module_and_spec(name: str, input_shape: tuple[int, ...] = (3, 32, 32)) -> tuple[nn.Module, dict]:
    """A seeded module of MODELS (eval mode, random BatchNorm statistics) and its spec."""
    torch.manual_seed(0)
    module = MODELS[name]().eval()
    randomise_batchnorm(module)
    return module, from_torch(module, input_shape)


@functools.lru_cache(maxsize=None)
def spec_and_weights(name: str, input_shape: tuple[int, ...] = (3, 32, 32)) -> tuple[dict, dict[str, np.ndarray]]:
    """The spec of a MODELS network and its tensors, the module's classifier as the head (cached: tracing and
    torchvision's constructors take seconds). Callers must copy the tensors before changing them."""
    module, spec = module_and_spec(name, input_shape)
    weights = tensors_of(module, spec)
    classifier = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    weights.update({"head.weight": classifier.weight.detach().numpy().copy(),
                    "head.bias": classifier.bias.detach().numpy().copy()})
    return spec, weights
