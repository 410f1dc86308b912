"""Switched convolutions in ONNX Runtime's blocked (NCHWc) layout, written per task, so the in-place runtime's CPU
session runs them as fast as a dense model's.

WHY: ONNX Runtime's CPU EP applies its NCHWc transformer (blocked layout, fused activation/residual sum) and its
Conv+BatchNorm fusion only to convolutions with CONSTANT weights. A switched weight is a graph input, so an LPS
ResNet-18 ran at 2.3-4.2× a dense session (tools/results/bench_switch_resnet18.json). Here ONNX Runtime itself
optimises the switchable graph once, with random placeholder constants in place of the switched convolutions'
weights (and their bias and BatchNorm); every initializer it derives from a placeholder is then reproduced by this
module (`reorder`, `bn_fold`) and accepted only where the reproduction matches ONNX Runtime's bytes, in two runs with
different placeholders. Accepted initializers become graph inputs, written at a switch in the blocked layout with
the task's BatchNorm folded in; the optimised graph then runs with optimisations off.

Where ONNX Runtime's optimised graph cannot be had at all (no usable temporary directory to write it to, ONNX Runtime
raising on the graph), `derive` raises `Unavailable` and the runtime serves the unblocked graph, saying why.

Safety: a derived initializer that changes with the placeholders and that this module cannot reproduce would bake a
placeholder into every task. Its convolution is excluded (its tensors stay graph inputs) and the graph derived
again; where the culprit cannot be named, nothing is blocked (`derive` returns None: today's switchable graph).
The same holds where the transformer does nothing (no convolutions, a CPU without NCHWc kernels).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from edgecl.arch.op_rules import is_standardized
from edgecl.arch.spec import BN_TENSORS
from edgecl.graph.builder import _external, build_onnx
from edgecl.runtime.fold_bn import batchnorm_after, bn_fold, scaled_rows
from edgecl.runtime.plan import TensorPlan
from edgecl.runtime.providers import aligned_zeros

NCHWC = "com.microsoft.nchwc"
LAYOUTS = ("OIHWBiBo", "OIHWBo")  # MLAS filter formats: input channels blocked too, or not (NCHW input, depthwise)
BLOCKS = (8, 16)  # MLAS's NCHWc block: 8 channels on AVX2, 16 on AVX-512; found by matching ONNX Runtime's bytes
SWITCHED = ("masked", "permute", "generic")  # weight plans a switch writes (own/read weights are not blocked)
MIN_EXTERNAL = 256  # float initializers of at least this many elements are supplied from memory, not the proto
RTOL = 1e-6  # reproduced vs ONNX Runtime's derived values (float32 ops in the same order: equal in practice)
# what getting the optimised graph may raise: the temporary file (OSError), ONNX Runtime's own errors, reading it back
OPTIMISE_ERRORS = (OSError, DecodeError, *(v for v in vars(_ort_errors).values()
                                           if isinstance(v, type) and issubclass(v, Exception)))


class Unavailable(Exception):
    """ONNX Runtime's optimised graph could not be obtained: nothing runs blocked (the message says why)."""


