"""SHViT (timm's ``timm.models.shvit``) through `from_torch`: its single-head self-attention (``SHSA``) kept whole —
a channel split, GroupNorm1 on the attended part, one head of qk_dim over every position, the rest passed by and
concatenated, ReLU and a Conv2dNorm — and the blocks around it traced, against the module, torch form and ONNX;
the fields the spec records; other layers in its places refused by name; shvit_s1 at 64 (about two seconds)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_nets_vit import TinySHViT
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


def _randomised(module: nn.Module) -> nn.Module:
    """Every weight drawn, and the BatchNorms' statistics too (timm starts proj's and the FFN's BatchNorm at weight
    0, which would hide the attention from a parity check)."""
    randomised_all(module)
    randomise_batchnorm(module)
    return module.eval()


@pytest.mark.parametrize("kwargs,image", [({}, 8), ({"pdim": 16}, 8), ({"qk": 8, "pdim": 4}, 12), ({}, 16)],
                         ids=["split", "whole_map", "qk8_6x6", "8x8_map"])
def test_tiny_shvit_parity(kwargs, image):
    module = _randomised(TinySHViT(**kwargs))
    spec = from_torch(module, (1, image, image))
    check_parity(module, spec, (1, image, image))


def test_split_and_single_head_are_recorded():
    spec = from_torch(_randomised(TinySHViT()), (1, 8, 8))
    nodes = {n["name"]: n for n in spec["nodes"]}
    attn = "block.mixer.m"
    assert (nodes[f"{attn}.x1"]["start"], nodes[f"{attn}.x1"]["stop"]) == (0, 8)
    assert (nodes[f"{attn}.x2"]["start"], nodes[f"{attn}.x2"]["stop"]) == (8, 16)
    assert nodes[f"{attn}.pre_norm"]["over"] == "map"
    assert [nodes[f"{attn}.{p}"]["stop"] - nodes[f"{attn}.{p}"]["start"] for p in "qkv"] == [4, 4, 8]
    assert nodes[f"{attn}.attend"]["heads"] == 1 and nodes[f"{attn}.attend"]["scale"] == pytest.approx(0.5)
    assert nodes[f"{attn}.cat"]["inputs"] == [f"{attn}.attend", f"{attn}.x2"]


def test_other_layers_in_shvit_places_are_refused_by_name():
    module = TinySHViT()
    module.block.mixer.m.pre_norm = nn.GroupNorm(2, 8)
    assert_refused(module, "SHSA", "block.mixer.m", "2 groups", "GroupNorm of one group")
    module = TinySHViT()
    module.block.mixer.m.qkv = nn.Conv2d(8, 16, 1)
    assert_refused(module, "block.mixer.m", "Conv2d", "Conv2dNorm")
    module = TinySHViT()
    module.block.mixer.m.proj = nn.Sequential(nn.Identity(), module.block.mixer.m.proj[1])
    assert_refused(module, "block.mixer.m", "proj.0", "Identity")


def test_library_shvit_s1_at_64():
    torch.manual_seed(0)
    module = build_module("timm:shvit_s1", {}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
