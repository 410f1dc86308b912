"""TNT (timm's ``timm.models.tnt``) through `from_torch`: its patches folded into the batch held as one pixel map
whose windows are the patches — the pixel embedding (``nn.Unfold`` of the image and a conv on each patch: a conv with
``window``; legacy: the conv, then the unfold) with its pixel position embedding tiled over the windows
(``pos_embed.tile``), the inner attention within each window, the pixels viewed per patch (``space_to_depth``) —
against the module in torch and ONNX Runtime; the module's tensors read and written back; the tile field's checks;
the library's tnt_s_patch16_224 at 224 and 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from layer_nets_vit import tiny_tnt
from torch_nets import assert_refused, check_parity, randomised_all, timm

from edgecl.arch import from_torch
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import to_module_state
from edgecl.arch.spec import validate
from edgecl.errors import UsageError


@pytest.mark.parametrize("kwargs, side", [({}, 8), ({"legacy": True}, 8), ({"image": 16, "in_chans": 3}, 16),
                                          ({"image": 12, "patch_size": 6, "first_stride": 3}, 12),
                                          ({"global_pool": "avg", "num_heads_inner": 1}, 8)],
                         ids=["8px", "legacy", "rgb", "odd-pixels", "avg-pool"])
def test_tiny_tnt_parity(kwargs, side):
    module = randomised_all(tiny_tnt(**kwargs))
    channels = kwargs.get("in_chans", 1)
    spec = from_torch(module, (channels, side, side))
    check_parity(module, spec, (channels, side, side))
    nodes = {n["name"]: n for n in spec["nodes"]}
    p = module.pixel_embed.new_patch_size[0]
    assert nodes["pixel_pos"]["tile"] == [p, p] and nodes["pixel_pos"]["module_shape"] == [1, 4, p, p]
    assert nodes["pixel_embed.proj"].get("window") == (None if kwargs.get("legacy") else
                                                      list(module.pixel_embed.patch_size))
    windows = [n["window"] for n in spec["nodes"] if n["op"] == "attention" and n.get("window")]
    assert windows == [[p, p]] * len(module.blocks)


def test_tnt_tensors_round_trip():
    module = randomised_all(tiny_tnt())
    spec = from_torch(module, (1, 8, 8))
    ours = tensors_of(module, spec)
    assert np.array_equal(ours["pixel_pos.weight"], module.pixel_pos.detach().numpy().reshape(4, 4))
    state, own = to_module_state(spec, ours), module.state_dict()
    for key, value in state.items():
        assert np.array_equal(np.asarray(value), own[key].numpy()), key
    assert {"pixel_pos", "blocks.1.attn_in.qk.weight", "blocks.0.proj.weight"} <= set(state)
    assert stored_form(validate(spec))["nodes"] == stored_form(spec)["nodes"]


@pytest.mark.parametrize("fields, words", [({"tile": [2, 2]}, None),
                                           ({"tile": [3, 2], "tokens": 6, "module_shape": [1, 3, 3, 2]}, "tile"),
                                           ({"tile": [2, 2], "tokens": 8, "module_shape": [1, 3, 2, 4]},
                                            "tokens = 2·2"),
                                           ({"tile": [2, 2], "module_shape": None}, "needs a module_shape"),
                                           ({"tile": [2, 2], "channels_last": True,
                                             "module_shape": [1, 2, 2, 3]}, "no block or channels_last")])
def test_a_tiled_embedding_is_checked(fields, words):
    node = {"name": "pos", "op": "pos_embed", "inputs": ["input"], "ch": 3, "tokens": 4, "module_shape": [1, 3, 2, 2],
            **fields}
    node = {k: v for k, v in node.items() if v is not None}
    spec = {"name": "t", "input_shape": [3, 4, 6], "nodes": [node, {"name": "f", "op": "flatten", "inputs": ["pos"]}]}
    if words is None:
        assert validate(spec)["nodes"][0]["tile"] == [2, 2]
        return
    with pytest.raises(UsageError, match=words):
        validate(spec)


def test_other_layers_in_tnts_places_are_refused_by_name():
    module = tiny_tnt()
    module.pixel_embed.unfold = nn.Unfold(kernel_size=2, stride=2)  # not the model's 4 × 4 patches
    assert_refused(module, "TNT PixelEmbed at 'pixel_embed'", "Unfold must cut the image into its square patches")
    module = tiny_tnt()
    module.blocks[1].attn_out = nn.Identity()
    assert_refused(module, "TNT Block at 'blocks.1'", "edgecl converts TNT's Attention there")


@pytest.mark.slow
@pytest.mark.parametrize("side", [224, 64])
def test_tnt_s_patch16_224_parity(side):
    module = randomised_all(timm.create_model("tnt_s_patch16_224", pretrained=False, img_size=side))
    spec = from_torch(module, (3, side, side))
    check_parity(module, spec, (3, side, side), batch=2)
