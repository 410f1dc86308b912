"""Split attention (timm's SelectiveKernel and SplitAttn): a ``branch_softmax`` node whose torch and ONNX forms are
the softmax across branches of each channel; from_torch rebuilds both modules from existing ops around it with exact
parity for several path counts, radixes and cardinalities; the channel map ties channel c of every branch and every
logit block, so compaction removes a channel only from all of them; variants are refused by name with the source
line."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from layer_nets import TinySplitAttn
from torch_nets import check_parity, randomise_batchnorm

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.arch.fx_import import tensors_of
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.graph.compact import compact_task
from edgecl.train.methods.rgo_fel import fel_plan
from edgecl.train.models import forward, from_numpy
from timm.layers.selective_kernel import SelectiveKernel
from timm.layers.split_attn import SplitAttn


class _Attended(nn.Module):
    """stem → the block → a 1×1 conv → mean → classifier."""

    def __init__(self, block: nn.Module, width: int, out: int):
        super().__init__()
        self.stem, self.block = nn.Conv2d(2, width, 3, padding=1), block
        self.mix, self.fc = nn.Conv2d(out, 5, 1), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.mix(self.block(self.stem(x))).mean((2, 3)))


def _sharpened(block: nn.Module, width: int, out: int) -> _Attended:
    """Weights ×3, so the attention is far from uniform and every logit shows in the output."""
    torch.manual_seed(0)
    module = _Attended(block, width, out).eval()
    randomise_batchnorm(module)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(3)
    return module


VARIANTS = {
    "sk two paths, split input": (lambda: SelectiveKernel(8, 8, rd_channels=4), 8, 8),
    "sk three paths": (lambda: SelectiveKernel(8, 6, kernel_size=[3, 5, 7], split_input=False, rd_channels=4), 8, 6),
    "sk 5x5 kept": (lambda: SelectiveKernel(6, 4, kernel_size=[3, 5], keep_3x3=False, rd_channels=4), 6, 4),
    "splat radix 2": (lambda: SplitAttn(8, 8, radix=2, norm_layer=nn.BatchNorm2d), 8, 8),
    "splat radix 2, cardinality 2": (lambda: SplitAttn(8, 8, radix=2, groups=2, norm_layer=nn.BatchNorm2d), 8, 8),
    "splat radix 3, cardinality 2": (lambda: SplitAttn(12, 12, radix=3, groups=2, rd_channels=4), 12, 12),
    "splat radix 4, stride 2": (lambda: SplitAttn(8, 4, radix=4, stride=2, rd_channels=2), 8, 4),
    "splat radix 1 (sigmoid)": (lambda: SplitAttn(8, 8, radix=1, groups=2, norm_layer=nn.BatchNorm2d), 8, 8),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_attention_variants_equal_the_module(variant):
    make, width, out = VARIANTS[variant]
    module = _sharpened(make(), width, out)
    spec = from_torch(module, (2, 7, 7))
    check_parity(module, spec, (2, 7, 7))
    softmaxes = [n for n in spec["nodes"] if n["op"] == "branch_softmax"]
    assert len(softmaxes) == (0 if "radix 1" in variant else 1)


def test_tiny_split_attn_equals_the_module():
    module = TinySplitAttn(in_channels=3).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    check_parity(module, spec, (3, 8, 8))
    nodes = node_by_name(spec)
    assert nodes["sk.0.softmax"] == {**nodes["sk.0.softmax"], "op": "branch_softmax", "branches": 2,
                                          "inputs": ["sk.0.attn.fc_select"]}
    assert nodes["splat.3.rsoftmax.order"]["op"] == "cat"  # cardinality 2: logits laid out branch-major first
    assert nodes["sk.0.paths.1.conv"]["dilation"] == [2, 2] and nodes["sk.0"]["op"] == "add"


def test_branch_softmax_is_the_softmax_of_each_channel_across_blocks():
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((4, 6, 2, 2))).astype(np.float32)
    spec = validate({"name": "bs", "input_shape": [6, 2, 2], "nodes": [
        {"name": "s", "op": "branch_softmax", "inputs": ["input"], "branches": 3},
        {"name": "f", "op": "flatten", "inputs": ["s"]}]})
    e = np.exp(x.reshape(4, 3, 2, 2, 2))
    want = (e / e.sum(axis=1, keepdims=True)).reshape(4, -1)
    params = {"head.weight": np.eye(24, dtype=np.float32), "head.bias": np.zeros(24, np.float32)}
    with torch.no_grad():
        got = forward(spec, from_numpy(params), torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(build_onnx(spec, params).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(session.run(None, {"x": x})[0] - want).max() < 1e-6


def test_spec_refuses_branches_that_do_not_divide_the_channels():
    with pytest.raises(UsageError, match="whose channels 4 branches divide"):
        validate({"name": "bad", "input_shape": [6, 1, 1], "nodes": [
            {"name": "s", "op": "branch_softmax", "inputs": ["input"], "branches": 4},
            {"name": "f", "op": "flatten", "inputs": ["s"]}]})


def test_channel_map_ties_every_branch_and_logit_block_channel_by_channel():
    """SelectiveKernel: both paths' channels, both blocks of the logits and the output are one group; nothing is
    pinned or ordered (a softmax across branches never mixes channels), and RGO may permute it."""
    spec = from_torch(_sharpened(SelectiveKernel(8, 8, rd_channels=4), 8, 8), (2, 7, 7))
    cm = channel_map(spec)
    unit = cm.rows["block.paths.0.conv.weight"]
    assert unit == cm.rows["block.paths.1.conv.weight"] == cm.spaces["block"] and len(unit) == 1
    assert cm.rows["block.attn.fc_select.weight"] == unit * 2 and cm.cols["block.attn.fc_reduce.weight"] == unit
    assert not cm.pinned and not cm.ordered
    assert unit[0][0] in fel_plan(spec).groups


def _compacted(dead_paths: tuple[int, ...]) -> tuple[int, float]:
    """SelectiveKernel with channel 3 dead in `dead_paths` (zero filters) and in both logit blocks: the compacted
    block's width and the largest logit difference to the dense network."""
    module = _sharpened(SelectiveKernel(8, 8, rd_channels=4), 8, 8)
    spec = from_torch(module, (2, 7, 7))
    rng = np.random.default_rng(0)
    params = {**tensors_of(module, spec), "head.weight": rng.standard_normal((3, 5)).astype(np.float32),
              "head.bias": np.zeros(3, np.float32)}
    for i in dead_paths:
        params[f"block.paths.{i}.conv.weight"][3] = 0
    params["block.attn.fc_select.weight"][[3, 11]] = 0
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    x = torch.from_numpy(rng.standard_normal((5, 2, 7, 7)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    return node_by_name(small)["block.paths.0.conv"]["out"], float(np.abs(dense.numpy() - compact.numpy()).max())


def test_compaction_removes_a_channel_dead_in_every_branch_from_all_of_them():
    """Dead in both paths: its logits are constant too, so channel 3 goes from both paths, both logit blocks and the
    readers, and each remaining channel's softmax is what it was."""
    width, error = _compacted((0, 1))
    assert width == 7 and error < 1e-4


def test_compaction_keeps_a_channel_one_branch_still_uses():
    width, error = _compacted((0,))
    assert width == 8 and error < 1e-4


class _Block(nn.Module):
    def __init__(self, attn: nn.Module, width: int = 8):
        super().__init__()
        self.stem, self.attn, self.fc = nn.Conv2d(2, width, 3, padding=1), attn, nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean((2, 3)))


def test_variants_are_refused_by_name():
    at = r"\(call_module attn, at .*test_split_attn.py:\d+: .*\)"
    skewed = SplitAttn(8, 8, radix=2, groups=2)
    skewed.rsoftmax.cardinality = 1  # softmax over another layout than its fc2 writes
    with pytest.raises(UsageError, match=rf"SplitAttn at 'attn' {at}: edgecl follows timm's layout .*radix 2"):
        from_torch(_Block(skewed), (2, 6, 6))
    aa = SelectiveKernel(8, 8, stride=2, aa_layer=nn.AvgPool2d, rd_channels=4)
    with pytest.raises(UsageError, match=rf"SelectiveKernel at 'attn' {at}: path 0 has anti-aliasing"):
        from_torch(_Block(aa), (2, 6, 6))
    unnormed = SelectiveKernel(8, 8, rd_channels=4)
    unnormed.paths[1].bn = nn.GroupNorm(2, 8)
    with pytest.raises(UsageError, match=rf"SelectiveKernel at 'attn' {at}: 'attn.paths.1.bn' is a GroupNorm"):
        from_torch(_Block(unnormed), (2, 6, 6))
    gelu = SplitAttn(8, 8, radix=2, act_layer=nn.Mish)
    with pytest.raises(UsageError, match=rf"SplitAttn at 'attn' {at}: activation Mish at 'attn.act0'"):
        from_torch(_Block(gelu), (2, 6, 6))
