"""ShuffleNet's channel shuffle: ``view(b, g, c // g, h, w) → transpose(1, 2) → view(b, c, h, w)`` becomes one
``shuffle`` node whose torch and ONNX forms equal the module; the channel map follows every channel through it (so
node masks and feature encodings do) and compaction keeps what it interleaves; other uses of the grouped view are
refused naming op and source line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.train.models import forward, from_numpy
from torch_nets import TinyShuffle, _shuffle, check_parity, randomise_batchnorm


def test_tiny_shuffle_equals_the_module():
    module = TinyShuffle(in_channels=3).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    shuffles = [n for n in spec["nodes"] if n["op"] == "shuffle"]
    assert [n["groups"] for n in shuffles] == [2, 3] and "reshape" not in {n["op"] for n in spec["nodes"]}
    check_parity(module, spec, (3, 8, 8))


def _spec(groups: int = 2) -> dict:
    """Two convs (a: 2 channels, b: 4) concatenated, shuffled, read by a 1×1 conv."""
    return validate({"name": "shuffle", "input_shape": [1, 4, 4], "nodes": [
        {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 2, "k": 3, "pad": 1},
        {"name": "b", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 3, "pad": 1},
        {"name": "ab", "op": "cat", "inputs": ["a", "b"]},
        {"name": "s", "op": "shuffle", "inputs": ["ab"], "groups": groups},
        {"name": "c", "op": "conv", "inputs": ["s"], "in": 6, "out": 3, "k": 1},
        {"name": "g", "op": "gap", "inputs": ["c"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})


def test_channel_map_follows_each_channel_through_the_shuffle():
    cm = channel_map(_spec())
    # a0 a1 b0 b1 b2 b3 as 2 groups of 3 → a0 b1 a1 b2 b0 b3
    order = [g for g, _ in cm.cols["c.weight"]]
    assert order == ["a:0-1", "b:1-2", "a:1-2", "b:2-3", "b:0-1", "b:3-4"]
    assert cm.rows["a.weight"] == [("a:0-1", 1), ("a:1-2", 1)] and cm.pinned == set(order)


def test_compaction_keeps_shuffled_channels_and_the_logits():
    spec = _spec()
    rng = np.random.default_rng(0)
    params = {"a.weight": rng.standard_normal((2, 1, 3, 3)), "a.bias": rng.standard_normal(2),
              "b.weight": rng.standard_normal((4, 1, 3, 3)), "b.bias": rng.standard_normal(4),
              "c.weight": rng.standard_normal((3, 6, 1, 1)), "c.bias": rng.standard_normal(3),
              "head.weight": rng.standard_normal((2, 3)), "head.bias": rng.standard_normal(2)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    params["c.weight"][:, 1] = 0  # nobody reads b's channel 1 after the shuffle
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    assert node_by_name(small)["b"]["out"] == 4  # a shorter shuffle would interleave the rest differently
    x = torch.from_numpy(rng.standard_normal((3, 1, 4, 4)).astype(np.float32))
    with torch.no_grad():
        assert torch.allclose(forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x), atol=1e-5)
    with pytest.raises(UsageError, match="shuffle needs a .* whose channels 4 groups divide"):
        _spec(groups=4)


class _Refused(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.conv, self.fc = kind, nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        x, k = self.conv(x), self.kind
        b, c, h, w = x.size()
        grouped = x.view(b, 2, c // 2, h, w)
        if k == "other transpose":
            x = grouped.transpose(3, 4).contiguous().view(b, c, h, w)
        elif k == "pooled while grouped":
            x = grouped.mean(2).view(b, 2, h, w)
            x = torch.cat([x, x], 1)
        elif k == "returned grouped":
            return grouped
        elif k == "viewed back transposed":  # (c, w, h) on a non-square map: not the map the shuffle came from
            x = grouped.transpose(1, 2).contiguous().view(b, c, w, h)
        elif k == "computed dims":
            x = grouped.transpose(1, grouped.dim() - 3).contiguous().view(b, c, h, w)
        elif k == "keyword dims":
            x = torch.transpose(grouped, dim0=1, dim1=2).contiguous().view(b, c, h, w)
        return self.fc(x.mean([2, 3]))


@pytest.mark.parametrize("kind, match", [
    ("other transpose", r"'transpose' .* edgecl follows a channel shuffle written as view\(b, g, c // g, h, w\)"),
    ("pooled while grouped", r"'mean' .* reads a grouped view of channels"),
    ("returned grouped", r"returns a grouped view of channels"),
    ("viewed back transposed", r"'view' .* edgecl follows a channel shuffle"),
])
def test_other_uses_of_a_grouped_view_are_refused(kind, match):
    with pytest.raises(UsageError, match=match):
        from_torch(_Refused(kind), (3, 4, 6))


def test_transpose_dims_by_keyword_and_a_group_held_twice():
    """torch.transpose(x, dim0=1, dim1=2) is the same shuffle; shuffle(cat(a, a)) splits a into channels once (no
    orphaned groups for AGS-CL to count as nodes). Dims computed from the rank (``x.dim() - 3``) are numbers at the
    import shape (`fx_shape_flow`): the same shuffle."""
    for kind in ("keyword dims", "computed dims"):
        module = _Refused(kind)
        spec = from_torch(module, (3, 4, 6))
        assert [n["op"] for n in spec["nodes"]].count("shuffle") == 1
        check_parity(module, spec, (3, 4, 6))
    twice = validate({"input_shape": [1, 4, 4], "nodes": [
        {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 3, "k": 1},
        {"name": "aa", "op": "cat", "inputs": ["a", "a"]}, {"name": "s", "op": "shuffle", "inputs": ["aa"], "groups": 2},
        {"name": "c", "op": "conv", "inputs": ["s"], "in": 6, "out": 3, "k": 1},
        {"name": "g", "op": "gap", "inputs": ["c"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})
    cm = channel_map(twice)
    assert sorted(g for g in cm.groups if g.startswith("a")) == ["a:0-1", "a:1-2", "a:2-3"]


def test_a_view_grouped_and_straight_back_or_a_shuffle_in_one_group_is_nothing():
    class RoundTrip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            b, c, h, w = x.size()
            return self.fc(_shuffle(x, 1).view(b, 1, c, h, w).view(b, c, h, w).mean([2, 3]))

    spec = from_torch(RoundTrip(), (3, 5, 5))
    assert [n["op"] for n in spec["nodes"]] == ["conv", "gap", "flatten"]  # one group: nothing moves
