"""BEiT (timm's ``timm.models.beit``) and the relative-position ViT (``timm.models.vision_transformer_relpos``) through
`from_torch`: q and v biases beside a bias-less qkv as the conv's bias stored in parts (``bias_parts``), each
attention's relative position bias table over the tokens (the class token's too), layer scales — against the module,
torch form and ONNX; the parts read from and written back to the module, from a weights file, through validation;
EVA's attentions without a rotary embedding (with one: tests/test_rotary.py); what stays refused by name; the
library's BEiT, BEiT v2, vit_relpos (table and its default RelPosMlp) and EVA-02 tiny without RoPE at 64 (slow)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all
from vit_bias_nets import tiny_beit, tiny_eva, tiny_vit_relpos

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import to_module_state
from edgecl.arch.spec import validate
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.train.initial import starting_weights

_KINDS = {"beit": tiny_beit, "beit_12px": lambda: tiny_beit(image=12),
          "beit_no_qkv_bias": lambda: tiny_beit(qkv_bias=False),
          "beit_abs_pos": lambda: tiny_beit(use_abs_pos_emb=True, use_rel_pos_bias=False),
          "beit_token_pool": lambda: tiny_beit(global_pool="token"),
          "relpos": tiny_vit_relpos, "relpos_cls": lambda: tiny_vit_relpos(class_token=True, global_pool="token"),
          "relpos_no_bias": lambda: tiny_vit_relpos(qkv_bias=False, init_values=0.5),
          # EVA without RoPE: SwiGLU + sub-LN MLP, q/v bias parts; separate q/k/v projections; the sub-LN before
          # the attention's projection; timm's AttentionRope (fused, and grouped-query: k and v of one head)
          "eva": tiny_eva, "eva_separate": lambda: tiny_eva(qkv_fused=False),
          "eva_inner_norm": lambda: tiny_eva(scale_attn_inner=True),
          "eva_rope_attention": lambda: tiny_eva(attn_type="rope"),
          "eva_grouped": lambda: tiny_eva(attn_type="rope", qkv_fused=False, num_kv_heads=1),
          "eva_plain_mlp": lambda: tiny_eva(swiglu_mlp=False, scale_mlp=False)}


@pytest.mark.parametrize("kind", list(_KINDS))
def test_tiny_parity(kind):
    module = randomised_all(_KINDS[kind]())
    image = 12 if kind.endswith("12px") else 8
    spec = from_torch(module, (1, image, image))
    check_parity(module, spec, (1, image, image))


def _nodes(spec: dict) -> dict[str, dict]:
    return {n["name"]: n for n in spec["nodes"]}


def test_qkv_bias_is_the_convs_bias_stored_as_q_bias_zero_v_bias():
    module = randomised_all(tiny_beit())
    spec = from_torch(module, (1, 8, 8))
    nodes = _nodes(spec)
    assert nodes["blocks.0.attn.qkv"]["bias_parts"] == ["q_bias", None, "v_bias"]
    attend = nodes["blocks.0.attn.attend"]
    assert (attend["module"], attend["bias_table"], attend["bias_offsets"]) == ("blocks.0.attn", "swin", 7 * 7 + 3)
    assert np.array_equal(attend["bias_index"], module.blocks[0].attn.relative_position_index.numpy())
    attn = module.blocks[0].attn
    weights = tensors_of(module, spec)
    want = torch.cat((attn.q_bias, torch.zeros(8), attn.v_bias)).detach().numpy()
    assert np.array_equal(weights["blocks.0.attn.qkv.bias"], want)
    # back to the module: the parts, never a qkv.bias the module lacks, nor the k part (its fixed zero buffer)
    trained = {k: v + 1.0 for k, v in weights.items()}
    state = to_module_state(spec, trained)
    assert "blocks.0.attn.qkv.bias" not in state and "blocks.0.attn.k_bias" not in state
    assert np.array_equal(state["blocks.0.attn.q_bias"], attn.q_bias.detach().numpy() + 1.0)
    assert np.array_equal(state["blocks.0.attn.v_bias"], attn.v_bias.detach().numpy() + 1.0)
    assert set(state) <= set(module.state_dict())
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert np.array_equal(tensors_of(module, spec)["blocks.0.attn.qkv.bias"][:8], want[:8] + 1.0)


def test_starting_weights_from_module_file_and_earlier_start(tmp_path):
    module = randomised_all(tiny_beit())
    spec = from_torch(module, (1, 8, 8))
    start = starting_weights(module, spec)
    assert np.array_equal(start.values["blocks.1.attn.qkv.bias"], tensors_of(module, spec)["blocks.1.attn.qkv.bias"])
    path = tmp_path / "beit.npz"  # a file keyed by the module's names: q_bias and v_bias, no qkv.bias
    np.savez(path, **{k: v.numpy() for k, v in module.state_dict().items()})
    assert starting_weights(str(path), spec).sha256 == start.sha256
    assert starting_weights(start, spec).sha256 == start.sha256
    values = dict(module.state_dict())
    values.pop("blocks.1.attn.v_bias")  # a part missing: the bias it is part of is named
    with pytest.raises(UsageError, match="blocks.1.attn.qkv.bias"):
        starting_weights(values, spec)
    values["blocks.1.attn.v_bias"] = torch.zeros(9)  # a part of another size
    with pytest.raises(UsageError, match=r"blocks.1.attn.v_bias.*\(8,\)"):
        starting_weights(values, spec)


def test_bias_parts_survive_the_stored_form_and_old_specs_read_the_same():
    spec = from_torch(tiny_beit(), (1, 8, 8))
    assert validate(stored_form(spec)) == validate(spec)
    plain = from_torch(tiny_beit(qkv_bias=False), (1, 8, 8))  # no field where the module holds no parts
    assert all("bias_parts" not in n for n in stored_form(plain)["nodes"])


def test_compaction_drops_the_module_link():
    """A compacted graph's tensors are no longer the module's: the parts go with the other module fields."""
    module = randomised_all(tiny_beit())
    spec = from_torch(module, (1, 8, 8))
    params = tensors_of(module, spec)
    params.update({"head.weight": np.ones((3, 8), np.float32), "head.bias": np.zeros(3, np.float32)})
    for key in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias"):  # one hidden unit dead: GELU(0) = 0
        params[key][3] = 0
    arch, _, report = compact_task(spec, params, channel_multiple=1)
    assert report.layers["blocks.0.mlp.fc1"] == [16, 15]
    assert all("bias_parts" not in n for n in arch["nodes"])


def _spec_with(change) -> dict:
    spec = copy.deepcopy(from_torch(tiny_beit(), (1, 8, 8)))
    change(_nodes(spec))
    return spec


@pytest.mark.parametrize("change, words", [
    # two halves of 12: the null one holds q's last 4 channels, which q's slice reads
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=["q_bias", None]), "exactly that part"),
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=["q_bias", None, "q_bias"]), "must be"),
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=["q.bias", None, "v_bias"]), "must be"),
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=[None, None, None]), "must be"),
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=["q_bias", None, "v_bias", "w", "x"]),
     "equal parts divide"),
    (lambda n: n["blocks.0.attn.qkv"].update(bias=False), "needs bias true"),
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=[None, "k_bias", "v_bias"]), "attentions' keys"),
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=["q_bias", "k_bias", None]), "attentions' keys"),
    # parts beside the conv's path blocks.0.qkv: blocks.0.gamma_1 is the block's layer scale
    (lambda n: n["blocks.0.attn.qkv"].update(bias_parts=["gamma_1", None, "v_bias"], module="blocks.0.qkv"),
     "one weight cannot be two"),
])
def test_validation_refuses_bad_bias_parts(change, words):
    spec = _spec_with(change)
    with pytest.raises(UsageError, match=words):
        validate(spec)


def test_a_null_part_read_past_the_keys_is_refused():
    spec = copy.deepcopy(from_torch(tiny_beit(), (1, 8, 8)))
    spec["nodes"].append({"name": "extra", "op": "add", "inputs": ["blocks.1.attn.k", "blocks.1.attn.k"]})
    spec["nodes"].append({"name": "extra_flat", "op": "flatten", "inputs": ["extra"]})
    spec["output"] = "extra_flat"
    with pytest.raises(UsageError, match="attentions' keys"):
        validate(spec)



def _null_key_spec(**fields) -> dict:
    """A qkv conv whose bias is stored as q_bias, a fixed zero for k and v_bias (BEiT's), sliced into an attention
    of 2 heads over a 4×4 map with `fields`."""
    return {"name": "x", "input_shape": [2, 4, 4], "output": "f", "nodes": [
        {"name": "blk.qkv", "op": "conv", "inputs": ["input"], "in": 2, "out": 12, "k": 1,
         "bias_parts": ["q_bias", None, "v_bias"]},
        *({"name": n, "op": "slice", "inputs": ["blk.qkv"], "start": 4 * i, "stop": 4 * i + 4}
          for i, n in enumerate("qkv")),
        {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 0.7, **fields},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]}


@pytest.mark.parametrize("fields", [{}, {"talking_heads": True}, {"rel_pos": [4, 4], "rel_dim": 2},
                                    {"window": [2, 2], "shift": [1, 1]}, {"gated_pos": True}])
def test_a_null_key_part_changes_no_output_where_it_is_taken(fields):
    """Where a null key part is valid, what training puts there changes no output (the softmax cancels it), so
    writing the module's zero back keeps the network."""
    from random_weights import random_params
    from torch_nets import spec_logits

    spec = validate(_null_key_spec(**fields))
    weights = random_params(spec, 3, 0)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    zero_k = {**weights, "blk.qkv.bias": np.concatenate([weights["blk.qkv.bias"][:4], np.zeros(4, np.float32),
                                                         weights["blk.qkv.bias"][8:]])}
    assert np.abs(spec_logits(spec, weights, x) - spec_logits(spec, zero_k, x)).max() < 1e-4


@pytest.mark.parametrize("fields", [{"cosine": True}, {"cosine": True, "window": [2, 2]},
                                    {"halo_blocks": [2, 2], "halo": 1}])
def test_a_null_key_part_is_refused_where_a_key_bias_counts(fields):
    """Swin V2's cosine attention normalises k (a bias turns it) and HaloNet's zero-padded halo has keys without
    it: there a key bias changes the output, so a null part (the module's fixed zero, what `to_module_state` writes
    back) would make the module another network than the one trained."""
    with pytest.raises(UsageError, match="attentions' keys"):
        validate(_null_key_spec(**fields))

def test_refused_by_name():
    # one table for all blocks, gathered in the model's forward: that gather is refused where it is, by its line
    module = tiny_vit_relpos(rel_pos_type="bias", shared_rel_pos=True)
    assert_refused(module, "shared_rel_pos.relative_position_bias_table", "pos_embed_rel.py")
    module = tiny_beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    assert_refused(module, "rel_pos_bias.relative_position_bias_table", "beit.py")
    module = tiny_beit()
    module.blocks[1].attn.k_bias.fill_(0.5)  # a k bias that is not zero: not BEiT's
    assert_refused(module, "blocks.1.attn", "k_bias buffer of zeros")


def test_eva_refused_by_name():  # (its rotary embedding: tests/test_rotary.py)
    assert_refused(tiny_eva(qk_norm=True), "blocks.0.attn", "qk-norm (q_norm)")
    module = tiny_eva()
    module.blocks[1].attn.gate = torch.nn.Linear(8, 8)  # timm's gated attention (gated_attn)
    assert_refused(module, "blocks.1.attn", "gated")
    module = tiny_eva()
    module.blocks[0].attn.norm = torch.nn.LayerNorm(8, elementwise_affine=False)  # a sub-LN without its affine
    assert_refused(module, "blocks.0.attn.norm", "with a weight and a bias")


@pytest.mark.slow
@pytest.mark.parametrize("name, size, kwargs", [
    ("beit_base_patch16_224", 64, {}), ("beit_base_patch16_224", 96, {}), ("beitv2_base_patch16_224", 64, {}),
    ("vit_relpos_small_patch16_224", 64, {"rel_pos_type": "bias"}), ("vit_relpos_small_patch16_224", 64, {}),
    ("vit_relpos_small_patch16_rpn_224", 64, {}),  # its default RelPosMlp; res-post-norm blocks
    ("eva02_tiny_patch14_224", 56, {"use_rot_pos_emb": False, "num_classes": 10}),
    ("eva02_tiny_patch14_224", 64, {"use_rot_pos_emb": False, "num_classes": 10})])
def test_library_models(name, size, kwargs):
    torch.manual_seed(0)
    module = build_module(f"timm:{name}", {"img_size": size, **kwargs}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, size, size))
    check_parity(module, spec, (3, size, size), batch=2)


