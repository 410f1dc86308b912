"""Structural compaction: make one task's folded graph physically smaller without changing what it computes.

A task's materialised weights (`materialize(packed, t)`) often contain whole zero rows and columns: LPS column/filter
pruning, AGS-CL dead nodes, free capacity no task has claimed yet. This pass removes them, working only from the
values, so it serves every delta kind alike:

- an output unit (a linear row or a conv filter) whose consumer reads none of it (its input columns in the next
  layer, or the head, are all zero) is deleted, with its bias and its BatchNorm channel;
- an output unit whose row is all zero emits a constant c (its bias pushed through the BatchNorm/ReLU/pool ops that
  follow). If c = 0 it is deleted; otherwise its effect W_next[:, unit]·c is folded into the next bias and it is
  deleted, where that is exact: a linear consumer (or the head), or a conv consumer without padding (with padding
  the border outputs see zeros instead of c, so such a unit stays);
- network inputs (columns or channels) that the first layer never reads are dropped by a Gather in front of it
  (``arch["input_select"]``), so the graph still takes the same input;
- deleting a unit slices the consumer's inputs to match, with the flatten repeat (H·W columns per conv channel,
  channel-major) from `edgecl.arch.unit_sources`; the pass repeats until nothing changes (a fixed point).

Only sequential specs are compacted. Specs with residual blocks are returned unchanged (the report says so): a
block's output channels are read by both the next block and the identity shortcut, so removing one needs agreement
across the whole chain of blocks; keeping them dense is always correct. BatchNorm inside sequential specs is handled
per channel.

Why our own pass and not Torch-Pruning (which the issue suggests): the exporter must not import torch, and our specs
have exactly six layer kinds with a known unit map, so a numpy dependency pass over the spec is small, exact, and
needs no model object. The compacted spec is export-only: it may carry ``input_select`` and is not fed back to
`edgecl.arch.validate` or to training.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgecl.arch.spec import Arch, is_sequential, unit_sources

WEIGHT_OPS = ("linear", "conv")
BN_KEYS = ("weight", "bias", "running_mean", "running_var")
HEAD = "head"
_CONSTANT_MAPS = {  # what each activation makes of a constant channel (float64, as torch computes in float32)
    "relu": lambda v: np.maximum(v, 0.0), "relu6": lambda v: np.clip(v, 0.0, 6.0),
    "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "tanh": np.tanh,
    "hardsigmoid": lambda v: np.clip(v + 3, 0, 6) / 6, "hardswish": lambda v: v * np.clip(v + 3, 0, 6) / 6,
    "silu": lambda v: v / (1 + np.exp(-v)), "gelu": lambda v: np.full_like(v, np.nan)}


@dataclass
class CompactionReport:
    """What compaction did to one task: units per layer before → after, inputs kept, constants folded."""

    compacted: bool
    reason: str
    params_dense: int
    params_compact: int
    layers: dict[str, list[int]] = field(default_factory=dict)
    inputs_kept: list[int] | None = None
    folded_units: int = 0
    rounds: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def count_params(params: dict[str, np.ndarray]) -> int:
    """Numbers stored in a graph's initializers (weights, biases, BatchNorm statistics, head)."""
    return int(sum(np.asarray(v).size for v in params.values()))


def compact_task(arch: Arch, params: dict[str, np.ndarray]) -> tuple[Arch, dict[str, np.ndarray], CompactionReport]:
    """(arch', params', report): a smaller spec and tensors computing the same logits as (arch, params)."""
    dense = count_params(params)
    if not is_sequential(arch) or any(n["op"] == "conv" and n["groups"] != 1 for n in arch["nodes"]):
        return (copy.deepcopy(arch), dict(params),
                CompactionReport(False, "residual adds, gates, concatenation or grouped convolutions: kept dense", dense,
                                 dense))
    net = _Net(arch, params)
    before = {net.name(i): net.units(i) for i in range(len(net.weight_layers))}
    while net.compact_round():
        pass
    layers = {name: [n, net.units(i)] for i, (name, n) in enumerate(before.items())}
    report = CompactionReport(True, "sequential", dense, count_params(net.params), layers, net.inputs_kept(),
                              net.folded, net.rounds)
    net.arch["feature_dim"] = int(net.params["head.weight"].shape[1])
    return net.arch, net.params, report


