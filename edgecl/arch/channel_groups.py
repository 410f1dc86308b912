"""The union-find and the cuts behind `edgecl.arch.channels`: groups found to be one unit, a group split where a
slice, a merge or an attention's heads cut through it (every tensor holding it then has both parts), and the bounds
that keep a hostile spec from making the map build millions of segments. Cuts at many bounds split a group once
(`cut_many`): resolving the axis again per cut was quadratic."""
from __future__ import annotations

from bisect import bisect_left, bisect_right

from edgecl.arch.spec import INPUT
from edgecl.errors import UsageError

Segments = list[tuple[str, int]]
# How many segments the map follows: per axis (a node's output, a tensor's rows or columns) and over the whole map. Every
# network of tools/model_coverage.py stays far below (largest: shufflenet_v2_x0_5, 192 on one axis and 15 575 in all;
# shufflenet_v2_x2_0 976 and 78 001; resnet50, efficientnet_b0, ViTs at 224: 1-3 and under 650, TResNet's s2d 16);
# past them a spec of a few nodes — a space_to_depth of a 1024×1024 input, 20 nested cat(x, x) — made 2^20 segments
# (seconds, hundreds of MB), so `channel_map` refuses it by node as soon as a count passes, before building the rest.
MAX_AXIS_SEGMENTS = 1 << 14
MAX_SEGMENTS = 1 << 19


class ChannelError(UsageError):
    """The graph mixes channels in a way no per-channel unit describes (e.g. a residual add over differently
    concatenated branches, or a reshape that moves channels into space)."""