@pytest.mark.parametrize("kind, form", [("mlp", None), ("mlp_swin", "rel_pos_swin")])
def test_rel_pos_mlp_goes_in_as_its_mlp_and_trains_back(kind, form, tmp_path):
    """timm's RelPosMlp, its default mode 'cr' and mode 'swin' (rel_pos_type 'mlp_swin': 16·sigmoid of an MLP
    whose fc2 has no bias, over Swin V2's coordinates): the attention reads the tokens as their grid, its bias table
    the MLP of the grid's log-spaced offsets, the MLP's weights the module's ``rel_pos.mlp`` (a 4×6 grid: rows and
    columns not confused); trained one epoch, its values go back into the module, which then computes the
    runtime's output."""
    from write_back import trained_back_into

    module = randomised_all(tiny_vit_relpos(rel_pos_type=kind, image=(8, 12)))
    spec = from_torch(module, (1, 8, 12))
    check_parity(module, spec, (1, 8, 12))
    attend = _nodes(spec)["blocks.1.attn.attend"]
    assert (attend["module"], attend["bias_table"], attend["bias_mlp"], attend["bias_offsets"]) == \
        ("blocks.1.attn.rel_pos", "mlp", 128, 7 * 11)
    assert (attend.get("bias_mlp_form"), attend.get("bias_mlp_span")) == (form, [4, 6] if form else None)
    assert _nodes(spec)["blocks.1.attn.qkv_grid"]["shape"] == [24, 4, 6]
    state = to_module_state(spec, tensors_of(module, spec))
    assert ("blocks.1.attn.rel_pos.mlp.fc2.bias" in state) == (form is None)
    assert np.array_equal(state["blocks.1.attn.rel_pos.mlp.fc2.weight"],
                          module.blocks[1].attn.rel_pos.mlp.fc2.weight.detach().numpy())
    trained_back_into(lambda n: tiny_vit_relpos(rel_pos_type=kind, classes=n), "head", ("attend.mlp",), tmp_path)


