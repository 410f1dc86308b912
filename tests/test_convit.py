"""ConViT through `from_torch` (`edgecl.arch.fx_convit`): timm's GPSA kept whole as an attention with gated positions
(``gated_pos``: the content softmax mixed per head with the softmax of pos_proj of the grid's offsets, renormalised),
its MHSA as timm's Attention; small ConViTs against the module, torch and ONNX, with every weight drawn at random
(gates and positional Linears included); the field's validation and stored form; refusals by name; timm's
convit_tiny at 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets_cait import compacts_with_the_same_logits, round_trips_into_the_module, tiny_convit
from torch import nn
from torch_nets import assert_refused, check_parity, classifier_of, randomised_all, timm

from edgecl.arch import from_torch
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.gpsa_ops import relative_offsets
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_keys
from edgecl.arch.spec import validate
from edgecl.errors import UsageError
from edgecl.train.models import forward, from_numpy


@pytest.mark.parametrize("kwargs", [{}, {"depth": 3, "local_up_to_layer": 2, "num_heads": 4},
                                    {"num_heads": 1, "global_pool": "avg"}, {"qkv_bias": True},
                                    {"local_up_to_layer": 2, "use_pos_embed": False}])
def test_tiny_convit_parity(kwargs):
    module = randomised_all(tiny_convit(in_channels=3, **kwargs))
    spec = from_torch(module, (3, 8, 8))
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert sum(bool(n.get("gated_pos")) for n in attends) == kwargs.get("local_up_to_layer", 1)
    assert len(attends) == kwargs.get("depth", 2)
    check_parity(module, spec, (3, 8, 8))


def test_offsets_are_timms():
    from timm.models.convit import GPSA
    rel = GPSA(8, num_heads=2).get_rel_indices(16)[0].numpy()  # (T, T, 3)
    assert np.array_equal(rel, relative_offsets(4).transpose(1, 2, 0))


def test_gated_positions_are_read_from_the_module_and_change_the_output():
    module = randomised_all(tiny_convit(in_channels=3))
    with torch.no_grad():  # the positions weigh: gates near 1, offsets' scores spread
        module.blocks[0].attn.gating_param.fill_(3.0)
        module.blocks[0].attn.pos_proj.weight.mul_(5.0)
    spec = from_torch(module, (3, 8, 8))
    keys = state_keys(spec)
    assert keys["blocks.0.attn.attend.pos_weight"] == "blocks.0.attn.pos_proj.weight"
    assert keys["blocks.0.attn.attend.gating"] == "blocks.0.attn.gating_param"
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x).numpy()
        plain = validate({**spec, "nodes": [{k: v for k, v in n.items() if k != "gated_pos"} for n in spec["nodes"]]})
        kept = {k: v for k, v in weights.items() if not k.startswith("blocks.0.attn.attend.")}
        got = forward(plain, from_numpy(kept), x).numpy()
    assert np.abs(got - want).max() > 1e-3  # a spec without the positions computes another network: parity sees them


def test_gated_pos_validates_and_is_left_out_of_the_stored_form_when_false():
    spec = from_torch(tiny_convit(in_channels=3).eval(), (3, 8, 8))
    assert validate(stored_form(spec)) == spec
    node = next(n for n in spec["nodes"] if n.get("gated_pos"))
    for edit, words in (({"talking_heads": True}, "gated_pos .* needs kv_heads = heads, no window, no talking"),
                        ({"kv_heads": 1}, "gated_pos"), ({"gated_pos": "yes"}, "gated_pos = 'yes' must be true")):
        bad = {**spec, "nodes": [{**n, **edit} if n is node else n for n in spec["nodes"]]}
        with pytest.raises(UsageError, match=words):
            validate(bad)
    plain = validate({**spec, "nodes": [{**n, "gated_pos": False} if n is node else n for n in spec["nodes"]]})
    assert all("gated_pos" not in n for n in stored_form(plain)["nodes"])  # other attentions' files unchanged


def test_a_grid_that_is_no_square_is_refused_by_validate():
    spec = from_torch(tiny_convit(in_channels=3).eval(), (3, 8, 8))
    nodes = [dict(n) for n in spec["nodes"]]
    first = next(i for i, n in enumerate(nodes) if n["op"] == "attention")
    cut = {"name": "cut", "op": "token", "inputs": [nodes[first]["inputs"][0]], "index": 0, "count": 15}
    q_cut = {**cut, "name": "cut_k", "inputs": [nodes[first]["inputs"][1]]}
    v_cut = {**cut, "name": "cut_v", "inputs": [nodes[first]["inputs"][2]]}
    nodes[first]["inputs"] = ["cut", "cut_k", "cut_v"]
    with pytest.raises(UsageError, match="gated_pos attention needs q and k at the same positions, a square"):
        validate({**spec, "nodes": [*nodes[:first], cut, q_cut, v_cut, *nodes[first:]]})


def _edited(block: int = 0, **parts) -> nn.Module:
    module = tiny_convit(in_channels=3)
    for name, layer in parts.items():
        setattr(module.blocks[block].attn, name, layer)
    return module


@pytest.mark.parametrize("module, words", [
    (lambda: _edited(pos_proj=nn.Linear(3, 2, bias=False)), ("GPSA at 'blocks.0.attn'", "pos_proj is Linear")),
    (lambda: _edited(proj_drop=nn.Sequential()), ("GPSA at 'blocks.0.attn'", "proj_drop is a Sequential")),
    (lambda: _edited(1, attn_drop=nn.Sequential()), ("MHSA at 'blocks.1.attn'", "attn_drop is a Sequential")),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(module, words):
    assert_refused(module(), *words, input_shape=(3, 8, 8))


def test_edited_offsets_are_refused_by_name():
    module = tiny_convit(in_channels=3).eval()
    with torch.no_grad():
        module(torch.zeros(1, 3, 8, 8))  # timm computes rel_indices for 16 tokens, then keeps them
        module.blocks[0].attn.rel_indices[..., 2] *= 2
    assert_refused(module, "GPSA at 'blocks.0.attn'", "rel_indices are not the", input_shape=(3, 8, 8))


@pytest.mark.slow
def test_timm_convit_tiny_at_64():
    module = randomised_all(timm.create_model("convit_tiny", pretrained=False, img_size=64))
    spec = from_torch(module, (3, 64, 64))
    assert sum(bool(n.get("gated_pos")) for n in spec["nodes"]) == 10
    check_parity(module, spec, (3, 64, 64))


def test_compaction_keeps_the_gated_attention_and_the_logits():
    spec = from_torch(tiny_convit(in_channels=3).eval(), (3, 8, 8))
    small = compacts_with_the_same_logits(spec)
    assert [n.get("gated_pos") for n in small["nodes"] if n["op"] == "attention"] == [True, None]


def test_tensors_go_back_into_the_module():
    module = randomised_all(tiny_convit(in_channels=3))
    back = round_trips_into_the_module(module, from_torch(module, (3, 8, 8)))
    assert back["blocks.0.attn.pos_proj.weight"].shape == (2, 3) and back["blocks.0.attn.gating_param"].shape == (2,)
