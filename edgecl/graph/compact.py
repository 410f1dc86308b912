"""Structural compaction: make one task's folded graph physically smaller without changing what it computes.

A task's materialised weights (`materialize(packed, t)`) often contain whole zero rows and columns: LPS column/filter
pruning, AGS-CL dead nodes, free capacity no task has claimed yet. This pass removes the channels they leave dead,
working only from the values, so it serves every delta kind alike, on any graph spec (chains, residual adds,
concatenations, depthwise and grouped convolutions, squeeze-and-excitation gates).

Channels are removed by *group* (`edgecl.arch.channel_map`): a residual add makes channel i of every branch one
unit, a depthwise convolution's channels are its input's, a gate multiplies channel i by channel i, a concatenation
lays groups side by side. Channel c of a group can go when every *reader* of the group (each conv/linear weight
whose input columns hold it, in every segment it appears in, with the flatten repeat; and the heads) either reads
none of it (all-zero columns) or reads a constant it can absorb (`edgecl.graph.constants`): the constant times the
columns' sum goes into the reader's bias (a new bias where it had none). That is exact for linear readers and the
heads, for convolutions without padding, and for the constant 0 anywhere; a constant ≠ 0 read by a padded
convolution keeps the channel (its border outputs see zeros, not the constant). A residual sum's constant is the sum
of its branches', so a channel dead in every branch folds through the add. Removing c then deletes it everywhere the
group appears: rows of every producer (conv/linear weights and biases, BatchNorm and layer-scale channels,
depthwise filters — a depthwise conv shrinks its `groups` with its channels, and gate convolutions lose their rows
too), columns of every reader, both copies inside a concatenation of the group with itself, and network inputs
(below). Rounds repeat until nothing changes (a removal can leave an upstream channel unread).

What stays, and why:
- every channel a LayerNorm normalises, a shuffle interleaves or a ``channel_conv`` (ECA) reads (`ChannelMap.pinned`):
  the LayerNorm's mean and variance are over all of them, so removing even a dead one changes the others' outputs, a
  shuffle of fewer channels would put the rest in another order, and an ECA gate reads each channel's neighbours
  (removing a dead one would shift the live ones next to it);
- one channel of a group whose channels are all removable (ONNX graphs with empty dimensions are not portable) —
  which also keeps a single-channel tensor that a ``mul`` broadcasts over many channels (a spatial gate): no
  conv/linear column reads it, yet every channel of the product does;
- grouped (not depthwise) convolutions must keep equal channels per group on both axes: a removal set that would
  leave groups unequal is cut to the smallest per-group count (at least one channel per group stays); Torch-Pruning
  prunes the same indices in every group instead, which keeps more here when masks differ between groups;
- a channel only some readers can absorb stays whole: removing it from one reader but not another would need a
  gather inside the graph (a copy of that activation on every call) for a few weights;
- by default (`CONV_CHANNEL_MULTIPLE`) every group a convolution reads or writes keeps a multiple of 16 channels
  where it has that many: ONNX Runtime's CPU convolutions run their blocked kernels only on such counts, and a
  smaller but odd-sized graph ran slower than the dense one.

Network inputs nobody reads are dropped by a Gather in front of the graph: the compacted spec reads
``input_shape`` (fewer channels, or fewer features when the input feeds only a flatten: the selection is then over
the flattened features), and carries ``input_select`` (indices along axis 1) and ``input_select_from`` (the dense
input shape, which the graph still takes), so `edgecl.graph.builder` declares the same input as the dense graph and
`edgecl.arch.spec.validate` accepts the compacted spec (it ignores the two keys). Compacting a compacted spec starts
from its selection.

Why our own numpy pass and not Torch-Pruning's DepGraph: DepGraph traces a live `nn.Module` with autograd to find
the same coupling (its groups: out-channel pruning of a conv triggers its BatchNorm, element-wise ops couple the
producers of an add, index mappings follow cat/split, depthwise convs prune in, out and groups together, grouped
convs prune the same indices per group). Its facts carried over; its code does not fit: the exporter and the
runtime's per-task sessions must not import torch; the spec already is the graph (no tracing); DepGraph ranks
channels by importance to *choose* what to prune, while here the task's masks already chose and a channel may go
only when provably dead or constant, which needs the values, not the module; and it has no constant folding.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgecl.arch.channels import ChannelError, ChannelMap, Segments, channel_map, stacks
from edgecl.arch.op_shapes import output_shape
from edgecl.arch.ops import CHANNEL_AFFINE_OPS, TOKEN_TENSOR_OPS, WEIGHT_OPS
from edgecl.arch.spec import INPUT, Arch, consumers, is_depthwise, validate
from edgecl.graph.constants import channel_constants, expand, is_reader
from edgecl.graph.standardize import fold_standardized

HEAD = "head.weight"
# ONNX Runtime's CPU convolutions take the blocked NCHWc layout for channel counts that are multiples of its block
# (8 with AVX2, 16 with AVX-512): resnet18 compacted exactly to 45 of every 64 channels ran 0.47-0.74× as fast as
# dense on an AVX-512 Xeon, rounded to 48 1.5-2.2× faster (tools/results/bench_infer_resnet18_alive070.json)
CONV_CHANNEL_MULTIPLE = 16


@dataclass
class CompactionReport:
    """What compaction did to one task: output units per conv/linear layer and channels per group before → after,
    inputs kept, channels folded into biases."""

    compacted: bool
    reason: str
    params_dense: int
    params_compact: int
    layers: dict[str, list[int]] = field(default_factory=dict)
    groups: dict[str, list[int]] = field(default_factory=dict)
    inputs_kept: list[int] | None = None
    folded_units: int = 0
    rounds: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def count_params(params: dict[str, np.ndarray]) -> int:
    """Numbers stored in a graph's initializers (weights, biases, BatchNorm statistics, head)."""
    return int(sum(np.asarray(v).size for v in params.values()))


