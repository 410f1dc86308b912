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
=========  ==========================================  ==================================================

Factored linear layers (``forms``): a delta that is a function of the layer's input and output is applied to the
activations around a constant base weight, so a switch rebinds a few vectors instead of rewriting the weight —
node: ``rows ⊙ (W (cols ⊙ x))``; lowrank: ``r ⊙ (W (s ⊙ x)) + U (Vᵀ x)`` (HALRP's "keep the low-rank branch
unfolded", taken when its k(J+I)+J+I numbers are fewer than the J·I of the folded weight); permute:
``gather(W x (+ b), perm)``. Element-wise LPS masks have no such form: their weights are rewritten on a miss.
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from edgecl.arch import param_shapes
from edgecl.deltas import PackedModel, lps_keep, materialize_param, node_factor, task_permutation
from edgecl.graph.builder import tensor_names
from edgecl.runtime.maskfill import CHUNK, masked_copy

# Layers smaller than this are folded on a switch rather than factored: rewriting 64 K weights costs ~20-40 µs once,
# while each node a factored layer adds costs ~4 µs on every inference (tools/results/bench_switch_trained.json)
FACTOR_MIN_ELEMENTS = 1 << 16


@dataclass
class TensorPlan:
    name: str
    plan: str
    shape: tuple[int, ...]
    base: np.ndarray | None = None
    per_task: list = field(default_factory=list)  # own: arrays; masked: packed bits; permute: indices or None

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
        return self.plan in ("masked", "permute", "generic")

    @property
    def nbytes_per_task(self) -> int:
        return sum(a.nbytes for a in self.per_task if a is not None)

    def fill(self, packed: PackedModel, t: int, out: np.ndarray, pool: Executor | None = None,
             workers: int = 1) -> None:
        """Write task t's values of this tensor into `out` (a float32 buffer of `shape`). With a thread pool, a large
        masked tensor is written in parallel ranges (numpy releases the GIL: 2.9× faster on 4 cores of a Xeon)."""
        if self.plan == "masked":
            base, bits, flat = self.base.reshape(-1), self.per_task[t], out.reshape(-1)
            if pool is None or workers < 2 or not self.splits:
                masked_copy(base, bits, flat)
                return
            step = -(-base.size // (workers * CHUNK)) * CHUNK  # whole chunks: ranges start on byte boundaries
            ranges = [(lo, min(lo + step, base.size)) for lo in range(0, base.size, step)]
            list(pool.map(lambda r: masked_copy(base, bits, flat, *r), ranges))
        elif self.plan == "permute":
            perm = self.per_task[t]
            np.copyto(out, self.base) if perm is None else np.take(self.base, perm, axis=0, out=out)
        else:
            materialize_param(packed, t, self.name, out=out)  # low-rank: written in place, no temporaries


def _float32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def factor_forms(packed: PackedModel) -> dict[str, str]:
    """Linear/conv layer name → how its task delta is applied to activations ("node", "lowrank", "permute", or
    "permute+bias" when the bias is permuted with the output); layers not listed get their weight switched (or are
    constant when shared). Chosen by size: layers of fewer than `FACTOR_MIN_ELEMENTS` weights are folded."""
    forms = {}
    for layer in packed.arch["nodes"]:
        if layer["op"] not in ("linear", "conv"):
            continue
        name = layer["name"]
        spec = packed.params.get(f"{name}.weight", {})
        kind = spec.get("kind")
        if kind in ("node", "lowrank", "permute") and packed.base[f"{name}.weight"].size < FACTOR_MIN_ELEMENTS:
            continue
        if kind == "node":
            forms[name] = kind
        elif kind == "permute":  # the bias is gathered with the output when it shares the weight's permutation
            bias = packed.params.get(f"{name}.bias", {})
            same = bias.get("kind") == "permute" and bias.get("group") == spec.get("group")
            forms[name] = "permute+bias" if same else "permute"
        elif kind == "lowrank" and _lowrank_unfold_smaller(packed, f"{name}.weight"):
            forms[name] = "lowrank"
    return forms


def _lowrank_unfold_smaller(packed: PackedModel, weight: str) -> bool:
    shape = packed.base[weight].shape
    j, i = shape[:2]
    k = max((tt[f"{weight}:u"].shape[-1] for tt in packed.task_tensors if f"{weight}:u" in tt), default=0)
    return max(k, 1) * (j + i) + j + i < int(np.prod(shape))


def _factor_plans(packed: PackedModel, layer: str, form: str) -> list[TensorPlan]:
    """The per-task vectors a factored layer binds (float32; int64 permutations), one array per task. For a
    convolution, channel vectors are shaped (C, 1, 1) to broadcast over NCHW, and the low-rank factors become 1×1
    kernels: V as (k, I, 1, 1), U as (J, k, 1, 1) times the kernel area (the residual, constant over the kernel,
    meets a window *sum* of the input)."""
    weight = f"{layer}.weight"
    spec, w = packed.params[weight], packed.base[weight]
    j, i = w.shape[:2]
    conv = w.ndim == 4
    chan = (1, 1) if conv else ()
    per: dict[str, list[np.ndarray]] = {}

    def add(part: str, array: np.ndarray) -> None:
        per.setdefault(part, []).append(_float32(array))

    for t, tt in enumerate(packed.task_tensors):
        if form == "node":  # the same node vectors `deltas.node_factor` broadcasts over the weight
            if spec.get("rows"):
                add("rows", tt[f"nodes:{spec['rows']}"].reshape((j,) + chan))
            if spec.get("cols"):
                add("cols", np.repeat(tt[f"nodes:{spec['cols']}"], int(spec.get("repeat", 1))).reshape((i,) + chan))
        elif form == "lowrank":
            u, v = tt.get(f"{weight}:u"), tt.get(f"{weight}:v")
            if u is None or v is None or u.shape[-1] == 0:
                u, v = np.zeros((j, 1), np.float32), np.zeros((i, 1), np.float32)
            add("r", np.asarray(tt.get(f"{weight}:r", np.ones(j, np.float32))).reshape((j,) + chan))
            add("s", np.asarray(tt.get(f"{weight}:s", np.ones(i, np.float32))).reshape((i,) + chan))
            if conv:
                add("u", (u * np.float32(w.shape[2] * w.shape[3])).reshape(j, -1, 1, 1))
                add("v", v.T.reshape(-1, i, 1, 1))
            else:
                add("u", u)
                add("v", v)
        else:  # permute
            seed = packed.tasks[t].seed
            perm = np.arange(j) if seed is None else task_permutation(seed, spec["group"], j)
            per.setdefault("perm", []).append(np.ascontiguousarray(perm, dtype=np.int64))
    return [TensorPlan(f"{weight}:{part}", "own", arrays[0].shape, None, arrays) for part, arrays in per.items()]


def graph_factors(packed: PackedModel, plans: list[TensorPlan]) -> dict[str, tuple[str, dict[str, tuple]]]:
    """For `build_onnx(factors=...)`: factored layer → (form, {part: shape of its `LAYER.weight:PART` vectors})."""
    factors = {}
    for layer, form in factor_forms(packed).items():
        prefix = f"{layer}.weight:"
        factors[layer] = (form, {p.name[len(prefix):]: p.shape for p in plans if p.name.startswith(prefix)})
    return factors


def build_plans(packed: PackedModel, factored: bool = False) -> list[TensorPlan]:
    """One plan per graph tensor, in `tensor_names` order (then the factored layers' vectors). `factored=False`
    gives the graph of `build_onnx(weights_as_inputs=True)`: every tensor an input."""
    shapes = param_shapes(packed.arch, 1)
    forms = factor_forms(packed) if factored else {}
    plans, extra = [], []
    for name in tensor_names(packed.arch):
        spec = packed.params[name]
        kind = spec["kind"]
        shape = tuple(packed.base[name].shape) if name in packed.base else shapes[name]
        layer, _, part = name.rpartition(".")
        form = forms.get(layer)
        if form and part == "weight":
            plans.append(TensorPlan(name, "const", shape, _float32(packed.base[name])))
            extra += _factor_plans(packed, layer, form)
        elif form == "permute+bias" and part == "bias":
            plans.append(TensorPlan(name, "const", shape, _float32(packed.base[name])))  # gathered with the output
        elif kind == "shared":
            plans.append(TensorPlan(name, "const" if factored else "static", shape, _float32(packed.base[name])))
        elif kind == "task":
            own = [_float32(tt[name]) for tt in packed.task_tensors]
            plans.append(TensorPlan(name, "own", own[0].shape if own else shape, None, own))
        elif kind in ("lps", "node"):
            base = _float32(packed.base[name])
            bits = [np.packbits(_keep(packed, t, name, spec, base.shape).reshape(-1)) for t in range(packed.n_tasks)]
            plans.append(TensorPlan(name, "masked", shape, base, bits))
        elif kind == "permute":
            perms = [None if info.seed is None else task_permutation(info.seed, spec["group"], shape[0])
                     for info in packed.tasks]
            plans.append(TensorPlan(name, "permute", shape, _float32(packed.base[name]), perms))
        else:
            plans.append(TensorPlan(name, "generic", shape))
    return plans + extra


def _keep(packed: PackedModel, t: int, name: str, spec: dict, shape: tuple[int, ...]) -> np.ndarray:
    if spec["kind"] == "lps":
        return lps_keep(packed, t, name)
    return np.broadcast_to(node_factor(packed, t, spec, shape), shape)
