"""CaiT through `from_torch` (`edgecl.arch.fx_cait`): timm's TalkingHeadAttn kept whole as an attention with
talking heads stored as Linears (``talking_linear``), the class-attention stage traced (its class token read again
after it is prepended: a ``token`` of the joined map); small CaiTs against the module, torch and ONNX, with every
weight drawn at random; the field's validation and stored form; refusals by name; timm's cait_xxs24_224 at 64
(slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets_cait import compacts_with_the_same_logits, round_trips_into_the_module, tiny_cait
from torch import nn
from torch_nets import assert_refused, check_parity, classifier_of, randomised_all, timm

from edgecl.arch import from_torch
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_keys
from edgecl.arch.spec import validate
from edgecl.errors import UsageError
from edgecl.train.models import forward, from_numpy


@pytest.mark.parametrize("kwargs", [{}, {"depth": 2, "num_heads": 4, "depth_token_only": 2},
                                    {"num_heads": 1, "depth_token_only": 0}, {"global_pool": "avg"},
                                    {"qkv_bias": False}])
def test_tiny_cait_parity(kwargs):
    module = randomised_all(tiny_cait(in_channels=3, **kwargs))
    spec = from_torch(module, (3, 8, 8))
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    talking = [n for n in attends if n.get("talking_heads")]
    assert len(talking) == kwargs.get("depth", 1) and all(n["talking_linear"] for n in talking)
    assert len(attends) - len(talking) == kwargs.get("depth_token_only", 1)  # ClassAttn's
    check_parity(module, spec, (3, 8, 8))


def test_talking_heads_are_read_from_the_linears_and_change_the_output():
    module = randomised_all(tiny_cait(in_channels=3))
    spec = from_torch(module, (3, 8, 8))
    keys = state_keys(spec)
    assert keys["blocks.0.attn.attend.talk1_weight"] == "blocks.0.attn.proj_l.weight"
    assert keys["blocks.0.attn.attend.talk2_bias"] == "blocks.0.attn.proj_w.bias"
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x).numpy()
        plain = validate({**spec, "nodes": [{k: v for k, v in n.items() if k not in ("talking_heads", "talking_linear")}
                                            for n in spec["nodes"]]})
        got = forward(plain, from_numpy({k: v for k, v in weights.items() if ".talk" not in k}), x).numpy()
    assert np.abs(got - want).max() > 1e-3  # a spec without the mixes computes another network: parity sees them


def test_talking_linear_validates_and_is_left_out_of_the_stored_form_when_false():
    spec = from_torch(tiny_cait(in_channels=3).eval(), (3, 8, 8))
    assert validate(stored_form(spec)) == spec
    node = next(n for n in stored_form(spec)["nodes"] if n.get("talking_heads"))
    assert node["talking_linear"] is True
    for edit, words in (({"talking_heads": False}, "talking_linear .* needs talking_heads"),
                        ({"talking_linear": "yes"}, "talking_linear = 'yes' must be true or false")):
        bad = {**spec, "nodes": [{**n, **edit} if n is node or n.get("talking_heads") else n for n in spec["nodes"]]}
        with pytest.raises(UsageError, match=words):
            validate(bad)
    plain = validate({**spec, "nodes": [{**n, "talking_linear": False} if n.get("talking_heads") else n
                                        for n in spec["nodes"]]})
    assert all("talking_linear" not in n for n in stored_form(plain)["nodes"])  # EfficientFormerV2's files unchanged


def _edited(**parts) -> nn.Module:
    module = tiny_cait(in_channels=3)
    for name, layer in parts.items():
        setattr(module.blocks[0].attn, name, layer)
    return module


@pytest.mark.parametrize("parts, words", [
    ({"proj_l": nn.Linear(2, 2, bias=False)}, ("TalkingHeadAttn at 'blocks.0.attn'", "proj_l is Linear")),
    ({"proj_w": nn.Sequential(nn.Linear(2, 2))}, ("TalkingHeadAttn at 'blocks.0.attn'", "proj_w is Sequential")),
    ({"attn_drop": nn.ReLU()}, ("TalkingHeadAttn at 'blocks.0.attn'", "attn_drop is a ReLU")),
    ({"proj_drop": nn.Sequential()}, ("TalkingHeadAttn at 'blocks.0.attn'", "proj_drop is a Sequential")),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(parts, words):
    assert_refused(_edited(**parts), *words, input_shape=(3, 8, 8))


@pytest.mark.slow
def test_timm_cait_xxs24_at_64():
    module = randomised_all(timm.create_model("cait_xxs24_224", pretrained=False, img_size=64))
    spec = from_torch(module, (3, 64, 64))
    assert sum(bool(n.get("talking_linear")) for n in spec["nodes"]) == 24
    check_parity(module, spec, (3, 64, 64))


def test_compaction_keeps_the_talking_heads_and_the_logits():
    spec = from_torch(tiny_cait(in_channels=3).eval(), (3, 8, 8))
    small = compacts_with_the_same_logits(spec)
    assert [n.get("talking_linear") for n in small["nodes"] if n["op"] == "attention"] == [True, None]


def test_tensors_go_back_into_the_module():
    module = randomised_all(tiny_cait(in_channels=3))
    back = round_trips_into_the_module(module, from_torch(module, (3, 8, 8)))
    assert back["blocks.0.attn.proj_l.weight"].shape == (2, 2) and "blocks.0.attn.proj_w.bias" in back