class _Net:
    """Mutable copy of a sequential spec and its tensors, with the unit map compaction needs."""

    def __init__(self, arch: Arch, params: dict[str, np.ndarray]):
        self.arch = copy.deepcopy(arch)
        self.params = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
        layers = self.arch["nodes"]
        self.weight_layers = [i for i, layer in enumerate(layers) if layer["op"] in WEIGHT_OPS]
        sources = unit_sources(arch)  # repeats are spatial sizes: compaction never changes them
        names = [layers[i]["name"] for i in self.weight_layers]
        last = layers[self.weight_layers[-1]]["out"] if names else 1
        self.repeat = [sources[n][1] for n in names[1:]] + [arch["feature_dim"] // last]
        self.input_total = None
        self.folded = 0
        self.rounds = 0

    def name(self, i: int) -> str:
        return self.arch["nodes"][self.weight_layers[i]]["name"]

    def units(self, i: int) -> int:
        return int(self.params[f"{self.name(i)}.weight"].shape[0])

    def layer(self, i: int) -> dict:
        return self.arch["nodes"][self.weight_layers[i]]

    def consumer(self, i: int) -> tuple[str, dict | None]:
        """Tensor prefix and spec of the layer that reads layer i's units (None spec: the head)."""
        if i + 1 < len(self.weight_layers):
            return self.name(i + 1), self.layer(i + 1)
        return HEAD, None

    def post_ops(self, i: int) -> list[dict]:
        """The non-weight ops between layer i and its consumer (BatchNorm, ReLU, pooling, flatten)."""
        start = self.weight_layers[i] + 1
        stop = self.weight_layers[i + 1] if i + 1 < len(self.weight_layers) else len(self.arch["nodes"])
        return self.arch["nodes"][start:stop]

    def inputs_kept(self) -> list[int] | None:
        if self.input_total is None:
            return None
        return [len(self.arch["input_select"]), self.input_total]

    # -- one round ------------------------------------------------------------------------------------------------
    def compact_round(self) -> bool:
        self.rounds += 1
        changed = self._drop_unread_inputs() if self.weight_layers else False
        for i in range(len(self.weight_layers)):
            changed |= self._compact_units(i)
        return changed

    def _drop_unread_inputs(self) -> bool:
        """Gather only the input columns/channels the first layer reads."""
        name = self.name(0)
        w = self.params[f"{name}.weight"]
        block = w.reshape(w.shape[0], w.shape[1], -1)
        read = np.flatnonzero(block.any(axis=(0, 2)))
        if len(read) == block.shape[1] or len(read) == 0:
            return False
        previous = self.arch.get("input_select")
        if previous is None:
            self.input_total = block.shape[1]
            previous = list(range(block.shape[1]))
        self.arch["input_select"] = [int(previous[j]) for j in read]
        self.params[f"{name}.weight"] = np.ascontiguousarray(np.take(w, read, axis=1))
        self.layer(0)["in"] = len(read)
        return True

    def _compact_units(self, i: int) -> bool:
        """Delete layer i's units that are unread, or constant and foldable into the consumer's bias."""
        prefix = self.name(i)
        w = self.params[f"{prefix}.weight"]
        n = w.shape[0]
        cname, cspec = self.consumer(i)
        cw = self.params[f"{cname}.weight"]
        block = cw.reshape(cw.shape[0], n, -1)  # (consumer out, producer unit, repeat or kernel positions)
        if cw.ndim == 2 and block.shape[2] != self.repeat[i]:
            raise ValueError(f"compaction: {cname} reads {block.shape[2]} columns per unit of {prefix}, "
                             f"the unit map says {self.repeat[i]}")
        unread = ~block.any(axis=(0, 2))
        zero_row = ~w.reshape(n, -1).any(axis=1)
        const = self._unit_constants(i)
        foldable = cspec is None or cspec["op"] == "linear" or not any(cspec.get("pad", [0]))
        removable = unread | (zero_row & ((const == 0) | (foldable & np.isfinite(const))))
        if removable.all():
            removable[0] = False  # keep one unit: ONNX graphs with empty dimensions are not portable
        drop = np.flatnonzero(removable)
        if len(drop) == 0:
            return False
        fold = np.flatnonzero(removable & ~unread & (const != 0))
        if len(fold):
            self._fold_into_bias(cname, cspec, block[:, fold, :], const[fold])
            self.folded += len(fold)
        self._delete_units(i, drop, cname, cspec, block)
        return True

    def _unit_constants(self, i: int) -> np.ndarray:
        """The value each unit of layer i would carry into its consumer if its weight row were zero (float64)."""
        layer = self.layer(i)
        bias = self.params.get(f"{layer['name']}.bias")
        v = np.zeros(self.units(i)) if bias is None else bias.astype(np.float64)
        for op in self.post_ops(i):
            kind = op["op"]
            if kind == "bn":
                g, b, m, var = (self.params[f"{op['name']}.{k}"].astype(np.float64) for k in BN_KEYS)
                v = (v - m) / np.sqrt(var + op["eps"]) * g + b
            elif kind in _CONSTANT_MAPS:
                v = _CONSTANT_MAPS[kind](v)
            elif kind == "avgpool" and any(op["pad"]) and op["count_include_pad"]:
                v = np.full_like(v, np.nan)  # border windows average the constant with zero padding: not constant
            # maxpool, avgpool without padding, gap, flatten, reshape: a spatially constant channel stays constant
        return v

    def _fold_into_bias(self, cname: str, cspec: dict | None, cols: np.ndarray, const: np.ndarray) -> None:
        key = f"{cname}.bias"
        if key not in self.params:
            self.params[key] = np.zeros(cols.shape[0], dtype=np.float32)
            cspec["bias"] = True
        extra = cols.astype(np.float64).sum(axis=2) @ const
        self.params[key] = (self.params[key].astype(np.float64) + extra).astype(np.float32)

    def _delete_units(self, i: int, drop: np.ndarray, cname: str, cspec: dict | None, block: np.ndarray) -> None:
        prefix = self.name(i)
        self.params[f"{prefix}.weight"] = np.ascontiguousarray(np.delete(self.params[f"{prefix}.weight"], drop, 0))
        if f"{prefix}.bias" in self.params:
            self.params[f"{prefix}.bias"] = np.delete(self.params[f"{prefix}.bias"], drop)
        self.layer(i)["out"] -= len(drop)
        for op in self.post_ops(i):
            if op["op"] == "bn":
                for k in BN_KEYS:
                    self.params[f"{op['name']}.{k}"] = np.delete(self.params[f"{op['name']}.{k}"], drop)
                op["ch"] -= len(drop)
        cw = self.params[f"{cname}.weight"]
        kept = np.delete(block, drop, axis=1)
        new_shape = (cw.shape[0], -1) if cw.ndim == 2 else (cw.shape[0], kept.shape[1]) + cw.shape[2:]
        self.params[f"{cname}.weight"] = np.ascontiguousarray(kept.reshape(new_shape))
        if cspec is not None:
            cspec["in"] = int(self.params[f"{cname}.weight"].shape[1])
