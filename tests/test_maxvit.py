"""MaxViT through `from_torch`: timm's MaxxVit with its channels-last PartitionAttentionCl blocks (window attention,
then grid attention: a dilated window) and torchvision's MaxVit (channels-first PartitionAttentionLayer), relative
position biases randomised (the libraries start them near 0, where a wrong index would hide in rounding) — parity
of the spec's torch forward and ONNX graph with the module for rectangular windows and grids and both qkv packings,
what each attention node reads, refusals by name, timm's maxvit_pico_rw_256 built at 64 and torchvision's maxvit_t
at 224 (slow)."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch_nets import check_parity, classifier_of, spec_logits, tensors_of, timm, torchvision

from edgecl.arch import from_torch, validate
from edgecl.arch.module_state import from_module, state_keys, state_shapes, to_module
from edgecl.errors import UsageError

maxxvit = timm.models.maxxvit


def _randomised(module: nn.Module) -> nn.Module:
    for name, p in module.named_parameters():
        if name.endswith("relative_position_bias_table"):
            nn.init.normal_(p)
    return module.eval()


def _maxvit(window=(2, 4), grid=None, **transformer) -> nn.Module:
    """Two MaxViT stages (16×16 → 8×8 and 4×4 maps at 32×32), one MBConv + window + grid block each."""
    cfg = maxxvit._rw_max_cfg(dim_head=8, window_size=window)
    cfg["transformer_cfg"] = replace(cfg["transformer_cfg"], grid_size=grid or window, **transformer)
    torch.manual_seed(0)
    return _randomised(maxxvit.MaxxVit(maxxvit.MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=("M", "M"),
                                                          stem_width=16, **cfg), img_size=32, num_classes=3))


def _torchvision(partition: int = 2) -> nn.Module:
    """torchvision's MaxVit in small: a stem to 16×16, two stages (8×8, 4×4 maps) of one MBConv + window + grid."""
    torch.manual_seed(0)
    return _randomised(torchvision.models.maxvit.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=partition, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=3))




