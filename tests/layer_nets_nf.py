"""A tiny NF-ResNet (timm's NormFreeNet in small) for the weight-standardised convolution: timm's ScaledStdConv2d
in the stem and in NormFreeBlocks (α/β residual scaling, a DownsampleAvg shortcut, a grouped 3×3), small enough for
every method on real digit tasks (tests/test_methods_on_graphs.py, tests/test_agscl_graphs.py)."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()
from timm.layers import GroupNormAct, ScaledStdConv2d, StdConv2d, StdConv2dSame  # noqa: E402
from timm.models.nfnet import NormFreeBlock  # noqa: E402

RELU_GAMMA = 1.7139588594436646  # timm's _nonlin_gamma["relu"]


class TinyNFNet(nn.Module):
    """Stem (ScaledStdConv2d 3×3), a downsampling NormFreeBlock (avg-pool + 1×1 standardised conv shortcut, 3×3 in
    groups of 4), an identity-shortcut block, final ReLU, average pooling. `gains` draws every gain at random (timm
    starts each block's last gain at 0, which would hide the residual branch)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8, gains: bool = True):
        super().__init__()
        conv = partial(ScaledStdConv2d, gamma=RELU_GAMMA, eps=1e-5)
        self.stem = conv(in_channels, width, 3, stride=1)
        expected = 1.0
        self.block1 = NormFreeBlock(width, 2 * width, stride=2, alpha=0.2, beta=1.0, bottle_ratio=1.0, group_size=4,
                                    act_layer=nn.ReLU, conv_layer=conv)
        expected += 0.2 ** 2
        self.block2 = NormFreeBlock(2 * width, 2 * width, alpha=0.2, beta=expected ** -0.5, bottle_ratio=0.5,
                                    act_layer=nn.ReLU, conv_layer=conv)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * width, classes)
        if gains:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.endswith(".gain"):
                        p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)

    def forward(self, x):
        return self.fc(self.act(self.block2(self.block1(self.stem(x)))).mean((2, 3)))


def nf_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyNFNet(in_channels=input_shape[0]), tuple(input_shape))


def shared_model(arch: dict, params: dict, n_tasks: int = 1):
    """A finetune-shaped PackedModel: the trunk of `params` shared by `n_tasks` tasks, their heads the same."""
    from edgecl.deltas import PackedModel, TaskInfo

    trunk = {k: v for k, v in params.items() if not k.startswith("head.")}
    heads = {k: v for k, v in params.items() if k.startswith("head.")}
    kinds = {**{k: {"kind": "shared"} for k in trunk}, **{k: {"kind": "task"} for k in heads}}
    return PackedModel(arch, "finetune", {}, kinds, trunk, [TaskInfo(f"t{t}", heads["head.bias"].shape[0])
                                                            for t in range(n_tasks)], [heads] * n_tasks, {})


class TinyStdNet(nn.Module):
    """BiT's StdConv2d (no gain) and NFNet's skipinit gain (``out.mul_(self.skipinit_gain)``, a learned number timm
    starts at 0): a StdConv2d stem, a downsampling NormFreeBlock of StdConv2dSame convs (dynamic "same" padding,
    stride 2) and an identity-shortcut one of ScaledStdConv2d, both with skipinit gains drawn at random."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = StdConv2d(in_channels, width, 3, eps=1e-8)
        def same(*args, gain_init=None, **kwargs):  # NormFreeBlock passes ScaledStdConv2d's gain_init
            return StdConv2dSame(*args, eps=1e-8, **kwargs)

        self.block1 = NormFreeBlock(width, 2 * width, stride=2, alpha=0.2, beta=1.0, bottle_ratio=1.0, group_size=4,
                                    act_layer=nn.ReLU, conv_layer=same, skipinit=True)
        self.block2 = NormFreeBlock(2 * width, 2 * width, alpha=0.2, beta=0.9, bottle_ratio=0.5, skipinit=True,
                                    act_layer=nn.ReLU, conv_layer=partial(ScaledStdConv2d, gamma=RELU_GAMMA))
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * width, classes)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith((".gain", "skipinit_gain")):
                    p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)

    def forward(self, x):
        return self.fc(self.act(self.block2(self.block1(self.stem(x)))).mean((2, 3)))


def std_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyStdNet(in_channels=input_shape[0]), tuple(input_shape))


class TinyGroupNormNet(nn.Module):
    """BiT's normalisation in small: nn.GroupNorm of 4 groups after a StdConv2d stem, then a residual pair of convs
    each followed by timm's GroupNormAct (2 groups, ReLU), the second without an affine; weights and biases drawn at
    random (a fresh GroupNorm's are 1 and 0, which would hide them)."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = StdConv2d(in_channels, width, 3, padding=1, eps=1e-8)
        self.norm = nn.GroupNorm(4, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm1 = GroupNormAct(width, 2, act_layer=nn.ReLU)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.norm2 = GroupNormAct(width, 2, affine=False, act_layer=nn.ReLU)
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            for p in (*self.norm.parameters(), *self.norm1.parameters()):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) + 0.5)

    def forward(self, x):
        h = torch.relu(self.norm(self.stem(x)))
        h = h + self.norm2(self.conv2(self.norm1(self.conv1(h))))
        return self.fc(h.mean((2, 3)))


def group_norm_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyGroupNormNet(in_channels=input_shape[0]), tuple(input_shape))