def padded_shape(shape: tuple[int, ...], block: int, layout: str) -> tuple[int, ...]:
    """The dims ONNX Runtime gives a reordered filter: output channels (and, OIHWBiBo, input channels) padded."""
    o, i, *k = shape
    up = -(-o // block) * block
    return (up, -(-i // block) * block if layout == "OIHWBiBo" else i, *k)


def reorder(w: np.ndarray, block: int, layout: str) -> np.ndarray:
    """`w` (O, I, kH, kW) in MLAS's blocked order, zero-padded, shaped as `padded_shape`: element
    [o_blk, i_blk, h, w, bi, bo] = W[o_blk·B + bo, i_blk·B + bi, h, w] (OIHWBiBo), [o_blk, i, h, w, bo] (OIHWBo)."""
    o, i, kh, kw = padded_shape(w.shape, block, layout)
    p = np.zeros((o, i, kh, kw), w.dtype)
    p[:w.shape[0], :w.shape[1]] = w
    if layout == "OIHWBiBo":
        blocked = p.reshape(o // block, block, i // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    else:
        blocked = p.reshape(o // block, block, i, kh, kw).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(blocked).reshape(o, i, kh, kw)


def reorder_index(shape: tuple[int, ...], block: int, layout: str) -> np.ndarray:
    """Flat index into a logical weight (followed by one 0) for each blocked element: padding reads the 0."""
    n = int(np.prod(shape))
    index = reorder(np.arange(1, n + 1, dtype=np.int64).reshape(shape), block, layout).reshape(-1) - 1
    index[index < 0] = n
    return index.astype(np.int32) if n < np.iinfo(np.int32).max else index  # half the bytes where it fits


def unblock(buffer: np.ndarray, shape: tuple[int, ...], block: int, layout: str) -> np.ndarray:
    """The logical (O, I, kH, kW) weight a blocked buffer holds (for comparisons with `materialize`)."""
    index = reorder_index(shape, block, layout)
    out = np.empty(int(np.prod(shape)) + 1, buffer.dtype)
    out[index] = buffer.reshape(-1)
    return out[:-1].reshape(shape)


def pad_to(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    out[:a.size] = a.reshape(-1)
    return out


@dataclass
class Candidate:
    """A switched convolution, its bias and the BatchNorm that alone reads it (None: no fold)."""

    conv: str
    shape: tuple[int, ...]
    bias: str | None
    bn: str | None
    eps: float = 1e-5

    @property
    def weight(self) -> str:
        return f"{self.conv}.weight"

    @property
    def tensors(self) -> list[str]:
        bn = [f"{self.bn}.{k}" for k in BN_TENSORS] if self.bn else []
        return [self.weight] + ([self.bias] if self.bias else []) + bn

    def vectors(self, values: dict[str, np.ndarray], fold: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """(bias or None, per-output-channel scale) with the BatchNorm folded in when `fold`."""
        b = np.asarray(values[self.bias], np.float32).reshape(-1) if self.bias else None
        if not fold:
            return b, np.ones(self.shape[0], np.float32)
        scale, fused = bn_fold(*(np.asarray(values[f"{self.bn}.{k}"]).reshape(-1) for k in BN_TENSORS), self.eps, b)
        return fused, scale

    def folded(self, values: dict[str, np.ndarray], fold: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(weight, bias or None, per-output-channel scale) with the BatchNorm folded in when `fold`."""
        b, scale = self.vectors(values, fold)
        w = values[self.weight]
        return (scaled_rows(w, scale) if fold else w), b, scale


@dataclass
class BlockedConv:
    """An accepted convolution: how its weight input `w_input` (and bias input `b_input`) are laid out."""

    cand: Candidate
    layout: str
    block: int
    fold: bool
    w_input: str
    b_input: str | None
    shape: tuple[int, ...]  # padded dims of the blocked weight


@dataclass
class Blocked:
    """The derived graph (initializers of at least `MIN_EXTERNAL` floats declared external: `constants`) and the
    plans that replace the switched convolutions' (`plans`)."""

    model: onnx.ModelProto
    constants: dict[str, np.ndarray]
    convs: dict[str, BlockedConv]
    plans: list[TensorPlan] = field(default_factory=list)


def find_candidates(arch: dict, plans: dict[str, TensorPlan]) -> list[Candidate]:
    """Convolutions whose weight a switch writes, with their bias and a BatchNorm that is their only reader."""
    bn_of = batchnorm_after(arch)
    out = []
    for node in arch["nodes"]:
        plan = plans.get(f"{node['name']}.weight")
        if node["op"] != "conv" or node.get("window") or is_standardized(node) or plan is None \
                or plan.plan not in SWITCHED:
            continue
        bias = f"{node['name']}.bias" if node["bias"] and f"{node['name']}.bias" in plans else None
        bn = bn_of.get(node["name"])
        bn_ok = bn is not None and all(f"{bn['name']}.{k}" in plans for k in BN_TENSORS)
        out.append(Candidate(node["name"], tuple(plan.shape), bias, bn["name"] if bn_ok else None,
                             bn["eps"] if bn_ok else 1e-5))
    return out


def _placeholders(cands: list[Candidate], plans: dict[str, TensorPlan], seed: int) -> dict[str, np.ndarray]:
    """Random, distinct values for every candidate tensor (variances positive), never a task's."""
    rng = np.random.default_rng(seed)
    values = {}
    for c in cands:
        for name in c.tensors:
            a = rng.uniform(0.5, 1.5, plans[name].shape) * rng.choice([-1.0, 1.0], plans[name].shape)
            values[name] = np.abs(a).astype(np.float32) if name.endswith("running_var") else a.astype(np.float32)
    return values


def _optimise(arch: dict, constants: dict[str, np.ndarray], factors: dict, disabled: list[str]) -> onnx.ModelProto:
    """The switchable graph with `constants` as initializers, optimised by ONNX Runtime (ORT_ENABLE_ALL, CPU EP);
    `Unavailable` where ONNX Runtime or the temporary file it is written to fails."""
    model = build_onnx(arch, weights_as_inputs=True, constants=constants, factors=factors, external_constants=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # not the warning that an NCHWc model is machine-specific: it is used right here
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32)) for a in constants.values()]
    if constants:
        options.add_external_initializers(list(constants), values)
    path = None
    try:
        handle, path = tempfile.mkstemp(suffix=".onnx", prefix="edgecl-nchwc-")
        os.close(handle)
        options.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        return onnx.load(path)
    except OPTIMISE_ERRORS as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=RTOL, atol=0))


def _match(node: onnx.NodeProto, cands: list[Candidate], runs: list[tuple[dict, dict]]) -> BlockedConv | None:
    """The candidate whose weight (and bias), folded or not, reordered in some layout and block, is what ONNX
    Runtime put in `node` in every run (placeholders, initializers)."""
    w_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    first_values, first_inits = runs[0]
    w = first_inits.get(w_name)
    if w is None or w.ndim != 4:
        return None
    for c in cands:
        for fold in ((True, False) if c.bn else (False,)):
            wl, bl, _ = c.folded(first_values, fold)
            if wl.shape[2:] != w.shape[2:] or not np.isclose(wl.flat[0], w.flat[0], rtol=RTOL, atol=0):
                continue  # element [0, 0, 0, 0] is first in every layout
            for layout in LAYOUTS:
                for block in BLOCKS:
                    if padded_shape(wl.shape, block, layout) == w.shape and \
                            all(_reproduces(c, fold, layout, block, w_name, b_name, v, i) for v, i in runs):
                        return BlockedConv(c, layout, block, fold, w_name, b_name if bl is not None else None,
                                           w.shape)
    return None


def _reproduces(c: Candidate, fold: bool, layout: str, block: int, w_name: str, b_name: str | None,
                values: dict, inits: dict) -> bool:
    w, b, _ = c.folded(values, fold)
    if not _close(reorder(w, block, layout), inits.get(w_name, np.empty(0))):
        return False
    if b is None:  # no bias of ours: ONNX Runtime may only have added a constant one
        return b_name is None or b_name in inits
    padded = pad_to(b, padded_shape(w.shape, block, layout)[0])
    return b_name is not None and _close(padded, inits.get(b_name, np.empty(0)))


def derive(arch: dict, plans: list[TensorPlan], factors: dict, *, candidates: list[Candidate] | None = None,
           unread: frozenset[str] | set[str] = frozenset(),
           disabled: tuple[str, ...] = ("GemmTransposeFusion",)) -> Blocked | None:
    """The blocked graph of `arch` and which convolutions run blocked, or None where none can (see the module
    docstring for the safety rule); `Unavailable` where ONNX Runtime's optimised graph cannot be had. `candidates`
    overrides `find_candidates` (tests).

    Memory: one optimised model is held at a time, and its initializers are read as arrays one by one (the first
    run is remembered by digests), so start-up's peak stays near ONNX Runtime's own optimisation of one copy."""
    by_name = {p.name: p for p in plans}
    cands = find_candidates(arch, by_name) if candidates is None else list(candidates)
    constants = {p.name: p.base for p in plans if p.constant and p.name not in unread}
    while cands:
        values = _placeholders(cands, by_name, 1)
        model = _optimise(arch, {**constants, **values}, factors, list(disabled))
        inits = _Inits(model)
        found: dict[str, BlockedConv] = {}
        for node in model.graph.node:
            if node.domain == NCHWC and node.op_type == "Conv":
                match = _match(node, [c for c in cands if c.conv not in found], [(values, inits)])
                if match is not None:
                    found[match.cand.conv] = match
        first = inits.digests()
        del model, inits, values  # before the second run: one optimised model at a time
        values = _placeholders(cands, by_name, 2)
        model = _optimise(arch, {**constants, **values}, factors, list(disabled))
        inits = _Inits(model)
        accepted = {conv: b for conv, b in found.items()
                    if _reproduces(b.cand, b.fold, b.layout, b.block, b.w_input, b.b_input, values, inits)}
        explained = {n for b in accepted.values() for n in (b.w_input, b.b_input) if n}
        second = inits.digests()
        varying = {n for n, d in first.items() if second.get(n) != d} - explained
        owner = {t: c.conv for c in cands for t in c.tensors}
        used = {i for node in model.graph.node for i in node.input}
        dirty = {owner[n] for n in (varying | used) if n in owner}  # a placeholder still read as itself
        for name in varying - set(owner):  # derived from a placeholder, and not reproduced
            culprit = _culprit(name, inits, model, cands, values, accepted)
            if culprit is None:
                return None  # by no convolution we can name: block nothing
            dirty.add(culprit)
        clean = [c for c in cands if c.conv in accepted and c.conv not in dirty
                 and (accepted[c.conv].fold or c.bn is None)]
        if len(clean) == len(cands):
            return _finish(model, {c.conv: accepted[c.conv] for c in clean})
        cands = clean
    return None


class _Inits:
    """An optimised model's initializers by name, each read as an array only when asked (not cached: the model's
    proto holds the bytes once; a dict of arrays of every initializer doubled start-up's memory per run)."""

    def __init__(self, model: onnx.ModelProto):
        self._protos = {i.name: i for i in model.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self._protos

    def get(self, name: str, default: np.ndarray | None = None) -> np.ndarray | None:
        proto = self._protos.get(name)
        return default if proto is None else numpy_helper.to_array(proto)

    def digests(self) -> dict[str, bytes]:
        """Name → a digest of the initializer's dims, type and bytes: what two runs compare."""
        return {name: hashlib.blake2b(p.SerializeToString(), digest_size=16).digest()
                for name, p in self._protos.items()}


def _culprit(name: str, inits: "_Inits", model: onnx.ModelProto, cands: list[Candidate],
             values: dict[str, np.ndarray], accepted: dict[str, BlockedConv]) -> str | None:
    """The candidate a derived initializer `name` we could not reproduce was made from, or None: recognised by its
    first element (its weight or bias, BatchNorm folded or not, or the BatchNorm's scale: placeholders are distinct
    random values); else as a candidate's weight times a constant per output channel (a Mul ONNX Runtime folded in:
    MetaFormer's layer scale); else as the bias of a conv whose weight is recognised. A wrong name costs speed only:
    the graph is derived again without that conv, and the real culprit found again."""
    value = inits.get(name, np.empty(0))
    if value.size == 0:
        return None
    for c in cands:
        for fold in ((True, False) if c.bn else (False,)):
            w, b, scale = c.folded(values, fold)
            if any(a is not None and np.isclose(a.flat[0], value.flat[0], rtol=RTOL, atol=0)
                   for a in (w, b, scale if fold else None)) or _scaled_copy(value, w):
                return c.conv
    by_input = {b.w_input: conv for conv, b in accepted.items()}
    for node in model.graph.node:  # a bias: the conv reading it as such, known by its weight
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] == name:
            if node.input[1] in by_input:
                return by_input[node.input[1]]
            weight = inits.get(node.input[1], np.empty(0))
            return next((c.conv for c in cands for fold in ((True, False) if c.bn else (False,))
                         if _scaled_copy(weight, c.folded(values, fold)[0])), None)
    return None


def _scaled_copy(value: np.ndarray, w: np.ndarray) -> bool:
    """Whether `value` is `w` (O, I, kH, kW), as it is or in a blocked order, times one factor per output channel
    (two or more elements of every channel agreeing on it: random placeholders agree by no chance)."""
    if value.ndim != 4 or w.shape[1] * w.shape[2] * w.shape[3] < 2:
        return False
    forms = [(w, 1)] + [(reorder(w, block, layout), block) for layout in LAYOUTS for block in BLOCKS]
    for x, block in forms:
        if x.shape != value.shape:
            continue
        ref, got, i = x.reshape(-1), value.reshape(-1), np.arange(x.size)
        inner = x.size // (x.shape[0] // block)
        channel = (i // inner) * block + i % block
        live = ref != 0  # placeholders are never 0; padding is
        if got[~live].any():
            continue
        ratio = np.zeros(x.shape[0], np.float64)
        ratio[channel[live]] = got[live] / ref[live]
        if np.allclose(got[live] / ref[live], ratio[channel[live]], rtol=1e-5, atol=0):
            return True
    return False


def _finish(model: onnx.ModelProto, accepted: dict[str, BlockedConv]) -> Blocked:
    """Accepted weights and biases become graph inputs; other large float initializers are declared external."""
    inputs = {n for b in accepted.values() for n in (b.w_input, b.b_input) if n}
    graph = model.graph
    kept, constants = [], {}
    for init in graph.initializer:
        if init.name in inputs:
            graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, list(init.dims)))
            continue
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= MIN_EXTERNAL:
            # 64-byte aligned: an NCHWc filter here is read in place by MLAS (no pre-packing with optimisation off)
            value = numpy_helper.to_array(init)
            constants[init.name] = aligned_zeros(value.shape)
            constants[init.name][...] = value
            kept.append(_external(init.name, constants[init.name]))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # parsed anew: the loaded model's protobuf arena still holds every initializer's bytes (~ the weights' size)
    return Blocked(onnx.load_from_string(model.SerializeToString()), constants, accepted)


def session_level() -> Any:
    """The derived graph is optimised already: a second pass must not re-fuse what is now an input."""
    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL
