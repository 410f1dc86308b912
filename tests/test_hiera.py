"""Hiera (timm's ``timm.models.hiera``) through `from_torch`: its Unroll and blocks kept whole, the unrolled tokens
kept as the map in its spatial order — mask units as window attention, the q-pool as a 2×2 max pool, a pooled q in
its mask unit as a blocked attention (``halo_blocks`` [unit / 2, unit], halo 0) — against the module, torch form and
ONNX; the fields the spec records; tokens read in the unrolled order, blocks outside an unroll and mask units that
are not the map's blocks refused by name; hiera_tiny_224 at 64 and (slow) 224."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hiera_nets import tiny_hiera
from torch_nets import assert_refused, check_parity, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


@pytest.mark.parametrize("kwargs,shape", [
    ({}, (1, 8, 8)), ({}, (1, 16, 16)), ({"use_expand_proj": False}, (1, 8, 8)), ({"init_values": 0.5}, (1, 8, 8)),
    ({"q_pool": 1}, (1, 8, 8)), ({"mask_unit_attn": (True, True, True)}, (1, 8, 8)),
    ({"mask_unit_attn": (True, False, False)}, (1, 8, 8)), ({}, (1, 8, 16))],
    ids=["8px", "16px_four_units", "no_expand_proj", "layer_scale", "strides_left_at_the_head",
         "unit_attention_everywhere", "global_pooled_q", "8x16"])
def test_tiny_hiera_parity(kwargs, shape):
    """Random weights (a unit LayerNorm or zero bias would hide a part left out): mask units of 4×4 on an 8×8 map
    (one) and a 16×16 one (sixteen), timm's ``use_expand_proj=False`` shortcut (max and mean pools side by side),
    layer scales, q_pool 1 (a stride left unpooled: the head averages tokens still in the unrolled order), mask-unit
    attention in the last stage too (one-token units), global attention with a pooled q, a non-square image."""
    module = randomised_all(tiny_hiera(image=shape[1:] if shape[1] != shape[2] else shape[1], **kwargs))
    check_parity(module, from_torch(module, shape), shape)


def test_mask_units_and_q_pools_recorded():
    nodes = {n["name"]: n for n in from_torch(tiny_hiera(image=16), (1, 16, 16))["nodes"]}
    assert nodes["unroll.map"]["op"] == "reshape" and nodes["unroll.map"]["shape"] == [8, 16, 16]
    assert nodes["blocks.0.attn.attend"]["window"] == [4, 4]
    assert nodes["blocks.1.pool"]["op"] == nodes["blocks.1.attn.q_pool"]["op"] == "maxpool"
    assert nodes["blocks.1.attn.q_pool"]["k"] == nodes["blocks.1.attn.q_pool"]["stride"] == [2, 2]
    assert nodes["blocks.1.attn.attend"]["inputs"] == ["blocks.1.attn.q_pool", "blocks.1.attn.k", "blocks.1.attn.v"]
    assert nodes["blocks.1.attn.attend"]["halo_blocks"] == [2, 4] and nodes["blocks.1.attn.attend"]["halo"] == 0
    assert nodes["blocks.2.attn.attend"]["halo_blocks"] == [1, 2]
    assert nodes["blocks.2.tokens"]["shape"] == [32, 16, 1]  # every stride pooled: the map's order is timm's


class _Stem(nn.Module):
    """Hiera's patch embedding, position embedding and unroll, then `tail` on the unrolled tokens (features of
    `width`) and a classifier."""

    def __init__(self, tail, width: int = 8):
        super().__init__()
        self.net, self.tail, self.fc = tiny_hiera(), tail, nn.Linear(width, 3)

    def forward(self, x):
        net = self.net
        return self.fc(self.tail(net, net.unroll(net._pos_embed(net.patch_embed(x)))))


def test_unrolled_tokens_read_in_order_are_refused():
    """A token picked by index (or any op but a block and the mean) in the unrolled order is another token than the
    spatial map's: refused, after the Unroll and after a block that leaves strides to pool."""
    assert_refused(_Stem(lambda net, x: x[:, 0]), "getitem", "unrolled order", "'net.unroll'",
                   "2 strides not yet pooled")
    assert_refused(_Stem(lambda net, x: net.blocks[1](net.blocks[0](x))[:, 0], 16), "getitem", "'net.blocks.1'",
                   "1 strides not yet pooled")
    assert_refused(_Stem(lambda net, x: net.blocks[0](x).amax(1)), "amax", "unrolled order")


def test_hiera_blocks_outside_an_unroll_and_other_units_are_refused():
    class NoUnroll(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.fc = tiny_hiera(), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.net.blocks[0](self.net.patch_embed(x)).mean(1))

    assert_refused(NoUnroll(), "HieraBlock", "'net.blocks.0'", "no Hiera Unroll ordered")
    # 8×8 mask units under two unrolls of stride 2: timm's four windows are then runs that are no block of the map
    assert_refused(tiny_hiera(image=16, mask_unit_size=(8, 8)), "'blocks.0'", "4 mask units", "4×4 blocks",
                   input_shape=(1, 16, 16))
    module = tiny_hiera()
    module.blocks[1].attn.proj = nn.Sequential(nn.Linear(16, 16))
    assert_refused(module, "'blocks.1'", "Sequential", "nn.Linear")
    module = tiny_hiera()
    module.blocks[0].mlp = nn.Sequential(nn.Linear(8, 8))
    assert_refused(module, "'blocks.0'", "its mlp is a Sequential")


@pytest.mark.parametrize("size", [64, pytest.param(224, marks=pytest.mark.slow)])
def test_library_hiera_tiny(size):
    """hiera_tiny_224: 8×8 mask units, three q-pools (the last stride pooled before the head), random weights."""
    torch.manual_seed(0)
    module = randomised_all(build_module("timm:hiera_tiny_224", {"img_size": size, "num_classes": 10}))
    check_parity(module, from_torch(module, (3, size, size)), (3, size, size), batch=2)
