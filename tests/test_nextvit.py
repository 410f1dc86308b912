"""Next-ViT (timm's ``timm.models.nextvit``) through `from_torch`: its E-MHSA (``EfficientAttention``) kept whole on
the tokens of the NTB's map — keys and values of the tokens averaged in runs of sr_ratio² consecutive tokens
(an ``nn.AvgPool1d`` over the token axis: a row, part of one or several rows) and BatchNorm1d'd — and the NCB/NTB
blocks around it traced, against the module, torch form and ONNX; the fields the spec records; other layers in its
places refused by name; nextvit_small at 64 (slow)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_nets_vit import TinyNextViT
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


@pytest.mark.parametrize("kwargs,image", [({}, 8), ({"sr": 1}, 8), ({"heads": 4}, 8), ({"heads": 1}, 8),
                                           ({"sr": 2}, 16), ({"sr": 4, "stride": 2}, 32), ({"sr": 2}, 12)],
                         ids=["row_runs", "no_sr", "4_heads", "1_head", "half_rows", "multi_rows", "6x6_map"])
def test_tiny_nextvit_parity(kwargs, image):
    """A run of sr² tokens is a row of the 4×4 map (8 px), half a row of the 8×8 (16 px), two rows of the 8×8 map
    after the NTB's stride-2 pool (sr 4: runs of 16, 32 px), and on the 6×6 map (12 px) runs of 4 straddle rows:
    no rectangle of the map, still the tokens' runs."""
    module = randomised_all(TinyNextViT(**kwargs))
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), (1, image, image))
    check_parity(module, spec, (1, image, image))


@pytest.mark.parametrize("fused", [True, False])
def test_the_scale_is_the_one_timm_applies(fused):
    module = randomised_all(TinyNextViT())
    attn = module.ntb.e_mhsa
    attn.scale, attn.fused_attn = 0.1, fused
    check_parity(module, from_torch(module, (1, 8, 8)), (1, 8, 8))


def test_token_runs_are_recorded():
    spec = from_torch(randomised_all(TinyNextViT()), (1, 8, 8))
    nodes = {n["name"]: n for n in spec["nodes"]}
    attn = "ntb.e_mhsa"
    assert nodes[f"{attn}.sr.runs"]["shape"] == [32, 4, 4]
    assert (nodes[f"{attn}.sr"]["k"], nodes[f"{attn}.sr"]["stride"]) == ([1, 4], [1, 4])
    assert nodes[f"{attn}.norm"]["op"] == "bn" and nodes[f"{attn}.k"]["inputs"] == [f"{attn}.norm"]
    assert nodes[f"{attn}.attend"]["heads"] == 2


def test_other_layers_in_nextvit_places_are_refused_by_name():
    module = TinyNextViT()
    module.ntb.e_mhsa.sr = nn.AvgPool1d(2, stride=2)
    assert_refused(module, "EfficientAttention", "ntb.e_mhsa", "its sr", "kernel and stride 4")
    module = TinyNextViT()
    module.ntb.e_mhsa.norm = nn.GroupNorm(4, 32)
    assert_refused(module, "ntb.e_mhsa", "GroupNorm", "nn.BatchNorm1d")
    module = TinyNextViT()
    module.ntb.e_mhsa.proj = nn.Sequential(nn.Linear(32, 32))
    assert_refused(module, "ntb.e_mhsa", "Sequential", "nn.Linear")
    module = TinyNextViT(sr=2)  # 3×3 map at 6 px: 9 tokens, runs of 4 do not tile them (AvgPool1d drops one)
    assert_refused(module, "ntb.e_mhsa", "over 9 tokens", input_shape=(1, 6, 6))


@pytest.mark.slow
def test_library_nextvit_small_at_64():
    torch.manual_seed(0)
    module = build_module("timm:nextvit_small", {}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
