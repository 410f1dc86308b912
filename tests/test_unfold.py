"""VOLO (timm's ``timm.models.volo``) through `from_torch`: outlook attention (timm's ``nn.Unfold`` of v, the weights
a Linear predicts per window, ``F.fold`` back) as an ``outlook_attention`` node — torch's unfold/fold in training, a
one-hot grouped Conv, Softmax, MatMul and a grouped ConvTranspose in ONNX —, VOLO's attention over a channels-last
map, its class attention with a packed kv, its (1, H, W, C) position embedding (``pos_embed.channels_last``) and its
map viewed as tokens; against the module in torch and ONNX Runtime at several map sides (odd ones pool with ceil
mode), the module's tensors read and written back, the op's and field's refusals, the aux head's refusal; the
library's volo_d1_224 at 224 and 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layer_nets_vit import tiny_volo
from torch_nets import assert_refused, check_parity, randomised_all, timm

from edgecl.arch import from_torch
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_shapes, to_module_state
from edgecl.arch.outlook_ops import one_hot_windows
from edgecl.arch.spec import validate
from edgecl.errors import UsageError


@pytest.mark.parametrize("kwargs, side", [({}, 8), ({"image": 24}, 24), ({"image": 20, "in_chans": 3}, 20),
                                          ({"image": 16, "downsamples": (True, False, False),
                                            "embed_dims": (8, 16, 16), "pooling_scale": 2}, 16),
                                          ({"image": 12, "num_heads": (1, 2, 2)}, 12)],
                         ids=["8px", "24px", "odd-map-rgb", "downsampled", "one-head"])
def test_tiny_volo_parity(kwargs, side):
    module = randomised_all(tiny_volo(**kwargs))
    channels = kwargs.get("in_chans", 1)
    spec = from_torch(module, (channels, side, side))
    check_parity(module, spec, (channels, side, side))
    outlook, = [n for n in spec["nodes"] if n["op"] == "outlook_attention"]
    assert (outlook["k"], outlook["pad"], outlook["stride"]) == (3, 1, 2)
    assert outlook["heads"] == module.network[0][0].attn.num_heads


def test_volo_tensors_round_trip_and_the_channels_last_embedding():
    module = randomised_all(tiny_volo(image=16))
    spec = from_torch(module, (1, 16, 16))
    node = {n["name"]: n for n in spec["nodes"]}["pos_embed"]
    assert node["channels_last"] is True and node["module_shape"] == [1, 4, 4, 8] and node["tokens"] == 16
    ours = tensors_of(module, spec)
    stored = module.pos_embed.detach().numpy()  # (1, H, W, C): position (1, 2) is row-major token 6
    assert np.array_equal(ours["pos_embed.weight"][:, 6], stored[0, 1, 2])
    assert state_shapes(spec)["pos_embed.weight"] == (1, 4, 4, 8)
    state, own = to_module_state(spec, ours), module.state_dict()
    for key, value in state.items():
        assert np.array_equal(np.asarray(value), own[key].numpy()), key
    assert stored_form(validate(spec))["nodes"] == stored_form(spec)["nodes"]


def test_outlook_attention_is_torchs_unfold_and_fold():
    """The spec's torch form against timm's forward written out, and the one-hot filter against F.unfold."""
    v = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(0))
    unfolded = F.unfold(v, 3, padding=1, stride=2)
    conv = F.conv2d(v, torch.from_numpy(one_hot_windows(6, 3)), stride=2, padding=1, groups=6)
    assert torch.equal(conv.flatten(2), unfolded)
    back = F.conv_transpose2d(conv, torch.from_numpy(one_hot_windows(6, 3)), stride=2, padding=1, groups=6,
                              output_padding=(0, 0))
    assert torch.allclose(back, F.fold(unfolded, (5, 7), 3, padding=1, stride=2), atol=1e-6)


def _outlook(**fields) -> dict:
    node = {"name": "o", "op": "outlook_attention", "inputs": ["v", "w"], "heads": 2, "k": 3, "pad": 1, "stride": 2,
            "scale": 0.5, **fields}
    return {"name": "o", "input_shape": [1, 5, 5], "nodes": [
        {"name": "v", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 1},
        {"name": "p", "op": "avgpool", "inputs": ["input"], "k": 2, "ceil_mode": True},
        {"name": "w", "op": "conv", "inputs": ["p"], "in": 1, "out": 162, "k": 1}, node,
        {"name": "f", "op": "flatten", "inputs": ["o"]}]}


@pytest.mark.parametrize("fields, words", [({}, None), ({"k": 2}, "logits of heads·k⁴"), ({"pad": 3}, "pad below k"),
                                           ({"heads": 3}, "heads"), ({"scale": 0}, "scale > 0"),
                                           ({"stride": 1}, "windows' positions"), ({"k": 16}, "k at most 15"),
                                           ({"heads": "2"}, "heads")])
def test_outlook_attention_fields_are_checked(fields, words):
    if words is None:
        assert validate(_outlook(**fields))["nodes"][3]["op"] == "outlook_attention"
        return
    with pytest.raises(UsageError, match=words):
        validate(_outlook(**fields))


def test_a_channels_last_embedding_needs_its_module_storage():
    spec = {"name": "e", "input_shape": [2, 3, 4], "nodes": [
        {"name": "pos", "op": "pos_embed", "inputs": ["input"], "ch": 2, "tokens": 12, "channels_last": True},
        {"name": "f", "op": "flatten", "inputs": ["pos"]}]}
    with pytest.raises(UsageError, match="needs a module_shape"):
        validate(spec)
    spec["nodes"][0]["module_shape"] = [1, 2, 3, 4]  # channels first: not what channels_last says
    with pytest.raises(UsageError, match=r"must be \(1, H, W, 2\)"):
        validate(spec)
    spec["nodes"][0]["module_shape"] = [1, 3, 4, 2]
    assert validate(spec)["nodes"][0]["channels_last"] is True
    spec["nodes"][0].update(channels_last=False, module_shape=[1, 2, 3, 4])  # false: left out, as before the field
    assert "channels_last" not in validate(spec)["nodes"][0]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("value", [3, 1.5, None, True, {}, "1,2,3,4", [1, 2, [3], 4]])
def test_a_position_embedding_module_shape_that_is_no_list_of_sizes_is_refused(channels_last, value):
    # a hand-edited or hostile file: validate sliced the value before checking it was a list (TypeError)
    spec = {"name": "e", "input_shape": [2, 3, 4], "nodes": [
        {"name": "pos", "op": "pos_embed", "inputs": ["input"], "ch": 2, "tokens": 12, "channels_last": channels_last,
         "module_shape": value},
        {"name": "f", "op": "flatten", "inputs": ["pos"]}]}
    with pytest.raises(UsageError, match="module_shape .* of a position embedding must be"):
        validate(spec)


def test_the_token_labelling_aux_head_is_refused_by_name():
    assert_refused(tiny_volo(use_aux_head=True), "aux_head", "use_aux_head=False", "volo.py:")


def test_another_pool_in_an_outlook_attention_is_refused_by_name():
    module = tiny_volo(image=16)
    module.network[0][0].attn.pool = torch.nn.MaxPool2d(2, 2, ceil_mode=True)  # runs, but is not timm's average
    assert_refused(module, "VOLO OutlookAttention at 'network.0.0.attn'", "windows at the pooled positions",
                   input_shape=(1, 16, 16))


@pytest.mark.slow
@pytest.mark.parametrize("side", [224, 64])
def test_volo_d1_224_parity(side):
    module = randomised_all(timm.create_model("volo_d1_224", pretrained=False, use_aux_head=False, img_size=side))
    spec = from_torch(module, (3, side, side))
    check_parity(module, spec, (3, side, side), batch=2)
    assert sum(n["op"] == "outlook_attention" for n in spec["nodes"]) == 4


def test_a_tiled_embedding_module_shape_is_its_window():
    """TNT's pixel embedding is stored (1, C, wh, ww) (docs/ARTIFACT.md): another layout of as many positions, which
    `to_module_state` would hand back in a shape the module does not have, is refused."""
    spec = {"name": "e", "input_shape": [2, 4, 4], "nodes": [
        {"name": "pos", "op": "pos_embed", "inputs": ["input"], "ch": 2, "tokens": 4, "tile": [2, 2],
         "module_shape": [1, 2, 4, 1]},
        {"name": "f", "op": "flatten", "inputs": ["pos"]}]}
    with pytest.raises(UsageError, match=r"must be \(1, 2, 2, 2\)"):
        validate(spec)
    spec["nodes"][0]["module_shape"] = [1, 2, 2, 2]
    assert validate(spec)["nodes"][0]["tile"] == [2, 2]
