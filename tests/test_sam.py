"""SAM's ViT (timm's ``timm.models.vision_transformer_sam``) through `from_torch`: its blocks kept whole — attention
in windows of the zero-padded map or over the whole map, with MViTv2's decomposed relative positions (``rel_mvit``:
q times the tables at the query's offset minus the key's) — against the module, torch form and ONNX; the index
against timm's own ``get_rel_pos`` (also for q and k of different sizes, as MViTv2 needs); the fields the spec
records and stores; what is refused, by name; samvit_base_patch16 and samvit_base_patch16_224 at 64 (slow)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sam_nets import tiny_sam
from torch_nets import assert_refused, check_parity, classifier_of, randomise_batchnorm, randomised_all

from edgecl.arch import from_torch, validate
from edgecl.arch.factories import build_module
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.rel_pos import mvit_index
from edgecl.errors import UsageError
from edgecl.train.models import forward, from_numpy

from timm.models.vision_transformer_sam import get_rel_pos  # noqa: E402 (sam_nets set torchvision up)


@pytest.mark.parametrize("kwargs,image", [
    ({}, 8), ({"window_size": 2}, 8), ({"window_size": 0}, 8), ({"global_attn_indexes": (), "window_size": 5}, 8),
    ({"use_rel_pos": False}, 8), ({"init_values": 0.5, "neck_chans": None, "use_abs_pos": False}, 8),
    ({"window_size": 4, "global_attn_indexes": (0,), "depth": 3}, 12)],
    ids=["padded_windows", "tiling_windows", "all_global", "one_padded_window", "no_rel_pos", "layer_scale_no_neck",
         "6x6_map"])
def test_tiny_sam_parity(kwargs, image):
    """3×3 windows on the 4×4 map (padded to 6×6: four windows), 2×2 windows that tile it (no pad), global blocks
    only, one 5×5 window (more padding than map), no relative positions, layer scales with the LayerNorm2d neck and
    no position embedding, a 6×6 map in 4×4 windows after a global block. Every weight drawn at random: timm's
    tables start at 0, which would hide their direction."""
    module = randomised_all(tiny_sam(image=image, **kwargs))
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), (1, image, image))
    check_parity(module, spec, (1, image, image))


def test_window_and_global_attention_fields_and_their_direction():
    """The window block attends in padded 3×3 windows with 3×3 tables, the global one over the 4×4 map; both read
    their tables query − key (``rel_mvit``) from the module's ``rel_pos_h`` / ``rel_pos_w``. Read key − query
    (BotNet's form, the field left out) the same tensors give other logits: the field is what makes parity."""
    module = randomised_all(tiny_sam())
    spec = from_torch(module, (1, 8, 8))
    nodes = {n["name"]: n for n in spec["nodes"]}
    local, glob = nodes["blocks.0.attn.attend"], nodes["blocks.1.attn.attend"]
    assert local["window"] == [3, 3] and local["rel_pos"] == [3, 3] and local["rel_dim"] == 8
    assert "window" not in glob and glob["rel_pos"] == [4, 4]
    assert local["rel_mvit"] is True and glob["rel_mvit"] is True and local["module"] == "blocks.0.attn"
    assert nodes["blocks.0.pad"]["pads"] == [0, 0, 2, 2] and nodes["blocks.0.crop"]["pads"] == [0, 0, -2, -2]
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    assert np.array_equal(weights["blocks.1.attn.attend.rel_h"], module.blocks[1].attn.rel_pos_h.detach().numpy())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    flipped = json.loads(json.dumps(spec))
    for node in flipped["nodes"]:
        node.pop("rel_mvit", None)
    with torch.no_grad():
        want = module(x)
        assert torch.allclose(forward(spec, from_numpy(weights), x), want, atol=1e-5)
        assert not torch.allclose(forward(validate(flipped), from_numpy(weights), x), want, atol=1e-3)


@pytest.mark.parametrize("queries,keys", [(4, 4), (1, 1), (4, 8), (8, 4), (3, 7), (7, 3), (14, 14), (5, 2)])
def test_mvit_index_is_timm_get_rel_pos(queries, keys):
    """timm's get_rel_pos on a table whose row r holds r returns the rows it reads: `mvit_index`'s, for q and k of
    one size (SAM) and of two (MViTv2's pooled keys or queries: scaled coordinates)."""
    rows = 2 * max(queries, keys) - 1
    table = torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, 2)
    read = get_rel_pos(queries, keys, table)[..., 0].long().numpy()
    assert np.array_equal(mvit_index(queries, keys), read) and mvit_index(queries, keys).max() < rows