class UnionFind:
    """Groups that are one unit, plus aliases: a group found to be a concatenation of others (an SE gate's conv
    multiplying a concatenated tensor) stands for those segments from then on."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.order: dict[str, int] = {}
        self.alias: dict[str, Segments] = {}
        self.origin: dict[str, tuple[str, int]] = {}  # a part of a split group → (the layer it came from, offset)
        self.where = ""  # what a too-long axis is refused as (the node or tensor being mapped)

    def add(self, g: str) -> None:
        self.parent[g] = g
        self.order[g] = len(self.order)

    def find(self, g: str) -> str:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the earlier group names the merged one, so names do not depend on the order of adds
            first, second = (ra, rb) if self.order[ra] < self.order[rb] else (rb, ra)
            self.parent[second] = first

    def resolve(self, segments: Segments) -> Segments:
        """The segments in current groups, split groups replaced by their parts in order. A stack, not recursion: a
        group cut again and again (a slice per channel, an attention's many query heads) nests its parts deeply."""
        out: Segments = []
        stack = list(reversed(segments))
        while stack:
            g, r = stack.pop()
            root = self.find(g)
            if root in self.alias:
                stack += [(h, r * q) for h, q in reversed(self.alias[root])]
            else:
                out.append((root, r))
                if len(out) > MAX_AXIS_SEGMENTS:
                    raise too_many(self.where, f"one of its axes has more than {MAX_AXIS_SEGMENTS}")
        return out


def too_many(where: str, what: str) -> ChannelError:
    return ChannelError(f"{where}: {what} channel segments (groups laid side by side); edgecl follows at most "
                        f"{MAX_AXIS_SEGMENTS} on one axis and {MAX_SEGMENTS} in all, far above any real network; "
                        "channels cannot be followed through it")


def bound_axis(where: str, count: int) -> int:
    """`count` segments on one axis, or ChannelError naming `where` past MAX_AXIS_SEGMENTS (before they are built)."""
    if count > MAX_AXIS_SEGMENTS:
        raise too_many(where, f"{count}")
    return count


def cut_slice(uf: UnionFind, size: dict[str, int], node: dict, x: Segments) -> Segments:
    """The whole groups of `x` between the slice's start and stop, after splitting a group cut at either bound."""
    for bound in (node["start"], node["stop"]):
        cut_at(uf, size, uf.resolve(x), bound, node)
    return [(g, r) for g, r, begin, end in segment_spans(uf.resolve(x), size)
            if node["start"] <= begin and end <= node["stop"]]


def cut_blocks(uf: UnionFind, size: dict[str, int], node: dict, x: Segments, n: int, per: int) -> list[Segments]:
    """`x` as `n` consecutive blocks of `per` channels, each the whole groups `cut_slice` would give: cut at every block
    bound at once and resolved once (a slice per block re-resolved the axis per block: quadratic in heads)."""
    if n == 1:
        return [x]
    cut_many(uf, size, x, {i * per for i in range(1, n)}, node)
    out: list[Segments] = [[] for _ in range(n)]
    for g, r, begin, _ in segment_spans(uf.resolve(x), size):
        out[begin // per].append((g, r))
    return out


def cut_at(uf: UnionFind, size: dict[str, int], segments: Segments, bound: int, node: dict) -> None:
    """Split the group whose channels `bound` (a position of the axis `segments`) falls inside, into the channels
    before it and those from it on: one group aliased to two new ones."""
    for g, r, pos, end in segment_spans(segments, size):
        if pos < bound < end:
            k = channel_offset(g, r, pos, bound, node)
            split_group(uf, size, g, [k, size[g] - k])
            return


def channel_offset(g: str, r: int, pos: int, bound: int, node: dict) -> int:
    """The channel of group `g` (its segment at `pos`, each channel `r` features) a cut at `bound` splits it before;
    ChannelError where the cut falls inside a channel's features or in the network input."""
    if (bound - pos) % r:
        raise ChannelError(f"node {node['name']!r} ({op_text(node)}) cuts through the {r} features of one "
                           f"channel of {g!r}; channels cannot be followed through it")
    if g == INPUT:
        raise ChannelError(f"node {node['name']!r} ({op_text(node)}) splits the network input's channels; "
                           "channels cannot be followed through it")
    return (bound - pos) // r


def cut_many(uf: UnionFind, size: dict[str, int], segments: Segments, bounds: set[int], node: dict) -> None:
    """Cut the axis `segments` at every position of `bounds`: each group cut is split once at all its cut offsets
    (what cutting bound by bound leaves, with the same part names). Cutting bound by bound resolved the whole axis
    again per bound, through an alias chain as deep as the cuts: quadratic, a merge of two 4096-segment
    concatenations took 48 s and a 4096-head multi-query attention 55 s."""
    offsets: dict[str, set[int]] = {}
    ordered = sorted(bounds)
    for g, r, pos, end in segment_spans(uf.resolve(segments), size):
        for bound in ordered[bisect_right(ordered, pos):bisect_left(ordered, end)]:
            offsets.setdefault(g, set()).add(channel_offset(g, r, pos, bound, node))
    for g, cuts in offsets.items():
        edges = [0, *sorted(cuts), size[g]]
        split_group(uf, size, g, [b - a for a, b in zip(edges, edges[1:])])


def split_group(uf: UnionFind, size: dict[str, int], g: str, widths: list[int]) -> None:
    """Group `g` becomes consecutive new groups of `widths` channels (an alias of them), each named by the channels
    of the layer it came from."""
    base, start = uf.origin.get(g, (g, 0))
    parts = []
    for n in widths:
        part = name = f"{base}:{start}-{start + n}"  # characters a blob key allows (nodes:GROUP)
        while part in uf.parent:  # a layer of the user's may carry that name
            part = f"{name}_{len(uf.parent)}"
        uf.add(part)
        uf.origin[part] = (base, start)
        size[part] = n
        parts.append((part, 1))
        start += n
    uf.alias[g] = parts


def op_text(node: dict) -> str:
    """A node's op as a message names it: a slice with its bounds."""
    return f"{node['op']} {node['start']}:{node['stop']}" if "start" in node else node["op"]


def segment_bounds(segments: Segments, size: dict[str, int]) -> set[int]:
    """Positions where one segment ends and the next begins."""
    return {end for _, _, _, end in segment_spans(segments, size)[:-1]}


def segment_spans(segments: Segments, size: dict[str, int]) -> list[tuple[str, int, int, int]]:
    """(group, repeat, first position, end position) of every segment of an axis made of `segments`."""
    out, pos = [], 0
    for g, r in segments:
        out.append((g, r, pos, pos + size[g] * r))
        pos += size[g] * r
    return out
