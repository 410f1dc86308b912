"""Swin Transformers through `from_torch`: timm's SwinTransformerBlock and PatchMerging, torchvision's
ShiftedWindowAttention and PatchMerging — parity of the spec's torch forward and ONNX graph with the real modules
(relative position biases randomised: the libraries start them near 0), the window, the shift's mask and the bias
each read by both forms, the mask equal to the libraries' own, patch merging's channel order and odd-map padding,
the new fields' validation and bound, refusals by name, and the full-size models (slow)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from random_weights import random_params
from torch_nets import check_parity, classifier_of, spec_logits, tensors_of, timm, torchvision

from edgecl.arch import from_torch, validate
from edgecl.arch.attention_windows import window_mask
from edgecl.arch.op_shapes import intermediates
from edgecl.arch.spec import param_shapes, rowless_tensors
from edgecl.errors import UsageError

SwinBlock = timm.models.swin_transformer.SwinTransformerBlock
TvSwin = torchvision.models.swin_transformer


def _randomised(module: nn.Module) -> nn.Module:
    """Bias tables of normal weights, so a wrong index, layout or mask moves the logits well past rounding."""
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if name.endswith("relative_position_bias_table"):
            nn.init.normal_(p)
    return module.eval()


def _timm_swin() -> nn.Module:  # 16×16 then 8×8 maps, 4×4 windows, every second block shifted by 2
    return _randomised(timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5))


def _torchvision_swin() -> nn.Module:
    return _randomised(TvSwin.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                              window_size=[4, 4], num_classes=5))




@pytest.mark.parametrize("make", [_timm_swin, _torchvision_swin])
def test_swin_parity_and_what_each_attention_reads(make):
    module = make()
    spec = from_torch(module, (3, 32, 32))
    check_parity(module, spec, (3, 32, 32), batch=2)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["window"], n["shift"], n["bias_offsets"]) for n in attends] == [
        ([4, 4], [0, 0], 49), ([4, 4], [2, 2], 49), ([4, 4], [0, 0], 49), ([4, 4], [2, 2], 49)]
    assert all(n["bias_table"] == "swin" and np.array(n["bias_index"]).shape == (16, 16) for n in attends)
    first = attends[0]["name"]
    table = dict(module.named_parameters())[f"{attends[0]['module']}.relative_position_bias_table"]
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    assert param_shapes(spec)[f"{first}.bias"] == (2, 49)  # (heads, offsets): the module's table transposed
    assert np.array_equal(weights[f"{first}.bias"], table.detach().numpy().T)
    assert set(rowless_tensors(spec)) == {f"{n['name']}.bias" for n in attends}
    # the shift's mask and the bias are read by both forms: without either the logits move (a head of normal
    # weights: timm's small start would hide the change in rounding)
    weights["head.weight"] = np.random.default_rng(0).standard_normal(weights["head.weight"].shape, np.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = spec_logits(spec, weights, x)
    unshifted = copy.deepcopy(spec)
    for node in unshifted["nodes"]:
        node.update({"shift": [0, 0]} if node["op"] == "attention" else {})
    unbiased = {k: np.zeros_like(v) if k in rowless_tensors(spec) else v for k, v in weights.items()}
    for other, changed in ((validate(unshifted), weights), (spec, unbiased)):
        assert np.abs(spec_logits(other, changed, x) - want).max() > 1e-2


def test_windows_partition_the_map():
    """One window of the whole map is plain attention; smaller windows attend within themselves (torch and ONNX)."""
    weights = random_params(validate(_spec()), 3, 0)
    x = torch.randn(3, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    plain = spec_logits(validate(_spec()), weights, x)
    assert np.abs(spec_logits(validate(_spec(window=[4, 6])), weights, x) - plain).max() < 1e-5
    assert np.abs(spec_logits(validate(_spec(window=[2, 3])), weights, x) - plain).max() > 1e-3
    # shifted, even one window of the whole map keeps the roll's regions apart (Swin's mask): another result
    assert np.abs(spec_logits(validate(_spec(window=[4, 6], shift=[2, 3])), weights, x) - plain).max() > 1e-3


class _Block(nn.Module):
    """A stem to a channels-last map and one timm SwinTransformerBlock (any window and shift), then the mean."""

    def __init__(self, size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                 block: nn.Module | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = block or SwinBlock(8, size, num_heads=2, window_size=window, shift_size=shift,
                                        always_partition=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.block(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


@pytest.mark.parametrize("size, window, shift", [((4, 6), (2, 3), (1, 1)), ((6, 4), (3, 2), (2, 0)),
                                                 ((4, 4), (4, 4), (2, 2)), ((6, 6), (2, 3), (0, 2))])
def test_rectangular_windows_and_one_sided_shifts(size, window, shift):
    module = _randomised(_Block(size, window, shift))
    spec = from_torch(module, (3, *size))
    check_parity(module, spec, (3, *size), batch=2)
    assert [(n["window"], n["shift"]) for n in spec["nodes"] if n["op"] == "attention"] == [(list(window), list(shift))]


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_library_windows_equal_the_libraries(data):
    """Any window (1 to 4 a side) on a map of 1 to 3 windows a side, any shift below it, 1, 2 or 4 heads, as timm
    (partitioning always, or clamping window and shift to the map) and torchvision (no shift along a side the window
    covers) compute it: the module = the spec's torch forward = its ONNX graph (the shifts at the map's edges, one
    window a side, rectangular windows and maps)."""
    window = [data.draw(st.integers(1, 4)) for _ in range(2)]
    size = [w * data.draw(st.integers(1, 3)) for w in window]
    shift, heads = [data.draw(st.integers(0, w - 1)) for w in window], data.draw(st.sampled_from([1, 2, 4]))
    library = data.draw(st.sampled_from(["timm", "timm clamping", "torchvision"]))
    block = TvSwin.ShiftedWindowAttention(8, window, shift, heads) if library == "torchvision" else \
        SwinBlock(8, size, num_heads=heads, window_size=window, shift_size=shift, always_partition=library == "timm")
    module = _randomised(_Block(size, window, shift, block))
    check_parity(module, from_torch(module, (3, *size)), (3, *size), batch=2)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_window_attention_torch_equals_onnx(data):
    """Windows that tile the map, any shift below them, 1 or 2 heads, with or without a bias: torch = ONNX."""
    height, width = data.draw(st.sampled_from([2, 4, 6])), data.draw(st.sampled_from([1, 3, 4, 6]))
    window = [data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in (height, width)]
    fields = {"window": window, "shift": [data.draw(st.integers(0, w - 1)) for w in window],
              "heads": data.draw(st.sampled_from([1, 2]))}
    if data.draw(st.booleans()):
        t = window[0] * window[1]
        fields.update(bias_offsets=t, bias_index=[[(3 * i + j) % t for j in range(t)] for i in range(t)])
    spec = validate({**_spec(**fields), "input_shape": [2, height, width]})
    spec_logits(spec, random_params(spec, 3, 0), torch.randn(2, 2, height, width))


def test_the_mask_is_the_libraries_own():
    block = SwinBlock(8, (8, 8), num_heads=2, window_size=4, shift_size=2)
    assert np.array_equal(window_mask(8, 8, 4, 4, 2, 2), block.attn_mask.numpy())
    wide = SwinBlock(8, (8, 12), num_heads=2, window_size=(4, 4), shift_size=(0, 2), always_partition=True)
    assert np.array_equal(window_mask(8, 12, 4, 4, 0, 2), wide.attn_mask.numpy())
    assert window_mask(8, 8, 4, 4, 0, 0) is None  # no shift, nothing masked


class _Merge(nn.Module):
    """A stem to a channels-last 5×5 map and one patch merging (an odd map: padded by a zero row and column)."""

    def __init__(self, merge: nn.Module, keep: str | None = None):
        super().__init__()
        self.stem, self.merge, self.fc = nn.Conv2d(3, 4, 3, stride=2, padding=1), merge, nn.Linear(8, 2)
        self.keep = keep

    def forward(self, x):
        merged = self.merge(self.stem(x).permute(0, 2, 3, 1))
        kept = merged.mean((1, 2), **{self.keep: True}).permute(0, 3, 1, 2).flatten(1) if self.keep else None
        pooled = merged.mean((1, 2)) if kept is None else kept
        return self.fc(pooled)


@pytest.mark.parametrize("merge, keep", [(lambda: timm.models.swin_transformer.PatchMerging(4), None),
                                         (lambda: TvSwin.PatchMerging(4), "keepdim"),
                                         (lambda: TvSwin.PatchMerging(4), "keepdims")])  # numpy's name: torch's too
def test_patch_merging_order_and_odd_maps(merge, keep):
    """Both libraries' merging on a 5×5 map, then the mean over the channels-last map (kept as (B, 1, 1, C), still
    channels-last, permuted back and flattened; or not kept)."""
    module = _Merge(merge(), keep).eval()
    spec = from_torch(module, (3, 10, 10))
    check_parity(module, spec, (3, 10, 10), batch=2)
    ops = {n["op"]: n for n in spec["nodes"]}
    assert ops["pad"]["pads"] == [0, 0, 1, 1] and ops["space_to_depth"]["order"] == "wh"
    weights, x = {**tensors_of(module, spec), **classifier_of(module)}, torch.randn(2, 3, 10, 10)
    onnx_order = copy.deepcopy(spec)
    del next(n for n in onnx_order["nodes"] if n["op"] == "space_to_depth")["order"]  # ONNX's (0,0),(0,1),…
    assert np.abs(spec_logits(onnx_order, weights, x) - spec_logits(spec, weights, x)).max() > 1e-3


def _spec(narrow: bool = False, **fields) -> dict:
    conv = {"op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1}
    return {"name": "w", "input_shape": [2, 4, 6], "output": "f", "nodes": [
        *({"name": n, **conv, "out": 2 if narrow and n != "q" else 4} for n in "qkv"),
        {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 0.5, **fields},
        {"name": "p", "op": "gap", "inputs": ["a"]}, {"name": "f", "op": "flatten", "inputs": ["p"]}]}


def test_window_fields_validate_and_count():
    node = validate(_spec(window=2))["nodes"][3]
    assert node["window"] == [2, 2] and node["shift"] == [0, 0]
    assert not {"window", "shift", "bias_table"} & set(validate(_spec())["nodes"][3])  # as before windows
    # scores per window: heads × T × wh·ww, not heads × T², in the bound and the runtime's estimate
    big = {**_spec(window=8), "input_shape": [2, 128, 128]}
    assert intermediates(validate(big)["nodes"][3], [[4, 128, 128]] * 3) < 2 * 128 * 128 * 64 * 4
    with pytest.raises(UsageError, match="scores per sample"):
        validate({**_spec(), "input_shape": [2, 128, 128]})
    shifted = validate(_spec(window=[2, 3], shift=[1, 1], bias_offsets=15, bias_index=[[1] * 6] * 6,
                             bias_table="swin"))
    assert param_shapes(shifted)["a.bias"] == (2, 15)
    for bad, words in [(dict(shift=1), "shift \\[1, 1\\] needs a window"), (dict(window=4), "tile the map"),
                       (dict(window=2, shift=2), "shift below the window"),
                       (dict(window=2, bias_offsets=9, bias_index=[[0] * 24] * 24), "must be 4 rows"),
                       (dict(bias_table="swin"), "needs a bias_offsets"), (dict(window=2, bias_table="x"), "'swin'"),
                       (dict(window=2, kv_heads=1), "kv_heads = heads")]:
        spec = _spec(**bad)
        if "kv_heads" in bad:  # multi-query: one k/v head of 2 channels, valid without the window
            validate(_spec(kv_heads=1, narrow=True))
            spec = _spec(narrow=True, **bad)
        with pytest.raises(UsageError, match=words):
            validate(spec)
    with pytest.raises(UsageError, match="'hw' or 'wh'"):
        validate({"name": "s", "input_shape": [1, 4, 4], "nodes": [
            {"name": "s", "op": "space_to_depth", "inputs": ["input"], "block": 2, "order": "xy"}]})


class _OnFirst(nn.Module):
    """A Swin block fed a channels-first map (no permute): it runs (C = H = W), but not as Swin means."""

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 8, 1), SwinBlock(8, (8, 8), num_heads=2, window_size=4), \
            nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((1, 2)))


class _Unmixed(nn.Module):
    """Runs where timm's WindowAttention does (windows and a mask in, windows out) but attends to nothing."""

    def forward(self, x, mask=None):
        return x


def _tv_v2_edited(edit) -> nn.Module:
    module = TvSwin.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                                    block=TvSwin.SwinTransformerBlockV2, downsample_layer=TvSwin.PatchMergingV2)
    edit(module.features[1][1].attn)
    return module


def _timm_edited(edit) -> nn.Module:
    module = _timm_swin()
    edit(module.layers[0].blocks[1])
    return module


@pytest.mark.parametrize("make, shape, words", [
    (lambda: timm.models.swin_transformer.SwinTransformer(img_size=24, patch_size=2, embed_dim=16, depths=(2,),
                                                         num_heads=(2,), window_size=5), (3, 24, 24),
     "5×5 windows do not tile the 12×12 map"),
    # torchvision's Swin V2 goes in (tests/test_swinv2_torchvision.py); a cpb_mlp of another activation does not
    (lambda: _tv_v2_edited(lambda a: a.cpb_mlp.__setitem__(1, nn.GELU())), (3, 16, 16), "Swin V2.*cpb_mlp is not"),
    (lambda: _timm_edited(lambda b: setattr(b.mlp, "norm", nn.LayerNorm(64))), (3, 32, 32), "Mlp with an activation"),
    (lambda: _timm_edited(lambda b: setattr(b, "norm1", nn.Identity())), (3, 32, 32), "'layers.0.blocks.1.norm1'"),
    (lambda: _timm_edited(lambda b: setattr(b.attn, "proj_drop", nn.ReLU())), (3, 32, 32), "proj_drop is a ReLU"),
    (lambda: _timm_edited(lambda b: setattr(b, "attn", _Unmixed())), (3, 32, 32), "its attn is a _Unmixed"),
    (_OnFirst, (3, 8, 8), "channels-last"),
    # built for an 8×16 map, fed a 16×8 one: timm applies its stored 8×16 mask (8 windows either way), not the map's
    (lambda: _Block((8, 16), (4, 4), (2, 2)), (3, 16, 8), "attention mask built for an 8×16 map"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, shape, words):
    with pytest.raises(UsageError, match=words) as err:
        from_torch(make().eval(), shape)
    assert "Swin" in str(err.value) and ".py:" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("size", [56, 112])  # 56: stage maps 14, 7, 4 (an odd merge, padded), 2; 112: 28 … 4
def test_timm_swin_tiny(size):
    module = _randomised(timm.create_model("swin_tiny_patch4_window7_224", img_size=size))
    spec = from_torch(module, (3, size, size))
    check_parity(module, spec, (3, size, size), batch=2)
    assert sum(n["op"] == "attention" for n in spec["nodes"]) == 12


@pytest.mark.slow
def test_torchvision_swin_t_at_224():  # stage maps 56, 28, 14, 7: windows of 7 tile every one
    module = _randomised(torchvision.models.swin_t())
    spec = from_torch(module, (3, 224, 224))
    check_parity(module, spec, (3, 224, 224), batch=2)
    shifts = [n["shift"] for n in spec["nodes"] if n["op"] == "attention"]
    assert shifts == [[0, 0], [3, 3]] * 5 + [[0, 0], [0, 0]]  # the last stage's window covers its 7×7 map
