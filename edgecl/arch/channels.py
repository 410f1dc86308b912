"""Which channels of a graph are one and the same: the channel-dependency map that node masks, structural compaction
and feature permutations need once a network has residual adds, gates, concatenations and depthwise convolutions.

Every conv or linear layer starts a *group* of channels (its output units). Ops that keep channels (BatchNorm, LayerNorm
over channels, layer scales, activations, pooling) pass a tensor's channels on (a LayerNorm *pins* its groups: each of
its outputs depends on all of them, so none may be removed); a depthwise convolution's output channel i is its input
channel i; a residual ``add`` and a per-channel ``mul`` gate make their inputs' channels one group (channel i of each
branch is the same unit of the network); ``cat`` lays groups side by side; ``flatten`` turns each channel into H·W
features; a ``space_to_depth`` lays block² copies of its input's groups side by side (as ``cat(x, …, x)``: each copy
holds the same channels at other positions); an ``attention_pool`` (GCNet) keeps its map's channels, as ``gap`` (its
logits come from a conv that reads them all, an ordinary reader); a ``slice`` takes whole groups: a group it cuts is
first split in two there (every tensor with that group on
an axis then has both parts, side by side), so every group stays a set of channels that one decision can keep or drop.
A ``shuffle`` interleaves channels of different groups: its input's groups are cut into single channels, listed in
the shuffled order, and pinned (a shuffle of fewer channels would order the rest differently). A ``reshape`` of a
(k·C, H, W) map to (C, k·H, W) stacks each k channels' maps along the rows (MViTv2's pooling shared by the heads):
its input is cut into single channels, each k of them one unit, and the reshape back lists each unit k times; both
sides pinned and ordered. A ``channel_conv``
(ECA) reads each channel's neighbours: its input's groups are pinned and *ordered* (no channel may go or move; its
``(k,)`` weight has no rows); so are a GroupNorm's of G > 1 groups (a ``layer_norm`` with ``groups``: each group a
contiguous block of channels whose statistics every one of its channels shifts). A ``branch_softmax`` (split
attention) makes channel c of each of its R blocks one unit, as an ``add`` of the blocks would: the blocks are cut
apart and tied channel by channel, so a decision about channel c is taken for all R of its logits at once
(removing one branch's logit would change the others' softmax; removing all R of them, or permuting every block
alike, leaves every other channel's values). Tokens are a
``(C, T, 1)`` map: a ``class_token`` or ``pos_embed`` keeps its input's channels and its weight's rows are them (like
a bias); an ``attention`` ties q's channels to k's (channel i of each meets in the dot products, one unit), its output
channels are v's, and q, k and v are pinned and ordered: each head is a contiguous block of channels, so removing or
moving one would move every later channel to another head. With fewer key/value heads than query heads (multi-query
attention: one), every query head's block is tied to its k head's block, and the output lists v's block once per
query head that reads it (a group repeated, as a concatenation of a tensor with itself). A ``channel_attention``
(EdgeNeXt's XCA: attention among a head's channels) ties q, k and v channel by channel and pins and orders them
all (`edgecl.arch.sdta_ops`); its output (each channel a mix of its head's v channels) and a ``fourier_pos`` grid
are groups of their own that no tensor produces, pinned. An ``outlook_attention`` (VOLO) keeps v's channels (each
output channel mixes its own v channel over a window) and pins and orders v and its logits (`edgecl.arch.outlook_ops`).
This is the dependency
graph Torch-Pruning's DepGraph builds on a traced model, computed here on the spec with a
union-find, without torch.

The result says, for every tensor, which group channels its axis 0 (``rows``) and, for conv/linear weights, its
input axis (``cols``) belong to — as *segments* ``(group, repeat)``: the axis is the concatenation of the segments,
each a group's channels in order, every channel repeated ``repeat`` times (H·W columns per channel after a flatten,
channel-major). The network input is the group ``"input"``; the heads read ``head_cols``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgecl.arch.channel_groups import (MAX_SEGMENTS, ChannelError, Segments, UnionFind, bound_axis, cut_blocks,
                                       cut_many, cut_slice, segment_bounds, segment_spans, split_group, too_many)
from edgecl.arch.op_rules import has_gain
from edgecl.arch.ops import CHANNEL_AFFINE_OPS, NEIGHBOUR_OPS, NORMALISING_OPS, TOKEN_TENSOR_OPS
from edgecl.arch.spec import INPUT, Arch, is_depthwise, node_by_name, node_shapes, node_tensor_shapes, param_shapes
from edgecl.arch.state_ops import STATE_OPS


@dataclass
class ChannelMap:
    groups: dict[str, int]  # group → number of channels
    rows: dict[str, Segments]  # tensor (weight, bias, BatchNorm tensor) → its axis 0
    cols: dict[str, Segments]  # conv/linear weight → its input axis (input channels, or features of a linear)
    head_cols: Segments  # the features the heads read
    spaces: dict[str, Segments] = field(default_factory=dict)  # node (and "input") → its output's channel axis
    # groups a LayerNorm normalises together (removing one channel changes every other's output) or a shuffle
    # interleaves (no shuffle of fewer channels puts the rest in the same order): none may go
    pinned: set[str] = field(default_factory=set)
    # groups a channel_conv reads as neighbours: a permutation of their channels changes its function
    ordered: set[str] = field(default_factory=set)

    def size(self, segments: Segments) -> int:
        """Length of an axis made of `segments`."""
        return sum(self.groups[g] * r for g, r in segments)

    def sliced(self, source: Segments, start: int, stop: int) -> tuple[int, int]:
        """The segments [i, j) of `source` that a slice of positions start:stop takes (always whole segments)."""
        spans = segment_spans(source, self.groups)
        bounds = {begin: i for i, (_, _, begin, _) in enumerate(spans)}
        bounds[self.size(source)] = len(source)
        if start not in bounds or stop not in bounds:  # `channel_map` cuts groups at every slice bound
            raise ChannelError(f"slice {start}:{stop} does not fall on channel groups {source[:6]}")
        return bounds[start], bounds[stop]

    def members(self) -> dict[str, list[str]]:
        """Group → every tensor with rows in it (producers: conv/linear rows, biases, BatchNorm channels)."""
        out: dict[str, list[str]] = {g: [] for g in self.groups}
        for tensor, segments in self.rows.items():
            for g, _ in segments:
                if tensor not in out[g]:
                    out[g].append(tensor)
        return out

    def readers(self) -> dict[str, list[str]]:
        """Group → every conv/linear weight (and "head") whose input axis reads it."""
        out: dict[str, list[str]] = {g: [] for g in self.groups}
        for tensor, segments in [*self.cols.items(), ("head", self.head_cols)]:
            for g, _ in segments:
                if tensor not in out[g]:
                    out[g].append(tensor)
        return out


def channel_map(arch: Arch) -> ChannelMap:
    """The channel groups of a validated spec; ChannelError naming the node where channels cannot be followed."""
    shapes = node_shapes(arch)
    uf = UnionFind()
    size: dict[str, int] = {}

    def new_group(name: str, n: int) -> Segments:
        uf.add(name)
        size[name] = n
        return [(name, 1)]

    spaces: dict[str, Segments] = {INPUT: new_group(INPUT, shapes[INPUT][0])}
    rows: dict[str, Segments] = {}
    cols: dict[str, Segments] = {}
    pinned_by: list[Segments] = []
    ordered_by: list[Segments] = []
    total = 0
    for node in arch["nodes"]:
        op, name = node["op"], node["name"]
        uf.where = f"node {name!r} ({op})"
        ins = [spaces[s] for s in node["inputs"]]
        x = ins[0]
        if op == "conv" and is_depthwise(node):
            out = x
            rows[f"{name}.weight"] = x
        elif op in ("conv", "linear"):
            cols[f"{name}.weight"] = x
            out = new_group(name, node["out"])
            rows[f"{name}.weight"] = out
        elif op in CHANNEL_AFFINE_OPS:
            out = x
            rows.update({f"{name}.{k}": x for k in node_tensor_shapes(node)})
            if op in NORMALISING_OPS:
                pinned_by.append(x)
            if node.get("groups", 1) > 1:  # a GroupNorm's groups are contiguous blocks: moving a channel would
                ordered_by.append(x)  # move it into another group's statistics
        elif op == "normalize":  # each output divided by a norm of every channel: none may go
            out = x
            pinned_by.append(x)
        elif op in (*NEIGHBOUR_OPS, "rotary"):  # ECA's neighbours, RoPE's channel pairs (`rotary_ops`)
            out = x
            pinned_by.append(x)
            ordered_by.append(x)
        elif op in TOKEN_TENSOR_OPS:
            out = x
            rows[f"{name}.weight"] = x
        elif op in ("attention", "linear_attention"):  # q·k pairs channel i of q with channel i of k; heads are
            # contiguous blocks
            out = _attend(uf, size, node, ins, [shapes[s] for s in node["inputs"]])
            pinned_by.extend(ins)
            ordered_by.extend(ins)
        elif op == "lambda_layer":  # a dead k channel still takes its share of the softmax, a dead v channel's
            # position lambda is the filter's bias: q, k, v pinned and ordered (heads are contiguous blocks of q);
            # output channel h·dv + j mixes every q channel of head h: channels of its own, never cut
            out = new_group(name, shapes[name][0])
            pinned_by.extend([*ins, out])
            ordered_by.extend([*ins, out])
        elif op == "channel_attention":  # XCA: a dead q or k channel still takes its share of each head's
            # softmax, so no channel of q, k or v may go, nor move (heads are contiguous); output channel i mixes
            # every v channel of its head (not 0 when q_i, k_i, v_i are): channels of its own, never cut
            _merge(uf, size, node, ins, [shapes[s] for s in node["inputs"]])
            out = new_group(name, shapes[name][0])
            pinned_by.extend([*ins, out])
            ordered_by.extend([*ins, out])
        elif op == "outlook_attention":  # VOLO: output channel i mixes v's channel i only (at other positions), but
            # heads are contiguous blocks of v and a dead logit takes its share of the softmax: both pinned, ordered
            out = x
            pinned_by.extend(ins)
            ordered_by.extend(ins)
        elif op == "conv_transpose":  # its weight (in, out/groups, kh, kw) is no conv's (rows = outputs): no rule
            # reads it (`edgecl.arch.conv_transpose`), so its input's and output's channels neither go nor move
            out = new_group(name, node["out"])
            pinned_by.extend([x, out])
            ordered_by.extend([x, out])
        elif op in STATE_OPS:  # EfficientViM: channel i of x (of h) only; the others' channels are the S states
            out = x
            pinned_by.extend(ins[1:])
            ordered_by.extend(ins[1:])
        elif op == "fourier_pos":  # a fixed grid: channels of its own, produced by no tensor, never cut
            out = new_group(name, 2 * node["hidden"])
            pinned_by.append(out)
            ordered_by.append(out)
        elif op == "flatten":
            hw = 1
            for d in shapes[node["inputs"][0]][1:]:
                hw *= d
            out = [(g, r * hw) for g, r in x]
        elif op == "reshape" and stacks(shapes[node["inputs"][0]], node["shape"]):  # heads along the rows
            out = _stack(uf, size, node, x, shapes[node["inputs"][0]])
            pinned_by.extend([x, out])
            ordered_by.extend([x, out])
        elif op == "reshape":
            out = _reshape(node, x, shapes[node["inputs"][0]])
        elif op in ("add", "mul"):
            out = _merge(uf, size, node, ins, [shapes[s] for s in node["inputs"]])
        elif op == "cat":
            bound_axis(uf.where, sum(map(len, ins)))
            out = [seg for segments in ins for seg in segments]
        elif op == "space_to_depth":  # block² copies of the input's channels, as cat(x, …, x)
            bound_axis(uf.where, len(x) * node["block"] ** 2)
            out = x * node["block"] ** 2
        elif op == "slice":
            out = cut_slice(uf, size, node, x)
        elif op == "shuffle":
            out = _shuffle(uf, size, node, x)
            pinned_by.append(x)  # an interleaving no shorter shuffle reproduces: its channels stay
        elif op == "branch_softmax":
            out = _tie_branches(uf, size, node, x, shapes[node["inputs"][0]])
        else:  # activations, pooling: channels pass through
            out = x
        if op in ("conv", "linear") and node["bias"]:
            rows[f"{name}.bias"] = out
        if has_gain(node):  # a standardised conv's gain: one per output channel
            rows[f"{name}.gain"] = out
        spaces[name] = out
        total += bound_axis(uf.where, len(out))
        if total > MAX_SEGMENTS:
            raise too_many(uf.where, f"the axes up to it have more than {MAX_SEGMENTS}")

    counted = [0]

    def resolve(axes: dict[str, Segments], what: str) -> dict[str, Segments]:  # final layouts, within MAX_SEGMENTS
        out = {}
        for key, segments in axes.items():
            uf.where = f"{what} {key!r}"
            out[key] = uf.resolve(segments)
            counted[0] += len(out[key])
            if counted[0] > MAX_SEGMENTS:
                raise too_many(uf.where, f"the map's axes up to it have more than {MAX_SEGMENTS}")
        return out

    groups = {g: size[g] for g in size if uf.find(g) == g and g not in uf.alias}
    cm = ChannelMap(groups, resolve(rows, "tensor"), resolve(cols, "the input columns of"),
                    resolve({"heads": spaces[arch["output"]]}, "the")["heads"], resolve(spaces, "node"),
                    {g for segments in pinned_by for g, _ in uf.resolve(segments)},
                    {g for segments in ordered_by for g, _ in uf.resolve(segments)})
    _check_widths(arch, cm, shapes)
    return cm


def _check_widths(arch: Arch, cm: ChannelMap, shapes: dict[str, list[int]]) -> None:
    """Every axis the map describes is as wide as the tensor: a map that joined groups of other sizes would mask,
    permute or remove the wrong channels, so it is refused here rather than used."""
    params, nodes = param_shapes(arch), node_by_name(arch)
    checks = [(f"node {name!r}", cm.spaces[name], shape[0]) for name, shape in shapes.items()]
    checks += [(f"tensor {k!r}", segments, params[k][0]) for k, segments in cm.rows.items()]
    checks += [(f"the input columns of {k!r}", segments, nodes[k.rsplit(".", 1)[0]]["in"])
               for k, segments in cm.cols.items()]
    checks.append(("the heads' features", cm.head_cols, arch["feature_dim"]))
    for what, segments, width in checks:
        if cm.size(segments) != width:
            raise ChannelError(f"channels cannot be followed through this graph: {what} has {width} channels, its "
                               f"channel groups {segments[:6]} cover {cm.size(segments)}")


def _shuffle(uf: UnionFind, size: dict[str, int], node: dict, x: Segments) -> Segments:
    """A channel shuffle interleaves channels of different groups: every group of `x` is cut into single channels,
    which the output lists in the shuffled order."""
    singles = _singles(uf, size, node, x)
    width = len(singles)
    g = node["groups"]
    per = width // g
    return [singles[i * per + j] for j in range(per) for i in range(g)]


def _singles(uf: UnionFind, size: dict[str, int], node: dict, x: Segments) -> Segments:
    """`x` with every group cut into single channels (a shuffle's or a stacking reshape's input)."""
    op = node["op"]
    if any(r != 1 for _, r in uf.resolve(x)):
        raise ChannelError(f"node {node['name']!r} ({op}) reads flattened features; channels cannot be followed")
    bound_axis(uf.where, sum(size[g] for g, _ in uf.resolve(x)))  # one segment per channel once cut
    for g, _ in uf.resolve(x):
        if size[g] > 1 and g not in uf.alias:  # a group the input holds twice (cat(a, a)) is split once
            if g == INPUT:
                raise ChannelError(f"node {node['name']!r} ({op}) reorders the network input's channels; "
                                   "channels cannot be followed through it")
            split_group(uf, size, g, [1] * size[g])
    return uf.resolve(x)


def _tie_branches(uf: UnionFind, size: dict[str, int], node: dict, x: Segments, shape: list[int]) -> Segments:
    """A softmax across R branches: its input's R blocks of C channels are cut apart and tied channel by channel
    (as `_merge` ties an add's inputs); the output has the input's layout."""
    per, where = shape[0] // node["branches"], {"name": node["name"], "op": node["op"]}
    blocks = cut_blocks(uf, size, where, x, node["branches"], per)
    _merge(uf, size, where, blocks, [[per, *shape[1:]]] * len(blocks))
    return x


def _attend(uf: UnionFind, size: dict[str, int], node: dict, ins: list[Segments], shapes: list[list[int]]
            ) -> Segments:
    """An attention's channels: q's head i meets its k/v head j = i // (heads / kv_heads) channel by channel, so q's
    blocks are cut apart and each tied to k's block j (with kv_heads = heads, q and k whole: one tie); the output's
    head i is v's block j — with one k/v head (multi-query), v's channels repeated once per query head."""
    q, k, v = ins
    where, h = {"name": node["name"], "op": node["op"]}, node["heads"]
    kv = node.get("kv_heads") or h  # a linear attention's q, k and v have the same heads
    if kv == h:
        _merge(uf, size, where, [q, k], shapes[:2])
        return v

    d, dv = shapes[0][0] // h, shapes[2][0] // kv
    qs, ks, vs = (cut_blocks(uf, size, where, x, n, per) for x, n, per in ((q, h, d), (k, kv, d), (v, kv, dv)))
    for i, block in enumerate(qs):
        _merge(uf, size, where, [block, ks[i * kv // h]], [[d, *shapes[0][1:]], [d, *shapes[1][1:]]])
    return [segment for i in range(h) for segment in vs[i * kv // h]]


def _alias(uf: UnionFind, plain: str, segments: Segments, node: dict) -> None:
    """A plain group met a concatenation channel by channel: it is those groups from now on. The network input is
    never one of them (it stays its own group: whatever adds to it is refused where that matters)."""
    if plain == INPUT:
        raise ChannelError(f"node {node['name']!r} ({node['op']}) adds a concatenation to the network input's "
                           "channels; channels cannot be followed through it")
    uf.alias[plain] = [(g, 1) for g, _ in segments]


def _merge(uf: UnionFind, size: dict[str, int], node: dict, ins: list[Segments],
           shapes: list[list[int]]) -> Segments:
    """add / mul: channel i of every input is one unit (`validate` checked the widths agree). A mul by a tensor with
    one channel (a spatial gate or a scalar) keeps the other input's channels. Inputs laid out in groups of other
    sizes (slices taken at other points, concatenations of other widths) are first cut at each other's bounds."""
    full = [segments for segments, shape in zip(ins, shapes) if shape[0] > 1]
    if node["op"] == "mul" and len(full) == 1:
        return full[0]
    first = uf.resolve(ins[0])
    for segments in ins[1:]:
        other = uf.resolve(segments)
        if _same_layout(first, other, size):
            for (a, _), (b, _) in zip(first, other):
                uf.union(a, b)
        elif len(other) == 1 and all(r == other[0][1] for _, r in first):
            _alias(uf, other[0][0], first, node)  # a plain group meets a concatenation: it is one
        elif len(first) == 1 and all(r == first[0][1] for _, r in other):
            _alias(uf, first[0][0], other, node)
            first = other
        else:
            for _ in range(len(first) + len(other)):  # a cut of a group both sides hold moves both: repeat
                cut_many(uf, size, ins[0], segment_bounds(other, size), node)
                cut_many(uf, size, segments, segment_bounds(uf.resolve(ins[0]), size), node)
                first, other = uf.resolve(ins[0]), uf.resolve(segments)
                if segment_bounds(first, size) == segment_bounds(other, size):
                    break
            if not _same_layout(first, other, size):
                raise ChannelError(f"node {node['name']!r} ({node['op']}): its inputs are concatenated differently "
                                   f"({first} vs {other}); channels cannot be followed through it")
            for (a, _), (b, _) in zip(first, other):
                uf.union(a, b)
        first = uf.resolve(ins[0])
    return ins[0]


def _same_layout(a: Segments, b: Segments, size: dict[str, int]) -> bool:
    """Segment by segment, groups of the same number of channels, each repeated as often."""
    return len(a) == len(b) and all(size[g] == size[h] and r == q for (g, r), (h, q) in zip(a, b))


def stacks(before: list[int], after: list[int]) -> bool:
    """A (k·C, H, W) map viewed as (C, k·H, W), each k channels' maps one above another, or back (MViTv2's pooling
    shared by the heads, `edgecl.arch.fx_mvit.head_pool`)."""
    if len(before) != 3 or len(after) != 3 or before[2] != after[2] or before[0] == after[0]:
        return False
    (c, h), (c2, h2) = before[:2], after[:2]
    return c % c2 == 0 and h2 == c // c2 * h if c > c2 else c2 % c == 0 and h == c2 // c * h2


def _stack(uf: UnionFind, size: dict[str, int], node: dict, x: Segments, before: list[int]) -> Segments:
    """Channels stacked into space: output channel j holds input channels j·k … j·k + k − 1, which become one unit
    (one decision keeps or drops them all); unstacked: input channel j becomes output channels j·k … j·k + k − 1,
    each that unit. Cut into single channels first, as a shuffle's; the caller pins and orders both sides."""
    singles = _singles(uf, size, node, x)
    if node["shape"][0] < before[0]:
        k = before[0] // node["shape"][0]
        for j in range(0, len(singles), k):
            for g, _ in singles[j + 1:j + k]:
                uf.union(singles[j][0], g)
        return [singles[j] for j in range(0, len(singles), k)]
    k = node["shape"][0] // before[0]
    bound_axis(uf.where, len(singles) * k)
    return [seg for seg in singles for _ in range(k)]


def _reshape(node: dict, x: Segments, before: list[int]) -> Segments:
    after = node["shape"]
    if len(after) == 1:  # a flatten written as a reshape
        hw = 1
        for d in before[1:]:
            hw *= d
        return [(g, r * hw) for g, r in x]
    if after[0] == before[0]:  # channels kept, space reshaped
        return x
    raise ChannelError(f"node {node['name']!r} (reshape {before} → {after}) moves channels into space")
