"""SAM 2's HieraDet blocks (timm's ``timm.models.hieradet_sam2.MultiScaleBlock``) through `from_torch`, kept whole:
window attention on the map padded to whole windows (the padded keys join the attention, the output cropped), a
q-pool inside the windows as a blocked attention (``halo_blocks`` [w / s, w], halo 0) and a pooled shortcut, global
blocks — against the module, torch form and ONNX; the fields the spec records; other pools and layers refused by
name; hieradet_small's own blocks (without its resized position embedding) at 64 and
224 (slow)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hiera_nets import TinyHieraDet
from torch_nets import assert_refused, check_parity, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


@pytest.mark.parametrize("kwargs,shape", [
    ({}, (1, 8, 8)), ({}, (1, 16, 16)), ({}, (1, 6, 6)), ({}, (1, 10, 6)), ({"init_values": 0.5}, (1, 8, 8)),
    ({"global_att_blocks": (3,)}, (1, 8, 8)), ({"window_spec": (4, 4, 4)}, (1, 8, 8))],
    ids=["8px", "16px", "6px_odd_pooled_sides", "10x6", "layer_scale", "global_block", "4x4_windows"])
def test_tiny_hieradet_parity(kwargs, shape):
    """Random weights (the padded keys' scores are qkv's bias: a zero bias would hide padding left out): 8×8
    windows padding 4×4 and 2×2 maps, a 16×16 image (no padding until stage 3), a 6×6 one (stage 2's map of 3 pools
    to 1: the pooled windows cropped past the shortcut's row), a non-square one, layer scales, a global block,
    windows that tile every map."""
    module = randomised_all(TinyHieraDet(**kwargs))
    check_parity(module, from_torch(module, shape), shape)


def test_padding_pooling_and_crops_recorded():
    nodes = {n["name"]: n for n in from_torch(TinyHieraDet(), (1, 8, 8))["nodes"]}
    assert nodes["net.blocks.0.attn.attend"]["window"] == [4, 4] and "net.blocks.0.pad" not in nodes
    assert nodes["net.blocks.1.attn.attend"]["halo_blocks"] == [2, 4] and nodes["net.blocks.1.attn.attend"]["halo"] == 0
    assert nodes["net.blocks.1.pool"]["op"] == nodes["net.blocks.1.attn.q_pool"]["op"] == "maxpool"
    assert nodes["net.blocks.2.pad"]["pads"] == [0, 0, 4, 4]  # the 4×4 map to one 8×8 window
    assert nodes["net.blocks.2.attn.attend"]["halo_blocks"] == [4, 8]
    assert nodes["net.blocks.2.crop"]["pads"] == [0, 0, -2, -2]  # the pooled window back to the 2×2 shortcut
    assert nodes["net.blocks.3.pad"]["pads"] == [0, 0, 6, 6] and nodes["net.blocks.3.crop"]["pads"] == [0, 0, -6, -6]


def test_other_pools_windows_and_layers_are_refused_by_name():
    module = TinyHieraDet()
    module.net.blocks[1].attn.q_pool = nn.AvgPool2d(2)
    assert_refused(module, "MultiScaleBlock", "'net.blocks.1'", "q-pool is AvgPool2d")
    module = TinyHieraDet()  # overlapping pools: not the cells of the shortcut's pool
    module.net.blocks[1].attn.q_pool = module.net.blocks[1].pool = nn.MaxPool2d(3, 2, padding=1)
    assert_refused(module, "'net.blocks.1'", "q-pool is MaxPool2d(kernel_size=3")
    module = TinyHieraDet()
    module.net.blocks[0].attn.proj = nn.Sequential(nn.Linear(8, 8))
    assert_refused(module, "'net.blocks.0'", "Sequential", "nn.Linear")


def test_library_hieradet_position_embedding_is_refused_by_name():
    """hieradet_small resizes its ``pos_embed`` parameter with F.interpolate in forward: no spec op does that."""
    module = build_module("timm:hieradet_small", {"num_classes": 10})
    assert_refused(module, "interpolate", "pos_embed", "hieradet_sam2.py", input_shape=(3, 64, 64))


class _NoPositions(nn.Module):
    """hieradet_small's patch embedding, blocks and head, its position embedding left out."""

    def __init__(self):
        super().__init__()
        self.net = build_module("timm:hieradet_small", {"num_classes": 10})

    def forward(self, x):
        return self.net.head(self.net.blocks(self.net.patch_embed(x)))


@pytest.mark.parametrize("size", [64, pytest.param(224, marks=pytest.mark.slow)])
def test_library_hieradet_small_blocks(size):
    """Its 16×16 windows pad the 4×4 (at 64) or 14×14 (at 224) map with a pooled q, global blocks, layer scales."""
    torch.manual_seed(0)
    module = randomised_all(_NoPositions())
    check_parity(module, from_torch(module, (3, size, size)), (3, size, size), batch=2)