def test_rel_pos_mlp_of_another_form_is_refused_by_name():
    """A RelPosMlp of another gain, or padded for a class token, is not what the spec computes: refused naming the
    attention."""
    module = tiny_vit_relpos(rel_pos_type="mlp_swin")
    module.blocks[1].attn.rel_pos.bias_gain = 8
    assert_refused(module, "blocks.1.attn", "RelPosMlp (mode 'swin'")
    assert_refused(tiny_vit_relpos(rel_pos_type="mlp", class_token=True), "blocks.0.attn", "class_token=False")


@pytest.mark.parametrize("fields, words", [({"bias_mlp_span": None}, "bias_mlp_span None goes with"),
                                           ({"bias_mlp_span": [0, 4]}, "bias_mlp_span"),
                                           ({"bias_mlp_form": "rel_pos"}, "bias_mlp_form")])
def test_the_rel_pos_swin_form_is_checked(fields, words):
    """RelPosMlp's mode 'swin' needs its span (its coordinates' normalisation); a bad span or form is refused."""
    spec = copy.deepcopy(from_torch(tiny_vit_relpos(rel_pos_type="mlp_swin"), (1, 8, 8)))
    node = _nodes(spec)["blocks.0.attn.attend"]
    node.update(fields)
    for key in [k for k, v in node.items() if v is None]:
        del node[key]
    with pytest.raises(UsageError, match=words):
        validate(spec)
