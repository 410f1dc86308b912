"""Twins (timm's ``timm.models.twins``) through `from_torch`: its locally grouped attention (windows on the map,
zero-padded where they do not tile it, cropped after) and global sub-sampled attention (keys and values of the map
reduced by a strided conv and a LayerNorm) against the module, torch form and ONNX; the fields the spec records;
other layers in their places refused by name; the library's small models at 64 (slow)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_nets_vit import tiny_twins
from torch_nets import assert_refused, check_parity, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


@pytest.mark.parametrize("kwargs", [{}, {"window": 2}, {"window": 4}, {"sr": 4}, {"image": 12},
                                     {"wss": None, "sr_ratios": (2, 1)}],
                         ids=["padded", "exact", "one_window", "sr4", "12px", "pcpvt"])
def test_tiny_twins_parity(kwargs):
    image = kwargs.get("image", 8)
    module = randomised_all(tiny_twins(**kwargs))
    spec = from_torch(module, (1, image, image))
    check_parity(module, spec, (1, image, image))


def test_padded_windows_and_sub_sampling_are_recorded():
    spec = from_torch(randomised_all(tiny_twins()), (1, 8, 8))
    nodes = {n["name"]: n for n in spec["nodes"]}
    local, glob = "blocks.0.0.attn", "blocks.0.1.attn"
    assert nodes[f"{local}.attend"]["window"] == [3, 3] and nodes[f"{local}.attend"]["shift"] == [0, 0]
    assert nodes[f"{local}.pad"]["pads"] == [0, 0, 2, 2] and nodes[f"{local}.crop"]["pads"] == [0, 0, -2, -2]
    assert nodes[f"{local}.qkv"]["inputs"] == [f"{local}.pad"]
    assert (nodes[f"{glob}.sr"]["k"], nodes[f"{glob}.sr"]["stride"]) == ([2, 2], [2, 2])
    assert nodes[f"{glob}.attend"]["inputs"] == [f"{glob}.q", f"{glob}.k", f"{glob}.v"]
    assert nodes[f"{glob}.kv"]["inputs"] == [f"{glob}.norm"]
    assert "window" not in nodes[f"{glob}.attend"]
    # the second stage's 2×2 windows tile its 2×2 map: no padding
    assert "blocks.1.0.attn.pad" not in nodes and nodes["blocks.1.0.attn.attend"]["window"] == [2, 2]


def test_other_layers_in_twins_places_are_refused_by_name():
    module = tiny_twins()
    module.blocks[0][0].attn.proj = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    assert_refused(module, "LocallyGroupedAttn", "blocks.0.0.attn", "Sequential", "nn.Linear")
    module = tiny_twins()
    module.blocks[0][1].attn.attn_drop = nn.ReLU()
    assert_refused(module, "GlobalSubSampleAttn", "blocks.0.1.attn", "attn_drop")
    module = tiny_twins()
    module.blocks[0][1].attn.sr = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    assert_refused(module, "GlobalSubSampleAttn", "its sr", "stride 2")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["twins_svt_small", "twins_pcpvt_small"])
def test_library_twins_at_64(name):
    torch.manual_seed(0)
    module = build_module(f"timm:{name}", {"img_size": 64}).eval()
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("where", ["blocks.0.0.attn", "blocks.0.1.attn"])
def test_the_scale_is_the_one_timm_applies(fused, where):
    """timm's fused path (its default) calls scaled_dot_product_attention without `scale`, so head_dim^-0.5 applies
    whatever `m.scale` says; the unfused path multiplies by `m.scale`. A scale (or head count) changed after
    construction converted with `m.scale` gave logits unlike the module's (no error)."""
    module = randomised_all(tiny_twins())
    attn = module.get_submodule(where)
    attn.scale, attn.fused_attn = 0.1, fused
    check_parity(module, from_torch(module, (1, 8, 8)), (1, 8, 8))
    if where == "blocks.0.1.attn":  # two heads of 4 channels where the scale was computed for one of 8
        attn.num_heads = 2
        check_parity(module, from_torch(module, (1, 8, 8)), (1, 8, 8))
