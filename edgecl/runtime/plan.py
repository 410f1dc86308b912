"""How each tensor of the switchable graph gets a task's values, chosen from its delta kind so a switch touches as few
bytes as possible. `edgecl.deltas` stays the one place the arithmetic is defined: the plans call its helpers once
per task at load (to get keep masks, factors and permutations) and reproduce `materialize` (bit for bit where
they copy weights; within float rounding where a delta is applied to activations instead, tested).

=========  ==========================================  ==================================================
plan       kinds                                       at a switch
=========  ==========================================  ==================================================
const      shared; the base weight of a factored layer  nothing: an initializer of the graph, so ONNX Runtime
                                                        pre-packs it like a dense model's
own        task (heads, STL trunks, per-task biases);   nothing copied: the task's own array is bound
           the per-task vectors of a factored layer
masked     lps, node (conv)                            where(keep_t, base, 0), keep_t stored at 1 bit/weight
                                                       (`maskfill`: one compiled pass, ~1× a copy)
permute    permute (conv, biases)                      np.take of the base rows into the buffer
generic    lowrank (conv, or where unfolding is not    `materialize_param` into the buffer (low rank: in place)
           smaller), anything else
read       task, in place of ``own`` (`read_on_miss`)   the task's blob read from the artifact into the buffer
=========  ==========================================  ==================================================

Factored linear layers (``forms``): a delta that is a function of the layer's input and output is applied to the
activations around a constant base weight, so a switch rebinds a few vectors instead of rewriting the weight —
node: ``rows ⊙ (W (cols ⊙ x))``; lowrank: ``r ⊙ (W (s ⊙ x)) + U (Vᵀ x)`` (HALRP's "keep the low-rank branch
unfolded", taken when its k(J+I)+J+I numbers are fewer than the J·I of the folded weight); permute:
``gather(W x (+ b), perm)``. Element-wise LPS masks have no such form: their weights are rewritten on a miss.

Plans keep only what a switch reads. They are built task by task from a lazy `ModelSource` (`read_plans`), so the
decoded LPS sharing masks (a byte per element, growing with the square of the task count) and the owner maps live
only while the keep bits are made, never all at once and never after. `read_on_miss` turns the task tensors (heads,
…) into ``read`` plans, so only the cached tasks' are resident, read from the artifact again on a miss.
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from edgecl.arch.op_rules import is_standardized
from edgecl.arch.spec import param_shapes
from edgecl.deltas import PackedModel, lps_keep, materialize_param, node_factor, node_vectors, task_permutation
from edgecl.errors import ArtifactError, UsageError
from edgecl.graph.builder import tensor_names
from edgecl.runtime.maskfill import CHUNK, masked_copy
from edgecl.source import IN_MEMORY, ModelSource

# Layers smaller than this are folded on a switch rather than factored: rewriting 64 K weights costs ~20-40 µs once,
# while each node a factored layer adds costs ~4 µs on every inference (tools/results/bench_switch_trained.json)
FACTOR_MIN_ELEMENTS = 1 << 16
# ... except node masks and permutations of convolutions reading at least this many channels per group: ONNX Runtime
# runs a convolution whose weight is a graph input without its blocked layout and BatchNorm fusion, 1.1-2.8× slower
# than with a constant weight (16-64 channels), while the factored form's Mul or Gather costs 1.0-1.4× (with one
# input channel the Mul cost more than it saved) (tools/results/bench_switch_resnet18.json). Kept now that switched
# convs run blocked: folding resnet18's node masks runs 0.98-1.00× dense at batch 64 against 1.08-1.12× factored,
# but each switch then copies every weight (4-8 ms, 10-40× under a new session, against 0.02-0.04 ms) and batch 1
# gains nothing measurable; `factor=False` is the choice for large batches (bench_switch_resnet18_aligned*.json)
CONV_FACTOR_MIN_CHANNELS = 8


@dataclass
class TensorPlan:
    name: str
    plan: str
    shape: tuple[int, ...]
    base: np.ndarray | None = None
    # own: arrays; masked: packed keep bits; permute: indices or None; generic: a one-task model holding only this
    # tensor's base (also `base`) and the task's pieces of it (what `materialize_param` reads); read: nothing
    per_task: list = field(default_factory=list)
    reader: Any = None  # read: the `TaskBlobs` a miss reads this tensor from
    task_shapes: list = field(default_factory=list)  # read: each task's shape (`shape`, the buffer's, is the largest)
    # per task, one float32 per output row (axis 0) the written weight is multiplied by: a BatchNorm folded into it at
    # a switch (`edgecl.runtime.fold_bn`, the device path); None: written as the delta gives it
    row_scale: list | None = None

    @property
    def constant(self) -> bool:
        return self.plan == "const"

    @property
    def splits(self) -> bool:
        """True when a fill may be shared among threads: a masked tensor of at least two chunks."""
        return self.plan == "masked" and int(np.prod(self.shape)) >= 2 * CHUNK

    @property
    def varies(self) -> bool:
        """True when a task switch must write this tensor into a buffer."""
        return self.plan in ("masked", "permute", "generic", "read")

    @property
    def keeps_masks(self) -> bool:
        """True when the per-task pieces are keep masks or permutations built here (not the model's own arrays)."""
        return self.plan in ("masked", "permute")

    @property
    def mask_bytes(self) -> int:
        """Bytes of the per-task keep masks or permutations this plan built (0 for other plans)."""
        return sum(a.nbytes for a in self.task_arrays()) if self.keeps_masks else 0

    def task_arrays(self) -> Iterator[np.ndarray]:
        """The per-task arrays this plan keeps alive (own arrays, keep bits, permutations, generic pieces)."""
        for item in self.per_task:
            if isinstance(item, PackedModel):
                yield from item.task_tensors[0].values()
            elif item is not None:
                yield item

    def task_view(self, out: np.ndarray, t: int) -> np.ndarray:
        """The part of a slot's buffer `out` that holds task t's values: all of it, except for a `read` tensor whose
        shape differs among tasks (a head's rows): the first elements, shaped as task t's tensor."""
        if self.plan != "read" or tuple(self.task_shapes[t]) == tuple(out.shape):
            return out
        shape = self.task_shapes[t]
        return out.reshape(-1)[:int(np.prod(shape))].reshape(shape)

    def value(self, t: int) -> np.ndarray:
        """Task t's values of this tensor whatever its plan (its logical shape), read or written into a new array:
        for what is computed once per task at load (a BatchNorm folded into a conv, `fold_bn`)."""
        if self.plan in ("const", "static"):
            return self.base
        if self.plan == "own":
            return self.per_task[t]
        if self.plan == "read":
            return np.asarray(self.reader.read(t, self.name), np.float32).reshape(self.task_shapes[t])
        out = np.zeros(self.shape, np.float32)
        self.fill(t, out)
        return out

    def fill(self, t: int, out: np.ndarray, pool: Executor | None = None, workers: int = 1) -> None:
        """Write task t's values of this tensor into `out` (a float32 buffer of `shape`). With a thread pool, a large
        masked tensor is written in parallel ranges (numpy releases the GIL: 2.9× faster on 4 cores of a Xeon)."""
        if self.plan == "masked":
            base, bits, flat = self.base.reshape(-1), self.per_task[t], out.reshape(-1)
            in_ranges(lambda lo, hi: masked_copy(base, bits, flat, lo, hi), base.size, pool if self.splits else None,
                      workers)
        elif self.plan == "read":
            np.copyto(self.task_view(out, t), self.reader.read(t, self.name), casting="unsafe")
        elif self.plan == "permute":
            perm = self.per_task[t]
            np.copyto(out, self.base) if perm is None else np.take(self.base, perm, axis=0, out=out)
        else:
            materialize_param(self.per_task[t], 0, self.name, out=out)  # low-rank: written in place, no temporaries


def in_ranges(fill: Callable[[int, int], None], size: int, pool: Executor | None, workers: int) -> None:
    """``fill(lo, hi)`` over [0, size): at once, or in ranges of whole chunks (starting on a byte of the keep bits)
    shared among `workers` threads of `pool`."""
    if pool is None or workers < 2:
        fill(0, size)
        return
    step = -(-size // (workers * CHUNK)) * CHUNK
    list(pool.map(lambda lo: fill(lo, min(lo + step, size)), range(0, size, step)))


@dataclass
class SwitchPlans:
    """The plans of one model and its factored layers (layer name → form, see `factor_forms`)."""

    plans: list[TensorPlan]
    forms: dict[str, str]

    def graph_factors(self) -> dict[str, tuple[str, dict[str, tuple]]]:
        """For `build_onnx(factors=...)`: factored layer → (form, {part: shape of its `LAYER.weight:PART` vectors})."""
        factors = {}
        for layer, form in self.forms.items():
            prefix = f"{layer}.weight:"
            factors[layer] = (form, {p.name[len(prefix):]: p.shape for p in self.plans if p.name.startswith(prefix)})
        return factors


def _float32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def factor_forms(src: ModelSource, ranks: dict[str, int] | None = None) -> dict[str, str]:
    """Linear/conv layer name → how its task delta is applied to activations ("node", "lowrank", "permute", or
    "permute+bias" when the bias is permuted with the output); layers not listed get their weight switched (or are
    constant when shared). Chosen by size: layers of fewer than `FACTOR_MIN_ELEMENTS` weights are folded, except
    node masks and permutations of convolutions with `CONV_FACTOR_MIN_CHANNELS` input channels per group or more.
    `ranks` (low-rank weight → largest k over the tasks) saves reading every task again when the caller has.

    Only where the form equals the folded weight on that layer: a grouped (or depthwise) convolution ties each
    filter to its group's input channels, so permuting its outputs is not permuting its filters, and its low-rank
    column scaling has in/groups entries, not one per input channel; the low-rank residual's window sum needs
    groups = 1 and dilation = 1 (`edgecl.graph.builder`). Such layers are folded on a switch. Node masks factor on
    any convolution (output rows scale outputs; input columns scale input channels). A weight-standardised conv
    never factors: its filters are standardised after the delta, which no scaling of activations reproduces."""
    forms = {}
    for layer in src.arch["nodes"]:
        if layer["op"] not in ("linear", "conv"):
            continue
        name = layer["name"]
        weight = f"{name}.weight"
        spec = src.params.get(weight, {})
        kind = spec.get("kind")
        if kind not in ("node", "lowrank", "permute") or not _factorable(layer, kind) or is_standardized(layer):
            continue
        shape = src.read_base(weight).shape
        wide_conv = layer["op"] == "conv" and kind != "lowrank" and shape[1] >= CONV_FACTOR_MIN_CHANNELS
        if int(np.prod(shape)) < FACTOR_MIN_ELEMENTS and not wide_conv:
            continue
        if kind == "node":
            forms[name] = kind
        elif kind == "permute":  # the bias is gathered with the output when it shares the weight's permutation
            bias = src.params.get(f"{name}.bias", {})
            same = bias.get("kind") == "permute" and bias.get("group") == spec.get("group")
            forms[name] = "permute+bias" if same else "permute"
        else:
            k = ranks[weight] if ranks is not None else _largest_rank(src, weight)
            if max(k, 1) * (shape[0] + shape[1]) + shape[0] + shape[1] < int(np.prod(shape)):
                forms[name] = "lowrank"
    return forms


def _factorable(layer: dict, kind: str) -> bool:
    """Whether the factored form of `kind` equals the folded weight on this layer (see `factor_forms`)."""
    if layer["op"] == "linear" or kind == "node":
        return True
    return layer["groups"] == 1 and (kind == "permute" or layer["dilation"] == [1, 1])


def _largest_rank(src: ModelSource, weight: str) -> int:
    """The largest low-rank k of `weight` over the tasks (reads every task: for callers without `ranks`)."""
    return max((tt[f"{weight}:u"].shape[-1] for tt in map(src.read_task, range(src.n_tasks))
                if f"{weight}:u" in tt), default=0)


def _node_parts(view: PackedModel, t: int, spec: dict, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A node-factored layer's per-task vectors: the node masks `deltas.node_vectors` gives (rows; cols over every
    input channel, so a grouped conv's mask multiplies its whole input); for a convolution shaped (C, 1, 1) to
    broadcast over NCHW."""
    chan = (1, 1) if len(shape) == 4 else ()
    rows, cols = node_vectors(view, t, spec, shape)
    parts = {}
    if rows is not None:
        parts["rows"] = _float32(rows.reshape((shape[0],) + chan))
    if cols is not None:
        parts["cols"] = _float32(cols.reshape((cols.size,) + chan))
    return parts


def _lowrank_parts(pieces: dict[str, np.ndarray], weight: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A low-rank-factored layer's per-task vectors r, s, U, V. For a convolution the factors become 1×1 kernels:
    V as (k, I, 1, 1), U as (J, k, 1, 1) times the kernel area (the residual, constant over the kernel, meets a
    window *sum* of the input)."""
    j, i = shape[:2]
    chan = (1, 1) if len(shape) == 4 else ()
    u, v = pieces.get(f"{weight}:u"), pieces.get(f"{weight}:v")
    if u is None or v is None or u.shape[-1] == 0:
        u, v = np.zeros((j, 1), np.float32), np.zeros((i, 1), np.float32)
    parts = {"r": _float32(np.asarray(pieces.get(f"{weight}:r", np.ones(j, np.float32))).reshape((j,) + chan)),
             "s": _float32(np.asarray(pieces.get(f"{weight}:s", np.ones(i, np.float32))).reshape((i,) + chan))}
    if chan:
        parts["u"] = _float32((u * np.float32(shape[2] * shape[3])).reshape(j, -1, 1, 1))
        parts["v"] = _float32(v.T.reshape(-1, i, 1, 1))
    else:
        parts["u"], parts["v"] = _float32(u), _float32(v)
    return parts


class _TaskReader:
    """One pass over the tasks, keeping per tensor only what its plan needs (see the module docstring)."""

    def __init__(self, src: ModelSource, factored: bool):
        self.src = src
        self.names = tensor_names(src.arch)
        self.bases = {name: src.read_base(name) for name in src.base_names()}  # owner maps too, while reading
        # node layers are factored by size alone; low-rank ones also by rank, known once every task is read
        sized = factor_forms(src, ranks=dict.fromkeys(src.params, 0)) if factored else {}
        self.node_layers = {layer for layer, form in sized.items() if form == "node"}
        self.own: dict[str, list[np.ndarray]] = {}
        self.bits: dict[str, list[np.ndarray]] = {}
        self.pieces: dict[str, list[dict[str, np.ndarray]]] = {}  # low-rank (or other generic) tensors' task pieces
        self.node_parts: dict[str, list[dict[str, np.ndarray]]] = {}
        # `deltas`' helpers read a PackedModel: this one holds the bases and, while it is read, one task's tensors
        self.view = PackedModel(src.arch, src.method, src.config, src.params, self.bases, list(src.tasks),
                                [{}] * src.n_tasks)

    def read(self) -> None:
        for t in range(self.src.n_tasks):
            tt = self.src.read_task(t)
            self.view.task_tensors[t] = tt
            try:
                self._keep_task(t, tt)
            except (KeyError, ValueError, IndexError, TypeError) as exc:  # UsageError is a ValueError
                raise _inconsistent(self.src, t, exc) from None
            self.view.task_tensors[t] = {}

    def _keep_task(self, t: int, tt: dict[str, np.ndarray]) -> None:
        for name in self.names:
            spec = self.src.params[name]
            kind = spec["kind"]
            layer, _, part = name.rpartition(".")
            if kind == "task":
                self.own.setdefault(name, []).append(_float32(tt[name]))
            elif kind == "node" and layer in self.node_layers and part == "weight":
                self.node_parts.setdefault(layer, []).append(_node_parts(self.view, t, spec, self.bases[name].shape))
            elif kind in ("lps", "node"):
                self.bits.setdefault(name, []).append(np.packbits(self._keep(t, name, spec).reshape(-1)))
            elif kind not in ("shared", "permute"):  # low rank and anything without a cheaper plan
                self.pieces.setdefault(name, []).append(
                    {key: a for key, a in tt.items() if key == name or key.startswith(f"{name}:")})

    def _keep(self, t: int, name: str, spec: dict) -> np.ndarray:
        if spec["kind"] == "lps":
            return lps_keep(self.view, t, name)
        shape = self.bases[name].shape
        return np.broadcast_to(node_factor(self.view, t, spec, shape), shape)

    def ranks(self) -> dict[str, int]:
        return {name: max((p[f"{name}:u"].shape[-1] for p in per if f"{name}:u" in p), default=0)
                for name, per in self.pieces.items()}


def _inconsistent(src: ModelSource, t: int, exc: Exception) -> Exception:
    info = src.tasks[t]
    problem = f"inconsistent delta of task {t} ({info.name}): {str(exc)[:200]}"
    if src.origin == IN_MEMORY:
        return UsageError(f"inconsistent model: {problem}")
    return ArtifactError(src.origin, "model", problem)


def read_plans(src: ModelSource, factored: bool = False) -> SwitchPlans:
    """One plan per graph tensor, in `tensor_names` order (then the factored layers' vectors), read task by task.
    `factored=False` gives the graph of `build_onnx(weights_as_inputs=True)`: every tensor an input."""
    reader = _TaskReader(src, factored)
    reader.read()
    forms = factor_forms(src, ranks=reader.ranks()) if factored else {}
    shapes = param_shapes(src.arch, 1)
    plans, extra = [], []
    for name in reader.names:
        spec = src.params[name]
        kind = spec["kind"]
        base = reader.bases.get(name)
        shape = tuple(base.shape) if base is not None else shapes[name]
        layer, _, part = name.rpartition(".")
        form = forms.get(layer)
        if form and part == "weight":
            plans.append(TensorPlan(name, "const", shape, _float32(base)))
            extra += _factor_plans(reader, name, form, shape)
        elif form == "permute+bias" and part == "bias":
            plans.append(TensorPlan(name, "const", shape, _float32(base)))  # gathered with the output
        elif kind == "shared":
            plans.append(TensorPlan(name, "const" if factored else "static", shape, _float32(base)))
        elif kind == "task":
            own = reader.own[name]
            plans.append(TensorPlan(name, "own", own[0].shape, None, own))
        elif kind in ("lps", "node"):
            plans.append(TensorPlan(name, "masked", shape, _float32(base), reader.bits[name]))
        elif kind == "permute":
            perms = [None if info.seed is None else task_permutation(info.seed, spec["group"], shape[0])
                     for info in src.tasks]
            plans.append(TensorPlan(name, "permute", shape, _float32(base), perms))
        else:
            views = [PackedModel(src.arch, src.method, src.config, {name: spec}, {name: base}, [info], [pieces])
                     for info, pieces in zip(src.tasks, reader.pieces[name])]
            plans.append(TensorPlan(name, "generic", shape, base, views))  # base: what the views read, counted
    return SwitchPlans(plans + extra, forms)


def _factor_plans(reader: _TaskReader, weight: str, form: str, shape: tuple[int, ...]) -> list[TensorPlan]:
    """The per-task vectors a factored layer binds (float32; int64 permutations), one array per task."""
    layer = weight.rpartition(".")[0]
    if form == "node":
        per_task = reader.node_parts[layer]
    elif form == "lowrank":
        per_task = [_lowrank_parts(pieces, weight, shape) for pieces in reader.pieces[weight]]
    else:
        group = reader.src.params[weight]["group"]
        per_task = [{"perm": np.arange(shape[0], dtype=np.int64) if info.seed is None
                     else np.ascontiguousarray(task_permutation(info.seed, group, shape[0]), dtype=np.int64)}
                    for info in reader.src.tasks]
    return [TensorPlan(f"{weight}:{part}", "own", per_task[0][part].shape, None, [parts[part] for parts in per_task])
            for part in per_task[0]]


def task_tensor_plans(plans: list[TensorPlan], src: ModelSource) -> list[TensorPlan]:
    """The plans that keep the model's own task tensors (kind "task") for every task: what `read_on_miss` reads
    instead (not the factored layers' per-task vectors, which are derived, not stored)."""
    return [p for p in plans if p.plan == "own" and src.params.get(p.name, {}).get("kind") == "task"]


def read_on_miss(plans: list[TensorPlan], src: ModelSource) -> tuple[list[TensorPlan], Any]:
    """`plans` with every task tensor (kind "task": heads, per-task biases and statistics, STL trunks) read from the
    artifact into a cache slot on a miss instead of kept for every task, and the `TaskBlobs` they read (the caller
    closes it); `plans` unchanged and None when `src` is in memory (nothing to read again)."""
    names = {p.name for p in task_tensor_plans(plans, src)}
    blobs = src.task_blobs(names) if names else None
    if blobs is None:
        return plans, None
    out = []
    for p in plans:
        if p.name not in names:
            out.append(p)
            continue
        shapes = [blobs.shape(t, p.name) for t in range(src.n_tasks)]
        out.append(TensorPlan(p.name, "read", tuple(max(sizes) for sizes in zip(*shapes)), reader=blobs,
                              task_shapes=shapes))
    return out, blobs


def build_plans(src: ModelSource, factored: bool = False) -> list[TensorPlan]:
    """The plans of `read_plans`, as a list (tests and tools)."""
    return read_plans(src, factored).plans
