"""The channel map's bounds (`edgecl.arch.channel_groups.MAX_AXIS_SEGMENTS`, `MAX_SEGMENTS`): a spec of a few nodes
could make it build 2^20 segments (a space_to_depth of a 1024×1024 input, 20 nested cat(x, x): ~1-4 s and 166-631 MB
measured); such a spec is refused by node, at once and in a few MB, and real networks stay far below the bounds."""
from __future__ import annotations

import tracemalloc

import pytest
import torch

from edgecl.arch import ChannelError, channel_map, from_torch, validate
from edgecl.arch.channel_groups import MAX_AXIS_SEGMENTS, MAX_SEGMENTS
from edgecl.arch.factories import ensure_torchvision_imports
from edgecl.errors import UsageError
from edgecl.train.methods.agscl import AGSCL
from tools_loader import load_tool

BENCH = load_tool("bench_channel_map")
HEAD = BENCH.HEAD


def _spec(nodes: list[dict], channels: int = 1, side: int = 1) -> dict:
    return validate({"name": "many", "input_shape": [channels, side, side], "output": "f", "nodes": [*nodes, *HEAD]})


def _refused(spec: dict) -> str:
    """The refusal's message, checking it came before the memory was spent (the unbounded map took 166-631 MB)."""
    tracemalloc.start()
    try:
        with pytest.raises(ChannelError) as info:
            channel_map(spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2 ** 20, peak
    return str(info.value)


def _cat_chain(depth: int, then: int = 0) -> list[dict]:
    """A conv of one channel, `depth` nodes cat(x, x) (2^depth segments), then `then` ReLUs."""
    nodes = [{"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 1, "k": 1}]
    for i in range(depth):
        nodes.append({"name": f"c{i}", "op": "cat", "inputs": [nodes[-1]["name"]] * 2})
    for i in range(then):
        nodes.append({"name": f"r{i}", "op": "relu", "inputs": [nodes[-1]["name"]]})
    nodes.append({"name": "last", "op": "relu", "inputs": [nodes[-1]["name"]]})
    return nodes


def test_a_space_to_depth_of_a_huge_input_is_refused_by_node():
    side = 1024  # block 1024: 2^20 copies of the input's group
    spec = _spec([{"name": "s2d", "op": "space_to_depth", "inputs": ["input"], "block": side},
                  {"name": "last", "op": "conv", "inputs": ["s2d"], "in": side * side, "out": 2, "k": 1}], side=side)
    message = _refused(spec)
    assert message.startswith("node 's2d' (space_to_depth): 1048576 channel segments")
    assert str(MAX_AXIS_SEGMENTS) in message
    with pytest.raises(UsageError, match="agscl: node 's2d'"):  # a method names it too, not a raw error
        AGSCL(spec)


def test_nested_concatenations_are_refused_at_the_first_node_past_the_bound():
    message = _refused(_spec(_cat_chain(20)))
    first = MAX_AXIS_SEGMENTS.bit_length()  # c{i} has 2^(i+1) segments
    assert message.startswith(f"node 'c{first - 1}' (cat): {2 ** first} channel segments")
    channel_map(_spec(_cat_chain(first - 1)))  # exactly at the bound: followed


def test_the_whole_map_is_bounded_too():
    """Axes each within the bound, but many of them: refused at the node where the sum passes MAX_SEGMENTS."""
    depth = MAX_AXIS_SEGMENTS.bit_length() - 2  # 2^depth segments on every ReLU after the chain
    per = 2 ** depth
    before = sum(2 ** (i + 1) for i in range(depth)) + 1  # the conv and the chain
    n = (MAX_SEGMENTS - before) // per + 1  # the ReLU at which the sum passes
    message = _refused(_spec(_cat_chain(depth, then=n + 5)))
    assert message.startswith(f"node 'r{n - 1}' (relu): the axes up to it have more than {MAX_SEGMENTS}")


def test_a_shuffle_of_very_many_channels_is_refused_before_cutting_them():
    wide = 2 * MAX_AXIS_SEGMENTS + 2
    spec = _spec([{"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": wide, "k": 1},
                  {"name": "last", "op": "shuffle", "inputs": ["a"], "groups": 2}])
    assert _refused(spec).startswith(f"node 'last' (shuffle): {wide} channel segments")


@pytest.mark.parametrize("name, largest", [("shufflenet_v2_x0_5", 192), ("resnet50", 1), ("efficientnet_b0", 1)])
def test_real_networks_are_far_below_the_bounds(name, largest):
    """The largest counts of tools/model_coverage.py's networks (shufflenet_v2_x0_5 is the largest of all, 15 575
    segments over the whole map)."""
    ensure_torchvision_imports()
    import torchvision

    torch.manual_seed(0)
    cm = channel_map(from_torch(getattr(torchvision.models, name)().eval(), (3, 32, 32)))
    axes = [*cm.spaces.values(), *cm.rows.values(), *cm.cols.values(), cm.head_cols]
    assert max(map(len, axes)) == largest and sum(map(len, axes)) < MAX_SEGMENTS // 30


def test_adding_concatenations_cut_at_other_points():
    """add(cat of 8192 copies of a 2-channel group, cat(1 channel, copies of it, 1 channel)): every bound of one side
    falls inside a group of the other, 8191 cuts of the same group — one split (its time against a quarter-size
    spec: tools/bench_channel_map.py; re-resolving the axis per cut took 48 s at a quarter of this size)."""
    depth = MAX_AXIS_SEGMENTS.bit_length() - 2  # 2^depth copies: 2^(depth+1) channels
    cm = channel_map(BENCH.merge_spec(depth))
    assert sorted(cm.groups.values()) == [1, 1] and len(cm.spaces["last"]) == 2 ** (depth + 1)


@pytest.mark.parametrize("kv_heads", [1, 2, 16384])
def test_an_attention_of_very_many_heads(kv_heads):
    """16384 query heads over 1, 2 or as many k/v heads (55 s at 4096 heads when each head re-resolved the axis)."""
    heads = 16384
    assert len(channel_map(BENCH.heads_spec(heads, kv_heads)).spaces["last"]) == (heads if kv_heads < heads else 1)
