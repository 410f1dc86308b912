"""Property-based fuzzing of channel groups (`edgecl.arch.channel_map`), structural compaction and AGS-CL's node map
on random small graph specs: convolutions (3×3 with and without padding, 1×1, depthwise, grouped, a quarter of them
weight-standardised, some in two windows, 2×2 after a ``pad`` node of zeros or 0.5, 3×3 after a BlurPool's reflect
/ replicate / zero ``pad`` and ``blur``, 2×2 after adaptive average pooling to one more row and column, 2×2 of stride
2 after a bilinear ×2 ``upsample`` with or without align_corners), BatchNorm, ReLU / leaky ReLU / square, residual
adds of equal-width tensors (existing tensors, slices taken at other offsets, slices of cats, slices of slices, cats
of slices, new convolutions), token mixing (the map reshaped to tokens, a ``token_mix`` with or without a bias,
reshaped back), gates (a one-channel spatial or scalar gate, a squeeze-and-excitation gate as wide as
the data), concatenations and slices, ending in gap/flatten (and sometimes a linear layer). Random weights, then
some conv/linear output channels killed (a zero row and bias, a zero row and a bias that ReLU or a square turns into
a constant, a zero BatchNorm scale), some whole channel groups killed in every producer, some input columns zeroed.
For every spec:

1. `channel_map` raises ChannelError or returns a map in which every axis is as wide as its tensor and every op's
   channels follow from its inputs' (an add's inputs and output are the same units, a cat lays its inputs side by
   side, a slice takes whole segments, a depthwise conv's rows are its input's channels, ...);
2. `compact_task` (channel_multiple=1) never raises, never grows the graph, and its graph gives the dense graph's
   logits (ONNX Runtime, within 1e-4 relative); a spec `channel_map` refuses is kept dense; compacting the
   compacted graph again (from its input selection) keeps them too;
3. AGS-CL's `node_map` builds (every row, column and head index in range and as long as its tensor's axis; nothing
   adds to the network input's channels, which are no node) or refuses with an ``agscl:`` UsageError — always
   when `channel_map` refuses.

Each property is its own test (300 derandomized examples, a few seconds each when they pass); a failing example
prints its spec as JSON and the channels killed.
"""
from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
from hypothesis import HealthCheck, given, note, settings, strategies as st

from edgecl.arch import ChannelError, channel_map, param_shapes, validate
from edgecl.arch.spec import INPUT, is_depthwise, node_shapes, rowless_tensors
from edgecl.errors import UsageError
from edgecl.export import compact_task, count_params
from edgecl.export.onnx_export import run_onnx
from edgecl.graph.builder import build_onnx
from edgecl.train.methods.agscl_nodes import node_map
from random_weights import random_params

TOL = 1e-4
MAX_CH = 12
HW = 4
N_CLASSES = 3
MAX_STEPS = 8  # random construction steps per spec (an add or a cat may build several nodes)
MAX_GROUP_KILLS = 3  # whole channels killed in every producer of their group


