"""MViTv2 (timm's ``timm.models.mvitv2``) through `from_torch`: its blocks kept whole — pooling attention (q, k and
v each pooled by a depthwise conv and LayerNorm of one head's channels that every head shares, written with the
heads stacked along the rows: `fx_mvit.head_pool`), decomposed relative positions over pooled q and k
(``rel_mvit``), residual pooling, max-pooled and projected shortcuts — against the module, torch form and ONNX;
the tensors the spec names are timm's own; what is refused, by name; mvitv2_tiny, _small, _base, _large at 64
(slow)."""
from __future__ import annotations

import numpy as np
import pytest
from mvit_nets import tiny_mvit
from torch_nets import assert_refused, check_parity, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.module_state import state_keys


@pytest.mark.parametrize("cfg,image", [
    ({}, 16), ({"num_heads": 1}, 16), ({"num_heads": 3, "embed_dim": 6}, 16), ({"expand_attn": False}, 16),
    ({"mode": "max"}, 16), ({"mode": "avg"}, 16), ({"rel_pos_type": ""}, 20), ({"residual_pooling": False}, 16),
    ({"qkv_bias": False, "kernel_qkv": (5, 5)}, 16), ({"stride_kv_adaptive": (2, 2)}, 16),
    ({"depths": (1, 1, 1), "stride_q": ((1, 1), (2, 2), (2, 2))}, 32),
    ({"rel_pos_type": "", "num_heads": 3, "embed_dim": 6}, (12, 20)), ({"kernel_qkv": (1, 1)}, 16)],
    ids=["default", "one_head", "three_heads", "expand_mlp", "max_pool_mode", "avg_pool_mode", "odd_map_no_rel",
         "no_residual_pooling", "no_qkv_bias_kernel5", "kv_stride2", "three_stages", "6x10_map_no_rel",
         "kernel1_subsampling"])
def test_tiny_mvit_parity(cfg, image):
    """Heads of 4 channels (1, 2, 3 or 2 then 4), the shortcuts projected before the MLP (expand_attn False), the
    max and average pooling modes, a 10×10 map pooled to 5×5 and 3×3 (no tables, the crops uneven), no residual
    pooling, 5×5 pooling kernels without qkv bias, keys pooled by 2, three stages, a 6×10 map (timm's tables need a
    square one), 1×1 pooling kernels (strided subsampling). Every weight drawn at random: timm's pooling norms start
    at 1 and 0 and its tables near 0, which would hide a misplaced head."""
    side = tuple(image) if isinstance(image, tuple) else (image, image)
    module = randomised_all(tiny_mvit(image=image, **cfg))
    spec = from_torch(module.eval(), (1, *side))
    check_parity(module, spec, (1, *side))


def test_pooling_reads_timms_shared_tensors():
    """The spec names every tensor of the module (the classifier aside) by its state key; the pooling convs and
    norms are timm's (d channels, one kernel per channel shared by the heads); the attention reads the larger of q's and k's maps (8×8 q over 2×2 keys in stage 0, 4×4
    over 2×2 in stage 1) with tables of 2·max − 1 rows."""
    module = randomised_all(tiny_mvit())
    spec = from_torch(module.eval(), (1, 16, 16))
    nodes = {n["name"]: n for n in spec["nodes"]}
    pool = nodes["stages.1.blocks.1.attn.pool_k"]
    assert (pool["in"], pool["out"], pool["groups"], pool["k"], pool["stride"]) == (4, 4, 4, [3, 3], [2, 2])
    assert nodes["stages.1.blocks.1.attn.norm_k"]["ch"] == 4
    assert nodes["stages.0.blocks.0.attn.attend"]["rel_pos"] == [8, 8]
    assert nodes["stages.1.blocks.1.attn.attend"]["rel_pos"] == [4, 4]
    assert all(nodes[f"stages.1.blocks.1.attn.{p}_by_head"]["op"] == "shuffle" for p in "qkv")
    named = set(state_keys(spec).values())  # every tensor of the module but the classifier, each once
    assert named == set(module.state_dict()) - {"head.fc.weight", "head.fc.bias"}
    weights = tensors_of(module, spec)
    block = module.stages[1].blocks[1].attn
    assert np.array_equal(weights["stages.1.blocks.1.attn.pool_k.weight"], block.pool_k.weight.detach().numpy())
    assert np.array_equal(weights["stages.1.blocks.1.attn.norm_k.bias"], block.norm_k.bias.detach().numpy())
    assert np.array_equal(weights["stages.1.blocks.1.attn.attend.rel_h"], block.rel_pos_h.detach().numpy())


def test_refused_by_name():
    """Tables built for another map (timm reads a 15-row table for 6×6 queries over 2×2 keys, which need
    11: a model built at 16 run at 12). timm's pool_first and conv_unshared modes do not run in this timm at all
    (its own shape errors), so the refusal is the trace's."""
    assert_refused(tiny_mvit(image=16), "MultiScaleBlock", "stages.0.blocks.0", "rel_pos_h", "(11, 4)", "img_size",
                   input_shape=(1, 12, 12))
    assert_refused(tiny_mvit(pool_first=True), "does not run", "stages_0_blocks_0", input_shape=(1, 16, 16))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_small", "mvitv2_base", "mvitv2_large"])
def test_library_mvitv2_at_64(name):
    module = randomised_all(build_module(f"timm:{name}", {"img_size": 64, "num_classes": 5}))
    spec = from_torch(module.eval(), (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)


def test_channel_map_ties_each_pooled_channel_across_the_heads():
    """The stacking reshape makes channel j of every head one unit (the shared pooling conv's row j reads them all):
    q's rows of the qkv conv are d groups, each listed once per head, pinned and ordered; the pooling conv's rows are
    those d groups; the reshape back lists each once per head again."""
    from edgecl.arch.channels import channel_map

    spec = from_torch(tiny_mvit().eval(), (1, 16, 16))  # stage 1: 4 heads of 4 channels, 16 channels
    cm = channel_map(spec)
    block = "stages.1.blocks.1.attn"
    q_rows = [g for g, _ in cm.rows[f"{block}.qkv.weight"]][:16]  # each a single channel
    assert all(q_rows[i * 4 + j] == q_rows[j] for i in range(4) for j in range(4)) and len(set(q_rows)) == 4
    assert [g for g, _ in cm.rows[f"{block}.pool_q.weight"]] == q_rows[:4]
    assert [g for g, _ in cm.spaces[f"{block}.q_unstacked"]] == [g for g in q_rows[:4] for _ in range(4)]
    assert set(q_rows) <= cm.pinned and set(q_rows) <= cm.ordered
