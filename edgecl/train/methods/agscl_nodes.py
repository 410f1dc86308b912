"""AGS-CL's nodes on any graph. A node is one channel of one channel group (`edgecl.arch.channel_map`): every
conv/linear layer starts a group of channels, and a residual ``add``, a per-channel gate, a depthwise conv and the
BatchNorm after a layer keep the same channel — so a node owns, in *every* producer of its group, the row of that
channel (conv/linear weight rows and biases, a depthwise conv's row, the BatchNorm channel's weight and bias), and
it is read through the columns of every layer and head that consumes the group (after a flatten each channel is
H·W columns). On a chain of layers this is the paper's node: one unit or filter, its incoming row, its outgoing
columns.

This module only maps nodes to tensor positions (numpy, built once per architecture); `agscl.py` trains with it
and `pack` deploys with the delta specs it writes (``node`` kind, rows/cols as groups or ``[[group, repeat], …]``
segments, ``groups`` for grouped convolutions; BatchNorm running statistics are per task, kind ``task``, and so are
ECA's k weights and a scalar affine's two numbers, which have no channel rows: each task trains them from the previous
task's values and keeps its own). A frozen position embedding is in no node: kind ``shared``, never trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecl.arch import (INPUT, WEIGHT_OPS, Arch, ChannelError, channel_map, consumers, node_by_name,
                         param_shapes)
from edgecl.arch.op_rules import has_gain
from edgecl.arch.spec import frozen_tensors, rowless_tensors
from edgecl.errors import UsageError

STATS = ("running_mean", "running_var")
# activations that are not 0 for every negative input (ReLU and ReLU6 are: the paper's mean ReLU activation stays)
NEGATIVE_PASSING = ("gelu", "silu", "hardswish", "leaky_relu", "tanh", "square")
# those whose output is ≤ 0 for every input ≤ 0: not square (x² > 0), nor a leaky ReLU of negative slope
SIGN_KEEPING = ("gelu", "silu", "hardswish", "tanh")
RELU_OPS = ("relu", "relu6")  # 0 for every input ≤ 0
# ops whose every output is ≤ 0 when every input is (sums, maxima, means, moves of channels): a value that reaches a
# ReLU through them alone is read as ReLU reads it
NONPOSITIVE_KEEPING = ("add", "cat", "maxpool", "avgpool", "gap", "adaptive_avgpool", "flatten")
MOVES = ("reshape", "slice", "shuffle", "space_to_depth", "token", "blur", "upsample")  # each output a convex mix
# (or a copy) of one channel's values: ≤ 0 stays ≤ 0, 0 stays 0
ZERO_KEEPING = (*NONPOSITIVE_KEEPING, *MOVES, *RELU_OPS, *NEGATIVE_PASSING, "layer_scale",  # f(0) = 0
                "bicubic")  # linear in each channel, but its negative taps can make a value ≤ 0 positive


@dataclass
class NodeMap:
    """Where every node of a graph sits. Node indices are positions in one flat vector, groups in channel-map order;
    index −1 stands for a channel of the network input (never a node: it is always read, never cut)."""

    groups: dict[str, int]  # group → number of channels (nodes)
    rows: dict[str, np.ndarray]  # tensor with rows in a group (producers, BatchNorm) → node of each row
    cols: dict[str, np.ndarray]  # reader weight → source node of each GEMM input column, (1 or out, shape[1])
    head: np.ndarray  # node of each head feature
    hooks: dict[str, str]  # conv/linear node name → its weight tensor (Ω is read at its output)
    bn_after: dict[str, dict]  # conv/linear node name → the BatchNorm node normalising its output
    stats: list[str]  # BatchNorm running statistics: kept per task
    own: list[str]  # kept per task: the statistics, ECA's k weights, scalar affines (no rows)
    scale_free: list[str]  # conv/linear rows (and biases) a BatchNorm normalises, standardised convs' weights: their
    #                        scale changes nothing
    specs: dict[str, dict[str, Any]]  # trunk tensor → its deployed delta spec
    affines: dict[str, np.ndarray] = field(default_factory=dict)  # scalar affine → node of each output channel
    # conv/linear nodes (after their BatchNorm) that every reader reads through a ReLU (`relu_read`): Ω by the
    # paper's mean ReLU activation; any other output by its mean |value| (a negative value is used as much)
    relu_read: set[str] = field(default_factory=set)
    # conv/linear node → the activation that alone reads it (after its BatchNorm) where that passes negative values
    # (GELU, SiLU, …): Ω by |its output|, what the readers see, not by ReLU's (0 for a node always below 0)
    passes: dict[str, dict] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(self.groups.values())

    @property
    def trainable(self) -> dict[str, np.ndarray]:
        """Producer tensors the optimiser updates (everything with rows but the running statistics)."""
        return {k: v for k, v in self.rows.items() if k not in self.stats}

    def split(self, flat: Any) -> dict[str, Any]:
        """A flat per-node vector as group → its slice (views)."""
        out, start = {}, 0
        for group, size in self.groups.items():
            out[group] = flat[start:start + size]
            start += size
        return out

    def join(self, by_group: dict[str, Any], what: str) -> np.ndarray:
        """group → per-node values back into one flat vector; UsageError naming the group when one is missing or
        has the wrong length (masks and importances read from an artifact)."""
        parts = []
        for group, size in self.groups.items():
            value = np.asarray(by_group.get(group, ()))
            if value.shape != (size,):
                raise UsageError(f"agscl: {what} of group {group!r} has shape {value.shape}, the graph has {size} "
                                 "channels there")
            parts.append(value)
        return np.concatenate(parts)

    def row_counts(self) -> np.ndarray:
        """How many conv/linear output rows each node has (the producers Ω averages over)."""
        counts = np.zeros(self.n)
        for weight in self.hooks.values():
            np.add.at(counts, self.rows[weight], 1)
        return counts

    @property
    def unwritten(self) -> np.ndarray:
        """Nodes of groups no conv/linear layer writes (a ``fourier_pos`` grid, a ``channel_attention``'s output):
        they have no rows to zero and no activation of their own to measure, so, like the network input, they are
        always read — important from the first task on, never cut (Ω alone would leave them 0, their readers cut)."""
        return self.row_counts() == 0

    def kept(self, alive: np.ndarray, tensor: str) -> np.ndarray | None:
        """Bool over a tensor's GEMM view (rows × columns, broadcast over kernel positions) of what a task with node
        mask `alive` reads: rows of live nodes × columns of live sources; None for tensors without node rows."""
        live = np.append(alive, True)  # index −1: the network input
        if tensor not in self.rows:
            return None
        rows = live[self.rows[tensor]][:, None]
        return rows & live[self.cols[tensor]] if tensor in self.cols else rows


def node_map(arch: Arch) -> NodeMap:
    """The nodes of a validated spec; UsageError when its channels cannot be followed (`ChannelError`), when a layer
    adds to the raw input's channels (they are no node), or when it has no conv/linear layer."""
    try:
        cm = channel_map(arch)
    except ChannelError as exc:
        raise UsageError(f"agscl: {exc}") from None
    shapes = param_shapes(arch)
    nodes = node_by_name(arch)
    for tensor, segments in cm.rows.items():
        if any(g == INPUT for g, _ in segments):
            raise UsageError(f"agscl: {tensor!r} adds to the channels of the network input, which are no node; "
                             "AGS-CL needs every residual stream to start at a conv or linear layer")
    groups = {g: n for g, n in cm.groups.items() if g != INPUT}
    if not groups:
        raise UsageError(f"agscl: architecture {arch.get('name')!r} has no linear or conv layer to group into nodes")
    offsets = dict(zip(groups, np.cumsum([0, *groups.values()])[:-1].tolist()))

    def index(segments: list[tuple[str, int]]) -> np.ndarray:
        return np.concatenate([np.full(cm.groups[g] * r, -1) if g == INPUT else
                               np.repeat(np.arange(cm.groups[g]) + offsets[g], r) for g, r in segments])

    fixed = frozen_tensors(arch)  # constants: in no node (never cut, zeroed or redrawn), shared by every task
    rows = {tensor: index(segments) for tensor, segments in cm.rows.items() if tensor not in fixed}
    cols = {}
    for weight, segments in cm.cols.items():
        node, idx = nodes[weight.rsplit(".", 1)[0]], index(segments)
        g = node.get("groups", 1)
        # row j of a grouped conv reads only its conv group's slice of the input channels
        cols[weight] = np.repeat(idx.reshape(g, -1), shapes[weight][0] // g, axis=0) if g > 1 else idx[None]
    readers = consumers(arch)
    hooks, bn_after, scale_free = {}, {}, []
    for node in arch["nodes"]:
        if node["op"] in ("conv", "linear"):
            hooks[node["name"]] = f"{node['name']}.weight"
            after = readers[node["name"]]
            if len(after) == 1 and nodes[after[0]]["op"] == "bn":
                bn_after[node["name"]] = nodes[after[0]]
                scale_free += [t for t in (f"{node['name']}.weight", f"{node['name']}.bias") if t in shapes]
            elif has_gain(node):  # its filters are standardised: the gain carries their scale (without one
                # (StdConv2d) nothing does: the rows themselves are measured and shrunk, their output 0 only at 0)
                scale_free.append(f"{node['name']}.weight")
    stats = [t for t in cm.rows if t.rsplit(".", 1)[1] in STATS]
    own = stats + rowless_tensors(arch)
    specs = {t: _spec(cm.rows[t], cm.cols.get(t), nodes[t.rsplit(".", 1)[0]]) if t not in own else {"kind": "task"}
             for t in shapes}
    specs.update({t: {"kind": "shared"} for t in fixed})
    affines = {n["name"]: index(cm.spaces[n["name"]]) for n in arch["nodes"]  # a bias-less one keeps a zero node 0
               if n["op"] == "scalar_affine" and n.get("bias", True)}
    relu_read, passes = set(), {}
    measured = {measured_out(name, bn_after): name for name in hooks}
    for out, name in measured.items():
        if relu_read_only(arch, readers, nodes, out):
            relu_read.add(name)
        elif len(readers[out]) == 1 and nodes[readers[out][0]]["op"] in NEGATIVE_PASSING:
            passes[name] = nodes[readers[out][0]]
    # a ReLU read counts only where what the layers read of it is 0 when the node is dead; the rest fall back to
    # |value| (judged once, with the first pass's measures: an output dropped to |value| is 0 where dead, not only
    # ≤ 0, so a second pass could keep more ReLU reads, never fewer)
    dead = nonpositive_when_dead(arch, measured, relu_read | set(passes), {a["name"] for a in passes.values()})
    relu_read = {name for name in relu_read
                 if read_as_zero_when_dead(arch, readers, nodes, measured_out(name, bn_after), dead)}
    return NodeMap(groups, rows, cols, index(cm.head_cols), hooks, bn_after, stats, own, scale_free, specs, affines,
                   relu_read, passes)


def measured_out(name: str, bn_after: dict[str, dict]) -> str:
    """Where a conv/linear node's Ω is read: after the BatchNorm that follows it, if one does."""
    return bn_after[name]["name"] if name in bn_after else name


def nonpositive_when_dead(arch: Arch, measured: dict[str, str], signed: set[str],
                          passed: frozenset[str] | set[str] = frozenset()) -> tuple[set[str], set[str]]:
    """Nodes whose every channel is ≤ 0 wherever that channel's node has Ω = 0. A measured output (`measured`:
    output → its conv/linear) is: ≤ 0 where ReLU's or an activation's measure is 0 (`signed`), exactly 0 where
    |value|'s is; an activation whose |output| is the measure (`passed`: `NodeMap.passes`) is exactly 0 there. So
    is what ReLU/ReLU6, sums, pools and moves (`NONPOSITIVE_KEEPING`, `MOVES`, a pad filling ≤ 0,
    a ``scale`` by ≥ 0 without a positive offset) make of such values alone, what 0-keeping ops (a gain, an
    activation, a pad filling 0, a scalar affine) make of exact zeros, and a product with one. An add
    with any other addend — a BatchNorm's or a position embedding's shift, an offset, a grid no layer writes — is
    not: Ω = 0 of its measured addends leaves it free to be > 0, and cutting the node changes what a ReLU after it
    passes on. Returns (≤ 0, exactly 0) nodes."""
    zero: set[str] = set()
    below: set[str] = set()
    for node in arch["nodes"]:  # in order: every input comes first
        name, op, ins = node["name"], node["op"], node["inputs"]
        if name in measured:
            (below if measured[name] in signed else zero).add(name)
        elif name in passed or op in RELU_OPS and all(i in below for i in ins) or \
                _keeps_zero(node) and all(i in zero for i in ins) or \
                op == "mul" and any(i in zero for i in ins):  # a product with a 0 factor
            zero.add(name)
        elif _keeps_nonpositive(node) and all(i in below for i in ins):
            below.add(name)
        if name in zero:
            below.add(name)
    return below, zero


def _keeps_nonpositive(node: dict) -> bool:
    """Whether every output of `node` is ≤ 0 when every input is."""
    op = node["op"]
    if op == "pad":
        return float(node.get("value", 0.0)) <= 0  # a "-inf" fill too
    if op == "scale":
        return node.get("factor", 1.0) >= 0 and node.get("offset", 0.0) <= 0
    if op == "leaky_relu":  # slope · x ≥ 0 for x ≤ 0 when the slope is negative
        return node.get("slope", 0.01) >= 0
    return op in (*NONPOSITIVE_KEEPING, *MOVES, *RELU_OPS, *SIGN_KEEPING)


def _keeps_zero(node: dict) -> bool:
    """Whether every output of `node` is 0 when every input is."""
    op = node["op"]
    if op == "pad":
        return float(node.get("value", 0.0)) == 0
    if op == "scale":
        return node.get("offset", 0.0) == 0
    if op == "scalar_affine":  # its bias reaches only the channels of live nodes (`agscl_affine.BiasMasks`)
        return True
    return op in ZERO_KEEPING


def relu_read_only(arch: Arch, readers: dict[str, list[str]], nodes: dict[str, dict], name: str) -> bool:
    """Whether every path from `name`'s output meets a ReLU/ReLU6 before anything else reads it (only
    `NONPOSITIVE_KEEPING` ops between; the head reads the trunk's output). Only then is a node whose every producer
    writes ≤ 0 unused (ReLU makes it 0 wherever it is read), so that Ω = 0 may cut it: the paper's networks. A value
    a LayerNorm, attention, a plain linear or conv, a sigmoid gate or the head reads is used when negative too.
    `node_map` then also asks `read_as_zero_when_dead` of each such output."""
    todo, seen = [name], {name}
    while todo:
        here = todo.pop()
        if here == arch["output"] or not readers[here]:
            return False
        for reader in readers[here]:
            op = nodes[reader]["op"]
            if op in NONPOSITIVE_KEEPING and reader not in seen:
                seen.add(reader)
                todo.append(reader)
            elif op not in RELU_OPS and op not in NONPOSITIVE_KEEPING:
                return False
    return True


def read_as_zero_when_dead(arch: Arch, readers: dict[str, list[str]], nodes: dict[str, dict], name: str,
                           dead: tuple[set[str], set[str]]) -> bool:
    """Whether, where `name`'s node is dead (its output ≤ 0), every layer and the head read 0 of it: its channels
    followed forward, ≤ 0 or exactly 0, until a conv/linear or the head reads them (which needs 0). An add keeps them
    ≤ 0 (0) only when every other addend is (`dead`: ≤ 0 and 0 nodes; a residual add's identity is the group's own
    earlier output): not with a BatchNorm's or a position embedding's shift, an offset, a grid no layer writes
    (ReLU(a + β) > 0 with every a ≤ 0 is read). A ReLU makes them 0; after it a BatchNorm's shift is read too."""
    below, zero = dead
    todo, seen = [(name, False)], {(name, False)}  # (node, its channels of `name` exactly 0)
    while todo:
        here, is_zero = todo.pop()
        if here == arch["output"] and not is_zero or not readers[here] and here != arch["output"]:
            return False
        for reader in readers[here]:
            node, others = nodes[reader], [i for i in nodes[reader]["inputs"] if i != here]
            if node["op"] in WEIGHT_OPS:
                if not is_zero:
                    return False
                continue
            if node["op"] == "add":
                state = is_zero and all(i in zero for i in others) if all(i in below for i in others) else None
            elif node["op"] == "mul":
                state = True if is_zero or any(i in zero for i in others) else None
            elif node["op"] in RELU_OPS:
                state = True
            else:
                state = True if is_zero and _keeps_zero(node) else False if _keeps_nonpositive(node) else None
            if state is None:
                return False
            if (reader, state) not in seen:
                seen.add((reader, state))
                todo.append((reader, state))
    return True


def _spec(rows: list[tuple[str, int]], cols: list[tuple[str, int]] | None, node: dict) -> dict[str, Any]:
    """The ``node`` delta spec of one tensor: a single group is written as its name (the form of chain artifacts,
    readable by earlier edgecl), several as segments."""
    spec: dict[str, Any] = {"kind": "node"}
    spec["rows"] = rows[0][0] if len(rows) == 1 and rows[0][1] == 1 else [list(s) for s in rows]
    if cols is None:
        return spec
    if all(g == INPUT for g, _ in cols):
        spec["cols"], spec["repeat"] = None, cols[0][1] if len(cols) == 1 else 1
    elif len(cols) == 1:
        spec["cols"], spec["repeat"] = cols[0]
    else:
        spec["cols"] = [list(s) for s in cols]
    if node.get("groups", 1) > 1:
        spec["groups"] = node["groups"]
    return spec


def live_parameters(arch: Arch, alive: dict[str, np.ndarray], n_classes: int, nodes: NodeMap | None = None) -> int:
    """Parameters task t's sub-network touches: per tensor, rows of live nodes × columns of live sources (× kernel
    positions), BatchNorm channels of live nodes, and the head's columns of live features plus its bias."""
    nodes = nodes or node_map(arch)
    flat = nodes.join(alive, "node mask")
    total = 0
    for tensor, shape in param_shapes(arch).items():
        kept = nodes.kept(flat, tensor)
        if kept is None:
            continue
        if tensor in nodes.cols:  # rows × columns of the GEMM view, each column a kernel's worth of weights
            total += int(np.broadcast_to(kept, shape[:2]).sum()) * math.prod(shape[2:])
        else:
            total += int(kept.sum()) * math.prod(shape[1:])
    head = np.append(flat, True)[nodes.head]
    return total + (int(head.sum()) + 1) * n_classes