class _Graph:
    """A spec under construction: nodes, and every tensor's shape (``input`` included)."""

    def __init__(self, draw, in_ch: int):
        self.draw = draw
        self.nodes: list[dict] = []
        self.shapes: dict[str, list[int]] = {INPUT: [in_ch, HW, HW]}
        self.used: set[str] = set()

    def node(self, op: str, inputs: list[str], shape: list[int], /, **fields) -> str:  # fields may hold a shape
        name = f"{op}{len(self.nodes)}"
        self.nodes.append({"name": name, "op": op, "inputs": inputs, **fields})
        self.shapes[name] = shape
        self.used.update(inputs)
        return name

    def pick(self, hw: int | None = None, min_ch: int = 1, exclude: str | None = None) -> str | None:
        """A map: the most recent ones first (what shrinking goes to), the network input rarely (a slice or a cut of
        its channels is refused)."""
        names = [n for n, s in self.shapes.items() if len(s) == 3 and s[0] >= min_ch and n != exclude
                 and (hw is None or s[1] == hw)]
        if not names:
            return None
        if names[0] == INPUT and (len(names) == 1 or self.draw(st.integers(0, 7)) == 0):
            return INPUT
        names = [n for n in names if n != INPUT][::-1]
        return names[self.draw(st.integers(0, len(names) - 1))]

    # -- producers ----------------------------------------------------------------------------------------------
    def conv(self, src: str, out: int | None = None, kind: str | None = None) -> str:
        c, h, _ = self.shapes[src]
        kinds = ["1x1", "3x3p1", "same2x2"] + (["3x3p0"] if h >= 3 and out is None else []) + \
                (["blurred"] if h >= 2 else []) + (["adaptive2x2"] if h <= 8 else []) + ["bilinear2x2"] + \
                (["depthwise3x3", "depthwise1x1"] if c > 1 and out in (None, c) else [])
        if c % 2 == 0 and (out is None or out % 2 == 0):
            kinds.append("grouped")
        kind = kind or self.draw(st.sampled_from(kinds))
        if out is None:
            out = c if kind.startswith("depthwise") else self.draw(st.integers(1, MAX_CH))
            if kind == "grouped":
                out = 2 * self.draw(st.integers(1, MAX_CH // 2))
        k, pad, groups = {"1x1": (1, 0, 1), "3x3p1": (3, 1, 1), "3x3p0": (3, 0, 1), "depthwise3x3": (3, 1, c),
                          "depthwise1x1": (1, 0, c), "grouped": (3, 1, 2), "same2x2": (2, 0, 1), "blurred": (3, 1, 1),
                          "adaptive2x2": (2, 0, 1), "bilinear2x2": (2, 0, 1)}[kind]
        if kind == "same2x2":  # TensorFlow's "same" for an even kernel: a pad node adds the bottom row, right column
            src = self.node("pad", [src], [c, h + 1, h + 1], pads=[0, 0, 1, 1],
                            value=self.draw(st.sampled_from([0.0, 0.5])))
            h += 1
        if kind == "blurred":  # anti-aliasing at stride 1: a pad in BlurPool's modes, then the binomial filter
            mode = self.draw(st.sampled_from(["reflect", "replicate", "constant"]))
            src = self.node("pad", [src], [c, h + 2, h + 2], pads=[1, 1, 1, 1], mode=mode)
            src = self.node("blur", [src], [c, h, h], k=3, stride=1)
        if kind == "adaptive2x2":  # h → h + 1 positions: windows of one and two, overlapping
            src = self.node("adaptive_avgpool", [src], [c, h + 1, h + 1], size=[h + 1, h + 1])
            h += 1
        stride = 1
        if kind == "bilinear2x2":  # h → 2h, each channel alone, then back to h by a 2×2 conv of stride 2
            src = self.node("upsample", [src], [c, 2 * h, 2 * h], scale=[2, 2], mode="bilinear",
                            align_corners=self.draw(st.booleans()))
            h, stride = 2 * h, 2
        h_out = (h + 2 * pad - k) // stride + 1
        standardized = {"standardize": 1e-5, "gain_scale": self.draw(st.sampled_from([1.0, 0.4]))} \
            if self.draw(st.integers(0, 3)) == 0 else {}  # NF-ResNet's weight standardisation: folded first
        if k - 2 * pad == 1 and stride == 1 and h % 2 == 0 and self.draw(st.integers(0, 3)) == 0:
            standardized["window"] = [h // 2, h]  # each half on its own (EfficientViT-MSRA's conv on q)
        return self.node("conv", [src], [out, h_out, h_out], **{"in": c, "out": out}, k=[k, k], pad=[pad, pad],
                         stride=[stride, stride], groups=groups, bias=self.draw(st.booleans()), **standardized)

    def slice(self, src: str, start: int, stop: int) -> str:
        return self.node("slice", [src], [stop - start, *self.shapes[src][1:]], start=start, stop=stop)

    def cat(self, srcs: list[str]) -> str:
        shape = self.shapes[srcs[0]]
        return self.node("cat", srcs, [sum(self.shapes[s][0] for s in srcs), *shape[1:]])

    def tensor_of(self, width: int, hw: int, depth: int = 0) -> str:
        """A tensor of `width` channels at `hw`: an existing one, a slice of a wider one at some offset (of a cat, of
        a slice, ...), a cat of two such parts, or a new convolution."""
        options = ["conv"]
        same = [n for n, s in self.shapes.items() if s == [width, hw, hw]]
        wider = [n for n, s in self.shapes.items() if len(s) == 3 and s[1] == hw and s[0] > width and n != INPUT]
        if same:
            options.append("existing")
        if wider:
            options.append("slice")
        if width >= 2 and depth < 2:
            options.append("cat")
        how = self.draw(st.sampled_from(options))
        if how == "existing":
            return self.draw(st.sampled_from(same))
        if how == "slice":
            src = self.draw(st.sampled_from(wider))
            start = self.draw(st.integers(0, self.shapes[src][0] - width))
            return self.slice(src, start, start + width)
        if how == "cat":
            first = self.draw(st.integers(1, width - 1))
            return self.cat([self.tensor_of(first, hw, depth + 1), self.tensor_of(width - first, hw, depth + 1)])
        src = self.pick(hw=hw)  # the tensor this one will be added to or laid beside is one
        return self.conv(src, out=width, kind=self.draw(st.sampled_from(["1x1", "3x3p1"])))

    # -- one random step ----------------------------------------------------------------------------------------
    def step(self) -> None:
        action = self.draw(st.sampled_from(["conv", "bn", "act", "add", "slice", "cat", "gate", "mix"]))
        if action == "conv":
            self.conv(self.pick())
        elif action == "bn":  # or ResMLP's per-channel affine (a killed channel leaves its offset)
            src = self.pick()
            self.node(self.draw(st.sampled_from(["bn", "affine"])), [src], list(self.shapes[src]),
                      ch=self.shapes[src][0])
        elif action == "act":
            src = self.pick()
            act = self.draw(st.sampled_from(["relu", "leaky_relu", "square"]))  # square: MetaFormer's StarReLU
            slope = {"slope": self.draw(st.sampled_from([0.01, 0.2, -0.5]))} if act == "leaky_relu" else {}
            self.node(act, [src], list(self.shapes[src]), **slope)
        elif action == "add":
            a = self.pick()
            c, h, _ = self.shapes[a]
            inputs = [a] + [self.tensor_of(c, h) for _ in range(self.draw(st.integers(1, 2)))]
            self.node("add", inputs, [c, h, h])
        elif action == "slice":
            # a slice of the network input's channels is refused by channel_map: rarely
            src = self.pick(min_ch=2, exclude=None if self.draw(st.integers(0, 9)) == 0 else INPUT)
            if src is None:
                return
            c = self.shapes[src][0]
            start = self.draw(st.integers(0, c - 1))
            self.slice(src, start, self.draw(st.integers(start + 1, c)))
        elif action == "cat":
            a = self.pick()
            c, h, _ = self.shapes[a]
            if c >= MAX_CH:
                return
            parts = [a, self.tensor_of(self.draw(st.integers(1, MAX_CH - c)), h)]
            if self.draw(st.booleans()):
                parts.reverse()
            self.cat(parts)
        elif action == "mix":  # MLP-Mixer's token mixing: the map as tokens, a Linear over them, back to the map
            src = self.pick()
            c, h, _ = self.shapes[src]
            tokens = self.node("reshape", [src], [c, h * h, 1], shape=[c, h * h, 1])
            mixed = self.node("token_mix", [tokens], [c, h * h, 1], **{"in": h * h, "out": h * h,
                                                                       "bias": self.draw(st.booleans())})
            self.node("reshape", [mixed], [c, h, h], shape=[c, h, h])
            del self.shapes[tokens], self.shapes[mixed]  # token maps: nothing else here reads them
        else:
            self.gate()

    def gate(self) -> None:
        """data × gate: a one-channel spatial gate, a one-channel scalar gate, or a squeeze-and-excitation gate as
        wide as the data."""
        data = self.pick()
        c, h, _ = self.shapes[data]
        kind = self.draw(st.sampled_from(["spatial", "scalar", "se"]))
        if kind == "spatial":
            src = self.pick(hw=h)
            g = self.conv(src, out=1, kind=self.draw(st.sampled_from(["1x1", "3x3p1"])))
        else:
            src = self.pick() if kind == "scalar" else data
            pooled = self.node("gap", [src], [self.shapes[src][0], 1, 1])
            g = self.conv(pooled, out=1 if kind == "scalar" else c, kind="1x1")
        if self.draw(st.booleans()):
            g = self.node("sigmoid", [g], list(self.shapes[g]))
        inputs = [data, g] if self.draw(st.booleans()) else [g, data]
        self.node("mul", inputs, [c, h, h])

    def finish(self) -> dict:
        """Every tensor nobody reads goes to the features: gap (or flatten) each, cat, flatten; maybe a linear layer
        and a slice of the feature vector."""
        leaves = [n for n in self.shapes if n not in self.used and n != INPUT] or [self.pick()]
        flat_each = self.draw(st.integers(0, 4)) == 0
        feats = []
        for leaf in leaves:
            if flat_each:
                feats.append(self.node("flatten", [leaf], [int(np.prod(self.shapes[leaf]))]))
            else:
                feats.append(self.node("gap", [leaf], [self.shapes[leaf][0], 1, 1]))
        out = self.cat(feats) if len(feats) > 1 else feats[0]
        if not flat_each:
            out = self.node("flatten", [out], [self.shapes[out][0]])
        if self.draw(st.integers(0, 4)) == 0 and self.shapes[out][0] > 1:
            # whole channels of the feature vector (a cut through one channel's H·W features is refused): mostly
            step = 1 if not flat_each or self.draw(st.integers(0, 4)) == 0 else HW * HW
            while self.shapes[out][0] % step:
                step //= 2
            width = self.shapes[out][0] // step
            if width > 1:
                start = self.draw(st.integers(0, width - 1))
                out = self.slice(out, start * step, self.draw(st.integers(start + 1, width)) * step)
        if self.draw(st.integers(0, 3)) == 0:
            n = self.draw(st.integers(1, 8))
            out = self.node("linear", [out], [n], **{"in": self.shapes[out][0], "out": n},
                            bias=self.draw(st.booleans()))
            if self.draw(st.booleans()):
                out = self.node("relu", [out], [n])
        return validate({"name": "fuzz", "input_shape": self.shapes[INPUT], "nodes": self.nodes, "output": out})


@st.composite
def _specs(draw):
    graph = _Graph(draw, draw(st.integers(1, 4)))
    for _ in range(draw(st.integers(1, MAX_STEPS))):
        graph.step()
    return graph.finish()


def _random_params(arch, seed):
    return random_params(arch, N_CLASSES, seed)


def _bias_for(kind: str, params: dict, bias: str | None, rows) -> None:
    if bias is None:
        return
    params[bias][rows] = {"zero": 0.0, "neg": -1.5, "pos": 0.75}[kind]


class _Case(NamedTuple):
    arch: dict
    params: dict[str, np.ndarray]
    kills: list[str]

    def __repr__(self) -> str:  # what a failing example prints: the spec and the kills, not every weight
        return f"spec: {json.dumps(self.arch)}\nkills: {json.dumps(self.kills)}"


@st.composite
def _cases(draw):
    """(spec, params, kills): weights with some output channels killed, described in `kills`."""
    arch = draw(_specs())
    params = _random_params(arch, draw(st.integers(0, 2**16)))
    kills: list[str] = []
    producers = [n for n in arch["nodes"] if n["op"] in ("conv", "linear")]
    kind = st.sampled_from(["zero", "neg", "pos"])
    for node in producers:  # single channels of one layer
        name, w = node["name"], params[f"{node['name']}.weight"]
        bias = f"{name}.bias" if node["bias"] else None
        for row in draw(st.sets(st.integers(0, w.shape[0] - 1), max_size=w.shape[0])):
            how = draw(kind)
            w[row] = 0
            _bias_for(how, params, bias, row)
            kills.append(f"{name} row {row}: {how}")
        if w.ndim == 4 and not is_depthwise(node) and draw(st.integers(0, 3)) == 0:
            col = draw(st.integers(0, w.shape[1] - 1))
            w[:, col] = 0
            kills.append(f"{name} column {col}: unread")
    for node in arch["nodes"]:
        if node["op"] in ("bn", "affine") and draw(st.integers(0, 3)) == 0:  # the channel is its bias after it
            ch = draw(st.integers(0, node["ch"] - 1))
            params[f"{node['name']}.weight"][ch] = 0
            kills.append(f"{node['name']} channel {ch}: zero {node['op']} scale")
    try:
        cm = channel_map(arch)
    except Exception:  # noqa: BLE001 - refused (or a bug, which the tests report): no group kills
        cm = None
    if cm is not None:  # whole channels of a group, in every producer of it
        members = cm.members()
        groups = sorted(g for g in cm.groups if g != INPUT)
        for _ in range(draw(st.integers(0, MAX_GROUP_KILLS)) if groups else 0):
            g = draw(st.sampled_from(groups))
            ch, how = draw(st.integers(0, cm.groups[g] - 1)), draw(kind)
            for tensor in members[g]:
                node_name, key = tensor.rsplit(".", 1)
                if key != "weight" or not any(n["name"] == node_name for n in producers):
                    continue
                offset = 0
                for h, r in cm.rows[tensor]:
                    if h == g:
                        params[tensor][offset + ch] = 0
                        bias = f"{node_name}.bias"
                        _bias_for(how, params, bias if bias in params else None, offset + ch)
                    offset += cm.groups[h] * r
            kills.append(f"group {g!r} channel {ch}: {how} in {members[g]}")
    return _Case(arch, params, kills)


def _segments_between(cm, source, start, stop):
    out, pos = [], 0
    for g, r in source:
        width = cm.groups[g] * r
        if start <= pos and pos + width <= stop:
            out.append((g, r))
        pos += width
    assert cm.size(out) == stop - start, (source, start, stop)
    return out


def _check_channel_map(arch, cm) -> None:
    """Independently of `_check_widths`: every axis is as wide as its tensor, and every op's channels follow from
    its inputs' as the op says."""
    shapes, params = node_shapes(arch), param_shapes(arch)
    assert all(n > 0 for n in cm.groups.values())
    for segments in [*cm.spaces.values(), *cm.rows.values(), *cm.cols.values(), cm.head_cols]:
        assert all(g in cm.groups and r >= 1 for g, r in segments), segments
    for name, shape in shapes.items():
        assert cm.size(cm.spaces[name]) == shape[0], name
    for tensor, segments in cm.rows.items():
        assert cm.size(segments) == params[tensor][0], tensor
    assert set(cm.rows) == set(params) - set(rowless_tensors(arch))  # a token mix's weight is no channel's
    for node in arch["nodes"]:
        op, name = node["op"], node["name"]
        space, x = cm.spaces[name], cm.spaces[node["inputs"][0]]
        ins = [cm.spaces[s] for s in node["inputs"]]
        if op == "conv" and is_depthwise(node):
            assert space == x and cm.rows[f"{name}.weight"] == x, name
            assert f"{name}.weight" not in cm.cols
        elif op in ("conv", "linear"):
            assert cm.cols[f"{name}.weight"] == x, name
            assert cm.size(cm.cols[f"{name}.weight"]) == node["in"]
            assert cm.rows[f"{name}.weight"] == space, name
        elif op in ("bn", "affine"):
            keys = ("weight", "bias", "running_mean", "running_var")[:4 if op == "bn" else 2]
            assert space == x and all(cm.rows[f"{name}.{k}"] == x for k in keys), name
        elif op == "flatten":
            hw = int(np.prod(shapes[node["inputs"][0]][1:]))
            assert space == [(g, r * hw) for g, r in x], name
        elif op == "add":
            assert all(s == space for s in ins), (name, ins)
        elif op == "mul":
            full = [s for s, i in zip(ins, node["inputs"]) if shapes[i][0] > 1]
            assert all(s == space for s in full) and (full or all(s == space for s in ins)), (name, ins)
        elif op == "cat":
            assert space == [seg for s in ins for seg in s], name
        elif op == "slice":
            assert space == _segments_between(cm, x, node["start"], node["stop"]), name
        else:
            assert space == x, name
        if op in ("conv", "linear") and node["bias"]:
            assert cm.rows[f"{name}.bias"] == cm.rows[f"{name}.weight"]
        if op == "conv" and node.get("standardize"):
            assert cm.rows[f"{name}.gain"] == cm.rows[f"{name}.weight"]
    assert cm.head_cols == cm.spaces[arch["output"]]


def _check_node_map(arch, cm) -> None:
    """`cm`: the spec's channel map, None when channel_map refuses it."""
    try:
        nm = node_map(arch)
    except UsageError as exc:
        assert str(exc).startswith("agscl: ") and len(str(exc)) > 20, exc
        return
    assert cm is not None, "node_map accepted a spec channel_map refuses"
    inputs = {g for g, _ in cm.spaces[INPUT]}  # the network input's channels are no node: nothing may add to them
    assert not any(g in inputs for segments in cm.rows.values() for g, _ in segments), \
        f"node_map accepted a graph whose producers share the network input's channels {cm.spaces[INPUT]}"
    shapes = param_shapes(arch)
    for tensor, idx in nm.rows.items():
        assert idx.shape == (shapes[tensor][0],) and ((0 <= idx) & (idx < nm.n)).all(), tensor
    for weight, idx in nm.cols.items():
        assert idx.shape[1] == shapes[weight][1] and idx.shape[0] in (1, shapes[weight][0]), weight
        assert ((-1 <= idx) & (idx < nm.n)).all(), weight
    assert nm.head.shape == (arch["feature_dim"],) and ((-1 <= nm.head) & (nm.head < nm.n)).all()
    alive = np.ones(nm.n, bool)
    alive[::2] = False
    for tensor in nm.rows:
        nm.kept(alive, tensor)


def _channel_map_or_none(arch):
    try:
        return channel_map(arch)
    except ChannelError as exc:
        assert str(exc), "ChannelError without a message"
        return None


def _logits(arch, params):
    x = np.random.default_rng(0).random((8, *arch.get("input_select_from", arch["input_shape"])), dtype=np.float32)
    return run_onnx(build_onnx(arch, params), x)


def _assert_close(dense, small):
    assert dense.shape == small.shape
    diff = float(np.abs(dense - small).max())
    assert diff <= TOL * max(1.0, float(np.abs(dense).max())), f"logits differ by {diff}"


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(_specs())
def test_channel_map_follows_every_op_or_refuses(arch):
    note("spec: " + json.dumps(arch))
    cm = _channel_map_or_none(arch)
    if cm is not None:
        _check_channel_map(arch, cm)


@FUZZ
@given(_specs())
def test_agscl_node_map_builds_or_refuses_with_a_usage_error(arch):
    note("spec: " + json.dumps(arch))
    _check_node_map(arch, _channel_map_or_none(arch))


@FUZZ
@given(_cases())
def test_compaction_with_dead_channels_keeps_the_logits(case):
    arch, params, _ = case
    c_arch, c_params, report = compact_task(arch, params, channel_multiple=1)
    note(f"report: {report.to_json()}")
    assert report.compacted == (_channel_map_or_none(arch) is not None), report.reason
    assert report.params_compact == count_params(c_params) <= count_params(params) == report.params_dense
    validate(c_arch)
    dense = _logits(arch, params)
    _assert_close(dense, _logits(c_arch, c_params))
    again_arch, again_params, _ = compact_task(c_arch, c_params, channel_multiple=1)  # from its input selection
    assert count_params(again_params) <= count_params(c_params)
    _assert_close(dense, _logits(again_arch, again_params))