def compact_task(arch: Arch, params: dict[str, np.ndarray], *,
                 channel_multiple: int = CONV_CHANNEL_MULTIPLE) -> tuple[Arch, dict[str, np.ndarray], CompactionReport]:
    """(arch', params', report): a smaller spec and tensors computing the same logits as (arch, params).

    `channel_multiple`: keep every channel group a convolution reads or writes at a multiple of this many channels
    where the group has that many (dead channels kept are zero, or constant, as before): ONNX Runtime's CPU
    convolutions use their blocked layout only for such counts and run 2-3× slower on others
    (`CONV_CHANNEL_MULTIPLE`, tools/bench_infer.py). Weight-standardised convs are folded into plain ones first
    (`fold_standardized`): removing a dead input channel's columns before would change their filters' statistics."""
    dense = count_params(params)
    arch, params = fold_standardized(arch, params)
    try:
        net = _Net(arch, params, channel_multiple)
    except ChannelError as exc:
        return (copy.deepcopy(arch), dict(params),  # folded: a standardised conv's gain is in its weight now
                CompactionReport(False, f"kept dense: {exc}", dense, count_params(params)))
    try:
        while net.compact_round():
            pass
    except ChannelError:  # a round's result no channel map follows (a grouped conv left one channel per group reads
        pass              # as depthwise): keep the last graph that was followed, as exact as any
    return net.result(dense)


