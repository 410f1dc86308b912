"""Grid attention (``attention`` with a dilated ``window``: the window's positions spread over the map) and MobileViT
through `from_torch`: the partition equal to MaxViT's own grid_partition, torch = ONNX on random grid specs, the
field's validation and stored form, timm's MobileVitBlock against the spec's torch forward and ONNX graph (square
and rectangular patches, without fusion), the grid read by both forms, refusals by name, and the full mobilevit
models at 64 (slow)."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from random_weights import random_params
from torch_nets import check_parity, classifier_of, tensors_of, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.later_fields import stored_form
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.train.attention_forms import attention
from edgecl.train.models import forward, from_numpy

MobileVitBlock = timm.models.mobilevit.MobileVitBlock
maxxvit = timm.models.maxxvit


def _spec(**fields) -> dict:
    conv = {"op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1}
    return {"name": "g", "input_shape": [2, 4, 6], "output": "f", "nodes": [
        *({"name": n, **conv} for n in "qkv"),
        {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 0.5, **fields},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]}


def _both(spec: dict, weights: dict, x: torch.Tensor) -> np.ndarray:
    """The spec's torch forward, checked against its ONNX graph."""
    with torch.no_grad():
        got = forward(spec, from_numpy(weights), x).numpy()
    session = ort.InferenceSession(build_onnx(spec, weights).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x.numpy()})[0] - got).max() < 1e-4
    return got


@pytest.mark.parametrize("grid", [[2, 3], [4, 2], [1, 6], [2, 1]])
def test_dilated_windows_are_maxvit_grid_partition(grid):
    """A dilated window [gh, gw] attends among the positions of timm's MaxViT grid_partition(x, [gh, gw]) window
    (rows H/gh, columns W/gw apart), in its order; side-by-side windows of that size are another network."""
    spec = validate(_spec(window=grid, dilated=True))
    weights = random_params(spec, 3, 0)
    x = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    logits = _both(spec, weights, x)
    with torch.no_grad():
        got = forward(spec, from_numpy(weights), x, head=False).numpy()
        q, k, v = (torch.conv2d(x, torch.from_numpy(weights[f"{n}.weight"]), torch.from_numpy(weights[f"{n}.bias"]))
                   for n in "qkv")
        parts = [maxxvit.grid_partition(t.permute(0, 2, 3, 1), grid).permute(0, 3, 1, 2) for t in (q, k, v)]
        want = maxxvit.grid_reverse(attention(*parts, 2, 0.5).permute(0, 2, 3, 1), grid, [4, 6]).permute(0, 3, 1, 2)
    assert np.abs(got - want.reshape(2, -1).numpy()).max() < 1e-5
    if grid not in ([1, 6], [4, 2]):  # (a window of a whole row or column is the same either way)
        side_by_side = validate(_spec(window=grid))
        assert np.abs(_both(side_by_side, weights, x) - logits).max() > 1e-3


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_grid_attention_torch_equals_onnx(data):
    """Grids that tile the map, 1 or 2 heads, with or without a bias per grid window: torch = ONNX."""
    height, width = data.draw(st.sampled_from([2, 4, 6])), data.draw(st.sampled_from([1, 3, 4, 6]))
    grid = [data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in (height, width)]
    fields = {"window": grid, "dilated": True, "heads": data.draw(st.sampled_from([1, 2]))}
    if data.draw(st.booleans()):
        t = grid[0] * grid[1]
        fields.update(bias_offsets=t, bias_index=[[(3 * i + j) % t for j in range(t)] for i in range(t)])
    spec = validate({**_spec(**fields), "input_shape": [2, height, width]})
    _both(spec, random_params(spec, 3, 0), torch.randn(2, 2, height, width))


def test_grid_fields_validate_and_store():
    node = validate(_spec(window=[2, 3], dilated=True))["nodes"][3]
    assert node["dilated"] is True and node["shift"] == [0, 0]
    plain = validate(_spec(window=[2, 3], dilated=False))
    assert "dilated" not in plain["nodes"][3] and plain == validate(_spec(window=[2, 3]))  # as before grids
    grid = validate(_spec(window=[2, 3], dilated=True))
    assert validate(stored_form(grid)) == grid and stored_form(grid)["nodes"][3]["dilated"] is True
    for bad, words in [(dict(dilated=True), "dilated needs a window"),
                       (dict(window=2, dilated=True, shift=[1, 0]), "none when dilated"),
                       (dict(window=2, dilated="yes"), "true or false"), (dict(window=[3, 3], dilated=True),
                                                                           "tile the map")]:
        with pytest.raises(UsageError, match=words):
            validate(_spec(**bad))


