"""NesT (timm's ``timm.models.nest``) through `from_torch`: each level on the map (a ConvPool between levels, the
position embedding timm stores block by block, window attention over its blocks) against the module, torch form and
ONNX; the embedding's map order and its module layout read back; other layers in its places refused by name; the
library's nest_tiny and nest_tiny_jx at 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from layer_nets_vit import tiny_nest
from torch_nets import assert_refused, check_parity, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import to_module_state
from edgecl.arch.spec import validate
from edgecl.errors import UsageError


@pytest.mark.parametrize("kwargs", [{}, {"pad_type": "same"}, {"image": 16}, {"in_channels": 3}],
                         ids=["8px", "same", "16px", "rgb"])
def test_tiny_nest_parity(kwargs):
    image, channels = kwargs.get("image", 8), kwargs.get("in_channels", 1)
    module = randomised_all(tiny_nest(**kwargs))
    spec = from_torch(module, (channels, image, image))
    check_parity(module, spec, (channels, image, image))


def test_block_order_embedding_reads_as_timm_adds_it():
    module = randomised_all(tiny_nest())
    spec = from_torch(module, (1, 8, 8))
    node = {n["name"]: n for n in spec["nodes"]}["levels.0.pos_embed"]
    assert node["block"] == 2 and node["tokens"] == 16 and "module_shape" not in node
    stored = module.levels[0].pos_embed.detach()  # (1, 4 blocks, 4 positions, 8)
    spatial = tensors_of(module, spec)["levels.0.pos_embed.weight"].reshape(8, 4, 4)
    # position (row 1, col 2) is block 1 (top right), its position 2 (bottom left of the block)
    assert np.array_equal(spatial[:, 1, 2], stored[0, 1, 2].numpy())
    # and back to the module's layout
    back = to_module_state(spec, tensors_of(module, spec))["levels.0.pos_embed"]
    assert np.array_equal(back, stored.numpy())
    # the field survives the stored form; an embedding without it stores no block field
    assert {n["name"]: n for n in stored_form(spec)["nodes"]}["levels.0.pos_embed"]["block"] == 2
    assert validate(stored_form(spec)) == validate(spec)


def test_block_embedding_needs_whole_square_blocks():
    spec = {"input_shape": [4, 6, 6], "nodes": [
        {"name": "p", "op": "pos_embed", "inputs": ["input"], "ch": 4, "tokens": 36, "block": 4},
        {"name": "f", "op": "flatten", "inputs": ["p"]}]}
    with pytest.raises(UsageError, match=r"\(p\).*blocks of 4 × 4"):
        validate(spec)


def test_other_layers_in_nest_places_are_refused_by_name():
    module = tiny_nest()
    module.levels[0].transformer_encoder[0].attn.proj = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    assert_refused(module, "NestLevel", "levels.0", "Sequential", "nn.Linear")
    module = tiny_nest()
    module.levels[0].transformer_encoder[0].drop_path1 = nn.ReLU()
    assert_refused(module, "NestLevel", "drop_path1")
    module = tiny_nest()
    module.levels[1].pool.pool = nn.AvgPool2d(3, 2, 1)
    assert_refused(module, "NestLevel", "levels.1", "AvgPool2d")
    module = tiny_nest()
    module.levels[1].pool = nn.Conv2d(8, 16, 2, 2)
    assert_refused(module, "levels.1.pool", "ConvPool")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nest_tiny", "nest_tiny_jx"])  # jx: TensorFlow "same" pooling
def test_library_nest_tiny_at_64(name):
    torch.manual_seed(0)
    module = build_module(f"timm:{name}", {"img_size": 64}).eval()
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