def test_stored_form_leaves_the_field_out_where_false_and_validate_refuses_bad_values():
    """``rel_mvit`` false is left out of the stored form (older files read unchanged, an older edgecl refuses the
    field by name where true); a value that is not a bool, the field without rel_pos, or with a halo, a shifted or a
    dilated window is refused with a UsageError naming it."""
    spec = from_torch(tiny_sam(), (1, 8, 8))
    stored = json.loads(json.dumps(stored_form(spec)))
    assert validate(stored) == spec and all(n.get("rel_mvit", True) is True for n in stored["nodes"])
    base = {"name": "a", "input_shape": [4, 4, 4], "output": "f", "nodes": [
        {"name": "a", "op": "attention", "inputs": ["input", "input", "input"], "heads": 2, "scale": 0.5},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]}
    validate(_with(base, rel_pos=[4, 4], rel_dim=2, rel_mvit=True))
    assert "rel_mvit" not in stored_form(validate(_with(base, rel_pos=[4, 4], rel_dim=2, rel_mvit=False)))["nodes"][0]
    for fields, word in [({"rel_pos": [4, 4], "rel_dim": 2, "rel_mvit": 1}, "rel_mvit"),
                         ({"rel_pos": [4, 4], "rel_dim": 2, "rel_mvit": "yes"}, "rel_mvit"),
                         ({"rel_mvit": True}, "rel_mvit"),
                         ({"rel_pos": [2, 2], "rel_dim": 2, "rel_mvit": True, "window": [2, 2], "shift": [1, 1]},
                          "shifted"),
                         ({"rel_pos": [2, 2], "rel_dim": 2, "window": [2, 2], "dilated": True}, "dilated"),
                         ({"rel_pos": [4, 4], "rel_dim": 2, "window": [2, 2]}, "windows of [2, 2]"),
                         ({"rel_pos": [4, 4], "rel_dim": 2, "rel_mvit": True, "halo_blocks": [2, 2], "halo": 1},
                          "halo")]:
        with pytest.raises(UsageError, match=re.escape(word)):
            validate(_with(base, **fields))


def _with(spec: dict, **fields) -> dict:
    out = json.loads(json.dumps(spec))
    out["nodes"][0].update(fields)
    return out


def test_refused_by_name():
    """Tables built for another map (timm interpolates them in every forward), q/k norms and rotary embeddings."""
    assert_refused(tiny_sam(image=8, use_abs_pos=False), "SAM Block", "blocks.1", "rel_pos_h", "interpolation",
                   "img_size", input_shape=(1, 12, 12))
    assert_refused(tiny_sam(qk_norm=True), "SAM Block", "blocks.0", "qk_norm")
    assert_refused(tiny_sam(use_rope=True, use_rel_pos=False), "SAM Block", "use_rope")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["samvit_base_patch16", "samvit_base_patch16_224"])
def test_library_samvit_at_64(name):
    """timm's SAM ViT-B built for 64×64 (img_size=64: a 4×4 map, its global tables 7 rows; its 14×14 windows each
    the map padded by 10): the spec equals the module, torch and ONNX, with random norms and tables."""
    module = build_module(f"timm:{name}", {"img_size": 64, "num_classes": 10}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