class _Net(nn.Module):
    """A conv stem to a map and one timm MobileVitBlock, then the mean and a Linear."""

    def __init__(self, patch, fusion: bool = True, depth: int = 2, stride: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = MobileVitBlock(8, 12, transformer_dim=16, transformer_depth=depth, patch_size=patch,
                                    num_heads=2, no_fusion=not fusion, stride=stride)
        self.fc = nn.Linear(12 if fusion else 12, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("patch, size, fusion", [(2, (8, 12), True), ((2, 3), (4, 12), True), (4, (8, 8), False),
                                                 (1, (3, 5), True)])
def test_mobilevit_block_parity_and_its_grid(patch, size, fusion):
    module = _Net(patch, fusion).eval()
    spec = from_torch(module, (3, *size))
    check_parity(module, spec, (3, *size), batch=2)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["window"], n.get("dilated")) for n in attends] == [([size[0] // ph, size[1] // pw], True)] * 2
    assert any(n["op"] == "cat" for n in spec["nodes"]) == fusion
    if (ph, pw) == (1, 1):
        return  # one pixel per patch: the grid is the whole map, dilated or not
    # the grid is read by both forms: side-by-side windows of the same size are another network
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    want = _both(spec, weights, x)
    side_by_side = copy.deepcopy(spec)
    for n in side_by_side["nodes"]:
        n.pop("dilated", None)
    assert np.abs(_both(validate(side_by_side), weights, x) - want).max() > 1e-3


def test_a_strided_conv_kxk_puts_the_patches_on_the_map_it_makes():
    """MobileVitBlock(stride=2) without fusion: the transformer sees conv_kxk's halved map, so the grid is that map's
    patches (2×3 of the 4×6 map, not 4×6 of the 8×12 input: attention over the whole map, another network)."""
    module = _Net(2, fusion=False, stride=2).eval()
    spec = from_torch(module, (3, 8, 12))
    assert [n["window"] for n in spec["nodes"] if n["op"] == "attention"] == [[2, 3]] * 2
    check_parity(module, spec, (3, 8, 12), batch=2)


def _edited(edit) -> nn.Module:
    module = _Net(2)
    edit(module.block)
    return module.eval()


@pytest.mark.parametrize("make, shape, words", [
    (lambda: _Net(3), (3, 8, 8), "3×3 patches do not tile the 8×8 map"),
    # the 12×12 input is tiled by the 4×4 patches, conv_kxk's 6×6 map (which timm resizes to 8×8) is not
    (lambda: _Net(4, fusion=False, stride=2), (3, 12, 12), "4×4 patches do not tile the 6×6 map"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), timm.models.mobilevit.MobileVitV2Block(8, 8, patch_size=3)),
     (3, 8, 8), "3×3 patches do not tile the 8×8 map"),  # MobileViTv2's block: `test_mobilevit2`
    (lambda: _edited(lambda b: setattr(b.transformer[0], "ls1", timm.layers.LayerScale(16))), (3, 8, 8),
     "ls1 is a LayerScale"),
    (lambda: _edited(lambda b: setattr(b.transformer[1].attn, "q_norm", nn.LayerNorm(8))), (3, 8, 8), "qk-norm"),
    (lambda: _edited(lambda b: setattr(b, "conv_1x1", nn.Sequential(nn.Conv2d(8, 16, 1)))), (3, 8, 8),
     "conv_1x1 is a Sequential"),
    (lambda: _edited(lambda b: setattr(b.conv_proj, "bn", nn.Identity())), (3, 8, 8), "'block.conv_proj'"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, shape, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make(), shape)
    assert "MobileVit" in str(info.value) and ("at 'block'" in str(info.value) or "at '1'" in str(info.value))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
def test_timm_mobilevit_at_64(name):
    module = timm.create_model(name, pretrained=False).eval()
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    grids = {tuple(n["window"]) for n in spec["nodes"] if n["op"] == "attention"}
    assert grids == {(4, 4), (2, 2), (1, 1)}  # 2×2 patches of the 8×8, 4×4 and 2×2 stage maps
