"""CoaT-Lite through `from_torch` (`edgecl.arch.fx_coat`): timm's FactorAttnConvRelPosEnc kept whole as a
``linear_attention`` of kernel "softmax" (per head (v·softmax(k)ᵀ)·q), scaled, plus its convolutional relative
position encoding (depthwise convs of v's head groups on the grid, times q, a zero class token); small CoaTs of one
serial block per stage against the module, torch and ONNX, every weight drawn at random; the kernel's validation;
compaction; refusals by name, timm's shared position encodings (coat_lite_tiny) among them."""
from __future__ import annotations

import pytest
from layer_nets_cait import TinyCoatStage, compacts_with_the_same_logits, round_trips_into_the_module, tiny_coat
from torch import nn
from torch_nets import assert_refused, check_parity, randomised_all, timm

from edgecl.arch import from_torch
from edgecl.arch.spec import validate
from edgecl.errors import UsageError


@pytest.mark.parametrize("kwargs", [{}, {"crpe_window": {3: 2}, "num_heads": 2},
                                    {"num_heads": 8, "embed_dims": [16, 8, 8, 16], "crpe_window": {3: 2, 5: 3, 7: 3}},
                                    {"qkv_bias": False, "image": 64}])
def test_tiny_coat_parity(kwargs):
    image = kwargs.pop("image", 32)
    module = randomised_all(tiny_coat(in_channels=3, image=image, **kwargs))
    spec = from_torch(module, (3, image, image))
    factors = [n for n in spec["nodes"] if n["op"] == "linear_attention"]
    assert len(factors) == 4 and all(n["kernel"] == "softmax" for n in factors)
    assert sum(n["name"].startswith("crpe1.conv_list.") for n in spec["nodes"]) == \
        len(kwargs.get("crpe_window", {3: 1, 5: 1}))  # the shared layer's first name in the module
    check_parity(module, spec, (3, image, image))


def test_the_softmax_kernel_validates_and_is_not_relu():
    spec = from_torch(randomised_all(tiny_coat(in_channels=3)), (3, 32, 32))
    assert validate(spec) == spec
    relu = validate({**spec, "nodes": [{**n, "kernel": "relu"} if n["op"] == "linear_attention" else n
                                       for n in spec["nodes"]]})
    assert relu != spec
    with pytest.raises(UsageError, match="kernel = 'exp' must be 'relu' or 'softmax'"):
        validate({**spec, "nodes": [{**n, "kernel": "exp"} if n["op"] == "linear_attention" else n
                                    for n in spec["nodes"]]})


def test_compaction_keeps_the_factorised_attention_and_the_logits():
    spec = from_torch(tiny_coat(in_channels=3).eval(), (3, 32, 32))
    small = compacts_with_the_same_logits(spec)
    assert [n["kernel"] for n in small["nodes"] if n["op"] == "linear_attention"] == ["softmax"] * 4


def _edited(**parts) -> nn.Module:
    module = tiny_coat(in_channels=3)
    for name, layer in parts.items():
        setattr(module.serial_blocks1[0].factoratt_crpe, name, layer)
    return module


def test_what_edgecl_does_not_follow_is_refused_by_name():
    where = "FactorAttnConvRelPosEnc at 'serial_blocks1.0.factoratt_crpe'"
    assert_refused(_edited(proj_drop=nn.Sequential()), where, "proj_drop is a Sequential", input_shape=(3, 32, 32))
    module = tiny_coat(in_channels=3)
    module.crpe1.conv_list[0] = nn.Conv2d(4, 4, 3, padding=1)  # not depthwise
    assert_refused(module, where, "is not a depthwise stride-1 'same' nn.Conv2d", input_shape=(3, 32, 32))


def test_timms_shared_position_encodings_are_refused_by_name():
    """coat_lite_tiny's blocks share their stage's ConvPosEnc and ConvRelPosEnc: shared weights, no spec form."""
    module = timm.create_model("coat_lite_tiny", pretrained=False, img_size=32)
    assert_refused(module, "FactorAttnConvRelPosEnc at 'serial_blocks1.0.factoratt_crpe'", "shared weights",
                   "serial_blocks1.1.factoratt_crpe", "one use per layer", input_shape=(3, 32, 32))


def test_a_stage_of_timms_layers_in_a_network_of_ones_own():
    """TinyCoatStage (the methods' graph runs' CoaT): the grid size read off the map in forward, timm's SerialBlock."""
    module = randomised_all(TinyCoatStage(in_channels=3))
    check_parity(module, from_torch(module, (3, 8, 8)), (3, 8, 8))


def test_tensors_go_back_into_the_module():
    module = randomised_all(tiny_coat(in_channels=3))
    back = round_trips_into_the_module(module, from_torch(module, (3, 32, 32)))
    assert back["crpe1.conv_list.1.weight"].shape == (4, 1, 5, 5) and "cpe1.proj.weight" in back


@pytest.mark.slow
def test_timm_coat_lite_tiny_of_one_block_per_stage_at_64():
    module = randomised_all(timm.create_model("coat_lite_tiny", pretrained=False, img_size=64,
                                              serial_depths=[1, 1, 1, 1]))
    spec = from_torch(module, (3, 64, 64))
    assert sum(n["op"] == "linear_attention" for n in spec["nodes"]) == 4
    check_parity(module, spec, (3, 64, 64))
