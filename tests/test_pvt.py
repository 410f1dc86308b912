"""PVT v2 (timm's ``timm.models.pvt_v2``) through `from_torch`: its stages kept whole (the patch embedding's
channels-last map flattened to tokens, keys and values of the map reduced by a strided conv and a LayerNorm, the
MLP's depthwise conv on the token map) against the module, torch form and ONNX; the fields the spec records; the
linear-attention variant; other layers in their places refused by name; pvt_v2_b0 at 64 (it takes any size, no
img_size; about a second)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_nets_vit import tiny_pvt
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


@pytest.mark.parametrize("kwargs", [{}, {"sr_ratios": (4, 2)}, {"sr_ratios": (1, 1)}, {"image": 24},
                                     {"depths": (2, 1), "num_heads": (2, 4)}],
                         ids=["sr2", "sr4_2", "no_sr", "24px", "deeper"])
def test_tiny_pvt_parity(kwargs):
    image = kwargs.pop("image", 16)
    module = randomised_all(tiny_pvt(**kwargs))
    spec = from_torch(module, (1, image, image))
    check_parity(module, spec, (1, image, image))


@pytest.mark.parametrize("fused", [True, False])
def test_the_scale_is_the_one_timm_applies(fused):
    module = randomised_all(tiny_pvt())
    attn = module.stages[1].blocks[0].attn
    attn.scale, attn.fused_attn = 0.1, fused
    check_parity(module, from_torch(module, (1, 16, 16)), (1, 16, 16))


def test_reduction_and_mlp_are_recorded():
    spec = from_torch(randomised_all(tiny_pvt()), (1, 16, 16))
    nodes = {n["name"]: n for n in spec["nodes"]}
    attn, mlp = "stages.0.blocks.0.attn", "stages.0.blocks.0.mlp"
    assert (nodes[f"{attn}.sr"]["k"], nodes[f"{attn}.sr"]["stride"]) == ([2, 2], [2, 2])
    assert nodes[f"{attn}.kv"]["inputs"] == [f"{attn}.norm"]
    assert nodes[f"{attn}.attend"]["inputs"] == [f"{attn}.q", f"{attn}.k", f"{attn}.v"]
    assert nodes[f"{mlp}.dwconv"]["groups"] == 16 and nodes[f"{mlp}.dwconv"]["k"] == [3, 3]
    assert "stages.1.blocks.0.attn.sr" not in nodes  # sr_ratio 1: keys of every position
    assert nodes["stages.1.downsample.proj"]["stride"] == [2, 2]


def test_other_layers_in_pvt_places_are_refused_by_name():
    shape = (1, 16, 16)
    module = tiny_pvt()
    module.stages[0].blocks[0].attn.proj = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    assert_refused(module, "PyramidVisionTransformerStage", "stages.0", "Sequential", "nn.Linear", input_shape=shape)
    module = tiny_pvt()
    module.stages[0].blocks[0].attn.sr = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    assert_refused(module, "PyramidVisionTransformerStage", "its sr", "no padding", input_shape=shape)
    module = tiny_pvt()
    module.stages[0].blocks[0].mlp.dwconv = nn.Conv2d(16, 16, 5, padding=2, groups=16)
    assert_refused(module, "stages.0", "dwconv", "3×3 depthwise", input_shape=shape)
    module = tiny_pvt(linear=True)
    module.stages[0].blocks[0].attn.pool = nn.AdaptiveMaxPool2d(7)
    assert_refused(module, "stages.0", "its sr", "AdaptiveAvgPool2d", input_shape=shape)
    module = tiny_pvt()
    module.stages[1].blocks[0].drop_path1 = nn.ReLU()
    assert_refused(module, "stages.1", "drop_path1", input_shape=shape)


@pytest.mark.parametrize("image", [16, 64], ids=["4px_map_pooled_up", "16px_map_pooled_down"])
def test_linear_attention_parity(image):
    """pvt_v2_b2_li's linear attention: keys and values of the map pooled adaptively to 7 × 7 (from a 4×4 or 2×2
    map: windows overlapping, from 16×16 and 8×8: unequal), a 1×1 sr, LayerNorm and GELU; a ReLU in the MLP."""
    module = randomised_all(tiny_pvt(linear=True))
    spec = from_torch(module, (1, image, image))
    nodes = {n["name"]: n for n in spec["nodes"]}
    assert nodes["stages.0.blocks.0.attn.pool"]["size"] == [7, 7] and "stages.0.blocks.0.mlp.relu" in nodes
    check_parity(module, spec, (1, image, image))


def test_library_pvt_v2_b0_at_64():
    torch.manual_seed(0)
    module = build_module("timm:pvt_v2_b0", {}).eval()
    randomise_batchnorm(module)  # its LayerNorms start at the identity
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