@pytest.mark.parametrize("make, window, grid", [
    (lambda: _maxvit((2, 4)), [[2, 4]] * 2, [[2, 4]] * 2),
    (lambda: _maxvit((4, 4), (2, 4), head_first=False), [[4, 4]] * 2, [[2, 4]] * 2),
    (lambda: _maxvit((2, 2), (4, 2)), [[2, 2]] * 2, [[4, 2]] * 2),
    # TensorFlow MaxViT's bias layout (heads, 2·wh − 1, 2·ww − 1) through one-hot lookups; heads not packed first
    (lambda: _maxvit((2, 4), (4, 2), rel_pos_type="bias_tf", head_first=False), [[2, 4]] * 2, [[4, 2]] * 2),
    # torchvision: partition 2 → windows 2×2; the grid's windows of H/2 swapped: 2×2 positions H/2 apart
    (lambda: _torchvision(2), [[2, 2]] * 2, [[2, 2]] * 2),
    (lambda: _torchvision(4), [[4, 4]] * 2, [[4, 4]] * 2),
])
def test_maxvit_parity_and_what_each_attention_reads(make, window, grid):
    module = make()
    spec = from_torch(module, (3, 32, 32))
    check_parity(module, spec, (3, 32, 32), batch=2)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["window"], n.get("dilated", False)) for n in attends] == [
        (w, d) for pair in zip(window, grid) for w, d in ((pair[0], False), (pair[1], True))]
    tables = dict(module.named_parameters())
    for n in attends:  # the spec's (heads, offsets) is the module's table in its own layout
        table = tables[f"{n['module']}.relative_position_bias_table"].detach().numpy()
        want_table = table.T if n["bias_table"] == "swin" else table.reshape(table.shape[0], -1)
        assert np.array_equal(tensors_of(module, spec)[f"{n['name']}.bias"], want_table)
    # the grid and the bias are read by both forms: side-by-side windows, or no bias, are another network
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    weights["head.weight"] = np.random.default_rng(0).standard_normal(weights["head.weight"].shape, np.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = spec_logits(spec, weights, x)
    side_by_side, unbiased = copy.deepcopy(spec), dict(weights)
    for n in side_by_side["nodes"]:
        n.pop("dilated", None)
    for n in attends:
        unbiased[f"{n['name']}.bias"] = np.zeros_like(weights[f"{n['name']}.bias"])
    assert np.abs(spec_logits(validate(side_by_side), weights, x) - want).max() > 1e-2
    assert np.abs(spec_logits(spec, unbiased, x) - want).max() > 1e-2


@pytest.mark.parametrize("make, words", [
    (lambda: _maxvit(use_nchw_attn=True), "PartitionAttention2d .*not supported"),
    (lambda: _maxvit(init_values=1e-5), "ls1 is a LayerScale"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), (3, 32, 32))
    assert "MaxViT" in str(info.value) and "stages.0.blocks.0" in str(info.value)


def test_mlp_generated_bias_goes_in():
    """RelPosMlp (maxvit_rmlp_*) was refused; its MLP over the offsets' log coordinates is bias_table 'mlp' now
    (tests/test_coatnet.py: its fields, CoAtNet's and the named rmlp networks)."""
    module = _maxvit(rel_pos_type="mlp")
    spec = from_torch(module, (3, 32, 32))
    assert {n.get("bias_table") for n in spec["nodes"] if n["op"] == "attention"} == {"mlp"}
    check_parity(module, spec, (3, 32, 32))


def test_tf_bias_table_fields():
    """bias_table 'tf' is stored (heads, 2·wh − 1, 2·ww − 1) under relative_position_bias_table: it needs a window
    and exactly that many offsets."""
    spec = from_torch(_maxvit((2, 4), (4, 2), rel_pos_type="bias_tf"), (3, 32, 32))
    node = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert (node["bias_table"], node["bias_offsets"], state_shapes(spec)[f"{node['name']}.bias"]) == ("tf", 21,
                                                                                                      (2, 3, 7))
    assert state_keys(spec)[f"{node['name']}.bias"] == f"{node['module']}.relative_position_bias_table"
    table = np.arange(42, dtype=np.float32).reshape(2, 3, 7)  # the module's layout and back
    assert np.array_equal(to_module(spec, f"{node['name']}.bias", from_module(spec, f"{node['name']}.bias", table)),
                          table)
    for bad, words in [({"window": None, "shift": None}, "needs a window"), ({"bias_offsets": 20}, "gets window")]:
        edited = copy.deepcopy(spec)
        nodes = [n for n in edited["nodes"] if n["name"] == node["name"]]
        for key, value in bad.items():
            nodes[0].pop(key) if value is None else nodes[0].update({key: value})
        with pytest.raises(UsageError, match=words):
            validate(edited)


def test_a_partition_that_does_not_tile_is_refused_typed():
    """timm asserts the partition tiles the map: the module does not run, and edgecl says so, typed."""
    with pytest.raises(UsageError, match="does not run on inputs of shape .*divisible by window"):
        from_torch(_maxvit((3, 3)), (3, 32, 32))


@pytest.mark.slow
def test_timm_maxvit_pico_at_64():  # window and grid 2 (img_size // 32) on the 16, 8, 4 and 2 stage maps
    module = timm.create_model("maxvit_pico_rw_256", pretrained=False, img_size=64).eval()
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    blocks = sum(type(m).__name__ == "MaxxVitBlock" for m in module.modules())
    assert len(attends) == 2 * blocks and sum(n.get("dilated", False) for n in attends) == blocks


@pytest.mark.slow
def test_torchvision_maxvit_t_at_224():  # partition 7 tiles the 56, 28, 14 and 7 stage maps
    module = torchvision.models.maxvit_t().eval()
    spec = from_torch(module, (3, 224, 224))
    check_parity(module, spec, (3, 224, 224), batch=1)
    assert sum(n.get("dilated", False) for n in spec["nodes"] if n["op"] == "attention") == 2 + 2 + 5 + 2