@dataclass
class _Reader:
    """A weight whose input axis reads channel groups: a conv/linear node's columns, or the heads (node None)."""

    weight: str
    node: dict | None
    segments: Segments
    source: str  # the tensor it reads

    @property
    def groups(self) -> int:
        return self.node["groups"] if self.node is not None and self.node["op"] == "conv" else 1

    @property
    def absorbs_constants(self) -> bool:
        """True when a constant ≠ 0 it reads can be folded into its bias exactly (no zero padding)."""
        return self.node is None or self.node["op"] == "linear" or not any(self.node["pad"])

    def reads(self, w: np.ndarray) -> np.ndarray:
        """Per position of the input axis: does any weight read it (in its group's rows)?"""
        per_group = w.reshape(w.shape[0], w.shape[1], -1).any(axis=2)
        return per_group.reshape(self.groups, w.shape[0] // self.groups, -1).any(axis=1).reshape(-1)


def _positions(segments: Segments, drops: dict[str, np.ndarray], cm: ChannelMap) -> np.ndarray:
    """Positions along an axis made of `segments` that belong to the dropped channels (every repeat, every copy)."""
    out, offset = [], 0
    for g, r in segments:
        d = drops.get(g)
        if d is not None and len(d):
            out.append((offset + d[:, None] * r + np.arange(r)).reshape(-1))
        offset += cm.groups[g] * r
    return np.concatenate(out) if out else np.empty(0, np.int64)


def _delete_inputs(w: np.ndarray, groups: int, positions: np.ndarray) -> np.ndarray:
    """`w` without the input positions (for a grouped conv: each group's rows lose the columns of its own inputs)."""
    if groups == 1:
        return np.delete(w, positions, axis=1)
    per, rows = w.shape[1], w.shape[0] // groups
    return np.concatenate([np.delete(w[a * rows:(a + 1) * rows], positions[positions // per == a] - a * per, axis=1)
                           for a in range(groups)])


class _Net:
    """Mutable copy of a spec and its tensors, compacted round by round."""

    def __init__(self, arch: Arch, params: dict[str, np.ndarray], channel_multiple: int):
        self.multiple = channel_multiple
        # the graph's input: the dense shape, and the indices (of its channels, or of its flattened features when
        # it feeds only a flatten) the trunk reads — all of them, or an earlier compaction's selection
        self.dense_input = list(arch.get("input_select_from", arch["input_shape"]))
        work = copy.deepcopy(arch)
        select = work.pop("input_select", None)
        work.pop("input_select_from", None)
        first = consumers(work)[INPUT]
        if select is None and len(self.dense_input) > 1 and len(first) == 1 and \
                next(n for n in work["nodes"] if n["name"] == first[0])["op"] == "flatten":
            work["input_shape"] = [math.prod(self.dense_input)]  # select features, not channels: the flatten is a no-op
        self.arch = validate(work)
        flat = len(self.dense_input) > len(self.arch["input_shape"])
        self.input_width = math.prod(self.dense_input) if flat else self.dense_input[0]
        self.inputs = np.arange(self.input_width) if select is None else np.asarray(select, dtype=np.int64)
        self.params = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
        self.depthwise = {n["name"] for n in self.arch["nodes"] if is_depthwise(n)}
        self.cm = channel_map(self.arch)  # ChannelError: kept dense
        self.before = ({n["name"]: n["out"] for n in self.arch["nodes"] if n["op"] in WEIGHT_OPS},
                       dict(self.cm.groups))
        self.folded = 0
        self.rounds = 0

    def result(self, dense: int) -> tuple[Arch, dict[str, np.ndarray], CompactionReport]:
        arch, kept = self.arch, None
        if len(self.inputs) < self.input_width:
            kept = [len(self.inputs), self.input_width]
            arch["input_select"] = [int(i) for i in self.inputs]
            arch["input_select_from"] = self.dense_input
        else:
            arch["input_shape"] = self.dense_input  # nothing gathered: the dense input, flatten and all
        layers = {n["name"]: [self.before[0][n["name"]], n["out"]] for n in arch["nodes"] if n["op"] in WEIGHT_OPS}
        groups = {g: [n, self.cm.groups.get(g, 0)] for g, n in self.before[1].items()}
        report = CompactionReport(True, "channel groups", dense, count_params(self.params), layers, groups, kept,
                                  self.folded, self.rounds)
        return arch, self.params, report

    # -- one round ------------------------------------------------------------------------------------------------
    def readers(self, cm: ChannelMap) -> list[_Reader]:
        out = [_Reader(f"{n['name']}.weight", n, cm.cols[f"{n['name']}.weight"], n["inputs"][0])
               for n in self.arch["nodes"] if is_reader(n)]
        return out + [_Reader(HEAD, None, cm.head_cols, self.arch["output"])]

    def compact_round(self) -> bool:
        """Remove every channel that is dead or foldable now; True when something was removed."""
        self.rounds += 1
        cm = self.cm = channel_map(self.arch)
        # as the map reads them now: a grouped conv left with one channel per group has become depthwise
        self.depthwise = {n["name"] for n in self.arch["nodes"] if is_depthwise(n)}
        constants = channel_constants(self.arch, self.params, cm)
        readers = self.readers(cm)
        removable = {g: np.ones(n, bool) for g, n in cm.groups.items()}
        seen = {}  # reader → (reads, constants) per input position
        for reader in readers:
            reads = reader.reads(self.params[reader.weight])
            values = expand(constants[reader.source], cm.spaces[reader.source], cm)
            absorbable = np.isfinite(values) & (reader.absorbs_constants | (values == 0))
            ok = ~reads | absorbable
            seen[reader.weight] = reads, values
            offset = 0
            for g, r in reader.segments:
                n = cm.groups[g]
                removable[g] &= ok[offset:offset + n * r].reshape(n, r).all(axis=1)
                offset += n * r
        for g in cm.pinned:
            removable[g][:] = False
        for flags in removable.values():
            if flags.all():
                flags[0] = False  # keep one channel: ONNX graphs with empty dimensions are not portable
        self._round_conv_groups(cm, removable)
        self._even_out_grouped(cm, removable)
        drops = {g: np.flatnonzero(flags) for g, flags in removable.items() if flags.any()}
        if not drops:
            return False
        self._fold(cm, readers, drops, seen)
        self._delete(cm, readers, drops)
        return True

    def _round_conv_groups(self, cm: ChannelMap, removable: dict[str, np.ndarray]) -> None:
        """Keep a few removable channels so that each group a convolution touches keeps a multiple of
        `self.multiple` channels (where the group is that large; the network input is never rounded)."""
        if self.multiple < 2:
            return
        touched = {g for n in self.arch["nodes"] if n["op"] == "conv"
                   for segments in (cm.rows[f"{n['name']}.weight"], cm.cols.get(f"{n['name']}.weight", []))
                   for g, _ in segments}
        for g in touched - {INPUT}:
            flags = removable[g]
            kept = flags.size - int(flags.sum())
            target = -(-kept // self.multiple) * self.multiple
            if kept < target <= flags.size:
                flags[np.flatnonzero(flags)[:target - kept]] = False

    def _even_out_grouped(self, cm: ChannelMap, removable: dict[str, np.ndarray]) -> None:
        """Grouped convolutions need as many channels in each group: keep channels until every group of such a conv
        loses as many inputs (and outputs) as the others, and at least one stays per group."""
        grouped = [n for n in self.arch["nodes"]
                   if n["op"] == "conv" and n["groups"] > 1 and n["name"] not in self.depthwise]
        changed = bool(grouped)
        while changed:
            changed = False
            for node in grouped:
                weight = f"{node['name']}.weight"
                for segments in (cm.cols[weight], cm.rows[weight]):
                    changed |= _even_out(segments, node["groups"], removable, cm)

    def _fold(self, cm: ChannelMap, readers: list[_Reader], drops: dict[str, np.ndarray], seen: dict) -> None:
        """Add each dropped constant channel's contribution (columns' sum × constant) to its readers' biases."""
        folded = set()
        for reader in readers:
            positions = _positions(reader.segments, drops, cm)
            reads, values = seen[reader.weight]
            positions = positions[reads[positions] & (values[positions] != 0)]
            if not len(positions):
                continue
            folded.update(_channel_of(reader.segments, cm, p) for p in positions)
            self._add_to_bias(reader, positions, values[positions])
        self.folded += len(folded)

    def _add_to_bias(self, reader: _Reader, positions: np.ndarray, values: np.ndarray) -> None:
        w = self.params[reader.weight]
        block = w.reshape(w.shape[0], w.shape[1], -1)
        per, rows = w.shape[1], w.shape[0] // reader.groups
        extra = np.zeros(w.shape[0])
        for a in np.unique(positions // per):
            mine = positions // per == a
            part = block[a * rows:(a + 1) * rows][:, positions[mine] - a * per]
            extra[a * rows:(a + 1) * rows] += part.sum(axis=2, dtype=np.float64) @ values[mine]
        key = reader.weight[:-len("weight")] + "bias"
        if key not in self.params:
            self.params[key] = np.zeros(w.shape[0], np.float32)
            reader.node["bias"] = True
        self.params[key] = (self.params[key].astype(np.float64) + extra).astype(np.float32)

    def _delete(self, cm: ChannelMap, readers: list[_Reader], drops: dict[str, np.ndarray]) -> None:
        """Delete the dropped channels from every producer's rows, every reader's columns and the network input, then
        fix the spec's sizes to match."""
        rows = dict(cm.rows)
        for node in self.arch["nodes"]:  # biases made by folding this round are not in the map yet
            if node["op"] in WEIGHT_OPS and node["bias"]:
                rows.setdefault(f"{node['name']}.bias", cm.rows[f"{node['name']}.weight"])
        for tensor, segments in rows.items():
            positions = _positions(segments, drops, cm)
            if len(positions):
                self.params[tensor] = np.ascontiguousarray(np.delete(self.params[tensor], positions, axis=0))
        for reader in readers:
            positions = _positions(reader.segments, drops, cm)
            if len(positions):
                w = _delete_inputs(self.params[reader.weight], reader.groups, positions)
                self.params[reader.weight] = np.ascontiguousarray(w)
        positions = _positions(cm.spaces[INPUT], drops, cm)
        if len(positions):
            self.inputs = np.delete(self.inputs, positions)
            self.arch["input_shape"][0] = len(self.inputs)
        for node in self.arch["nodes"]:  # a slice takes whole groups: its bounds move with what they lost
            if node["op"] == "slice":
                source = cm.spaces[node["inputs"][0]]
                i, j = cm.sliced(source, node["start"], node["stop"])
                kept = [(cm.groups[g] - len(drops.get(g, ()))) * r for g, r in source]
                node["start"], node["stop"] = sum(kept[:i]), sum(kept[:j])
        self._fix_sizes()

    def _fix_sizes(self) -> None:
        shapes = {INPUT: self.arch["input_shape"]}
        for node in self.arch["nodes"]:
            op, name = node["op"], node["name"]
            node.pop("module_shape", None)  # how the user's module stores the dense weight: nothing here reads it,
            node.pop("channels_last", None)  # nor that it stores a map's embedding channels-last (VOLO's)
            node.pop("bias_parts", None)  # and where it stores the dense bias (`edgecl.arch.bias_parts`) and
            node.pop("fused_bias", None)  # (its bias the same rows of the fused bias, when its weight is)
            if node.pop("weight_rows", None) is not None:  # a weight that is rows of a fused one, which the
                node.pop("module", None)  # compacted rows no longer are: each its own (q, k, v: three convs)
            if op in WEIGHT_OPS:
                w = self.params[f"{name}.weight"]
                node["out"] = int(w.shape[0])
                if name in self.depthwise:
                    node["in"] = node["groups"] = int(w.shape[0])
                else:
                    node["in"] = int(w.shape[1]) * (node["groups"] if op == "conv" else 1)
            ins = [shapes[s] for s in node["inputs"]]
            if op in (*CHANNEL_AFFINE_OPS, *TOKEN_TENSOR_OPS):
                node["ch"] = ins[0][0]
            if node.get("tile") or node.get("resize"):  # TNT's tiled embedding (its window's shape), HieraDet's
                # resized one (its grid's): what `validate` reads them from
                node["module_shape"] = [1, node["ch"], *(node.get("tile") or node["resize"])]
            if op == "reshape" and not stacks(ins[0], node["shape"]):  # a flatten (1-D) or a spatial reshape that
                # keeps the channels (one that stacks channels along the rows has them pinned: unchanged)
                node["shape"] = [math.prod(ins[0])] if len(node["shape"]) == 1 else [ins[0][0], *node["shape"][1:]]
            shapes[name] = output_shape(node, ins, name)
        self.arch = validate(self.arch)


def _channel_of(segments: Segments, cm: ChannelMap, position: int) -> tuple[str, int]:
    """(group, channel) at a position of an axis made of `segments`."""
    offset = 0
    for g, r in segments:
        n = cm.groups[g] * r
        if position < offset + n:
            return g, int((position - offset) // r)
        offset += n
    raise IndexError(position)


def _even_out(segments: Segments, groups: int, removable: dict[str, np.ndarray], cm: ChannelMap) -> bool:
    """Keep channels of one grouped-conv axis until each of its `groups` loses equally many; True if any changed."""
    flags = np.concatenate([np.repeat(removable[g], r) for g, r in segments]).reshape(groups, -1)
    counts = flags.sum(axis=1)
    target = min(int(counts.min()), flags.shape[1] - 1)
    if (counts == target).all():
        return False
    for a in range(groups):
        for p in np.flatnonzero(flags[a])[target:]:
            g, c = _channel_of(segments, cm, a * flags.shape[1] + int(p))
            removable[g][c] = False
    return True
