"""The ``inplace`` strategy: one ONNX Runtime session of the switchable graph serves every task.

Shared weights and the base weights of factored layers are constants (pre-packed by ONNX Runtime like a dense
model's); node masks, low-rank factors and permutations of those layers are applied to the activations, so a switch
rebinds a few per-task vectors (`edgecl.runtime.plan`). Weights with no such form (LPS masks, small layers) are graph
inputs: a task's weights are written into pre-allocated buffers bound through IOBinding, and K buffer sets — the
slots of a `SlotCache` — keep the K most recently used tasks, so a cache hit costs no copy at all. Memory: what a
switch reads (bases, 1-bit keep masks, per-task vectors and heads) + ~1× the constant weights inside ONNX Runtime
+ K × the switched tensors.

Each thread keeps its own IOBinding per slot (bindings are not thread-safe); the slot cache's lock is never held
while weights are written or the model runs.

Where the slots live is a store's job: `_HostStore` (CPU: host buffers, the compiled masked fill) or
`edgecl.runtime.device_store.DeviceStore` (``resident="device"``: task deltas and slots in device memory, written on
the device — on "cuda" with CuPy, on "cpu" with its numpy twin, which is how CI tests the device path).
"""
from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from edgecl.graph.builder import INPUT, OUTPUT, build_onnx
from edgecl.runtime import blocked_convs, costs
from edgecl.runtime.blocked_plans import BlockedPlan, blocked_plans
from edgecl.runtime.budget import Ledger, format_bytes
from edgecl.runtime.device_store import DeviceStore
from edgecl.runtime.fold_bn import FoldedBN
from edgecl.errors import BudgetError, EdgeclWarning, UsageError
from edgecl.runtime.plan import TensorPlan, read_on_miss, read_plans, task_tensor_plans
from edgecl.runtime.providers import aligned_zeros, require_placement, session_options, session_providers, to_ortvalue
from edgecl.runtime.slots import Slot, SlotCache
from edgecl.runtime.switch_standardize import SwitchStandardized, gain_value
from edgecl.source import IN_MEMORY, ModelSource

DEFAULT_SLOTS = 4  # slots without a budget: enough for a few alternating tasks, not a copy of every task
DERIVING = "start-up: deriving the blocked layout"  # a ledger item held only while `blocked_convs.derive` runs


@dataclass
class _Buffers:
    """One slot's switched-tensor buffers on the host and the OrtValues bound once over them."""

    host: dict[str, np.ndarray]
    values: dict[str, ort.OrtValue]  # bound once per slot
    # task tensors read on a miss, bound in their task's shape (heads differ in rows); one OrtValue per shape seen
    task_values: dict[str, ort.OrtValue] = field(default_factory=dict)
    views: dict[tuple[str, tuple[int, ...]], ort.OrtValue] = field(default_factory=dict)


@dataclass
class _Binding:
    """One thread's IOBinding of one slot, and what it holds: a call rebinds only what changed."""

    io: ort.IOBinding
    task: int | None = None
    out: np.ndarray | None = None  # the bound logits buffer (host store)


class _HostStore:
    """Slots in host memory, written by `TensorPlan.fill` (the compiled masked fill, large tensors split among
    threads); static and per-task tensors are bound as OrtValues over the plans' own arrays."""

    arrays = None  # results are host arrays

    def __init__(self, plans: list[TensorPlan], varying: list[TensorPlan], n_tasks: int, ledger: Ledger,
                 threads: int | None, std: SwitchStandardized):
        self.varying, self.ledger, self._std = varying, ledger, std
        self._by_name = {p.name: p for p in plans}
        self._read = [p for p in varying if p.plan == "read" and p.name not in std.unread]  # read on a miss
        self.slot_bytes = costs.slot_bytes(p.shape for p in varying)
        self.task_bytes = costs.held_bytes(a for p in plans for a in p.task_arrays())
        bound = [p for p in plans if p.name not in std.unread]  # a gain standardised here is not the graph's
        self._static = {p.name: to_ortvalue(p.base) for p in bound if p.plan == "static"}
        self._own = [{p.name: to_ortvalue(p.per_task[t]) for p in bound if p.plan == "own"}
                     for t in range(n_tasks)]
        # masked tensors are written by as many threads as ONNX Runtime may use (all cores by default)
        self._workers = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self._workers, "edgecl-fill") \
            if any(p.splits for p in varying) and self._workers > 1 else None

    def new_slot(self, index: int) -> _Buffers:
        host = {p.name: aligned_zeros(p.shape) for p in self.varying}
        return _Buffers(host, {p.name: to_ortvalue(host[p.name]) for p in self.varying
                               if p.plan != "read" and p.name not in self._std.unread})

    def fill(self, buffers: _Buffers, t: int) -> None:
        for plan in self.varying:
            plan.fill(t, buffers.host[plan.name], self._pool, self._workers)
        self._std.after_fill(buffers.host, lambda gain: gain_value(self._by_name[gain], t, buffers.host))
        values = {}
        for plan in self._read:
            key = (plan.name, tuple(plan.task_shapes[t]))
            if key not in buffers.views:  # a view of the slot's buffer in this shape, made once
                buffers.views[key] = to_ortvalue(plan.task_view(buffers.host[plan.name], t))
            values[plan.name] = buffers.views[key]
        buffers.task_values = values

    def bind_slot(self, io: ort.IOBinding, buffers: _Buffers) -> None:
        for name, value in {**self._static, **buffers.values}.items():
            io.bind_ortvalue_input(name, value)

    def bind_task(self, io: ort.IOBinding, buffers: _Buffers, t: int) -> None:
        for name, value in {**self._own[t], **buffers.task_values}.items():
            io.bind_ortvalue_input(name, value)

    def run(self, session: ort.InferenceSession, binding: _Binding, x: np.ndarray, n_classes: int) -> np.ndarray:
        binding.io.bind_cpu_input(INPUT, x)
        # the logits go into a buffer bound once per (thread, slot, task, batch) and are returned as a copy: 1.6 µs
        # less per call than letting ONNX Runtime allocate them (a small model's inference: ~7 µs)
        if binding.out is None or binding.out.shape[0] != x.shape[0]:
            binding.out = np.empty((x.shape[0], n_classes), np.float32)
            binding.io.bind_output(OUTPUT, "cpu", element_type=np.float32, shape=binding.out.shape,
                                   buffer_ptr=binding.out.ctypes.data)
        session.run_with_iobinding(binding.io)
        return binding.out.copy()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class InPlace:
    """Reads what a switch needs from `src` now (task by task) and reserves it; `start` builds the session and the
    slots once the runtime's fixed costs are reserved too."""

    name = "inplace"

    def __init__(self, src: ModelSource, ledger: Ledger, *, device: str, providers: list[str], threads: int | None,
                 factor: bool, resident: str = "host", device_ledger: Ledger | None = None, cuda_graph: bool = False,
                 activation_bytes: Any = None, task_tensors: str = "auto", blocked: bool = True):
        self.ledger, self.device, self.providers, self.threads = ledger, device, providers, threads
        self.cuda_graph = cuda_graph
        self.arch = src.arch
        self.n_tasks = src.n_tasks
        self._n_classes = [info.n_classes for info in src.tasks]
        switch = read_plans(src, factored=factor)
        self.plans: list[TensorPlan] = switch.plans
        self._blobs = None  # where task tensors are read from on a miss (`task_tensors`)
        if _reads_on_miss(task_tensors, resident, self.plans, src):
            self.plans, self._blobs = read_on_miss(self.plans, src)
        self.task_tensors = "cached" if self._blobs is not None else "resident"  # what "auto" became
        # standardised convs standardised on a switch (`switch_standardize`, on the device `device_standardize`)
        self.std = SwitchStandardized(self.arch, self.plans)
        self.folded_bn = FoldedBN(self.std.arch, [], self.n_tasks)  # the host path folds none (yet)
        self._factors = switch.graph_factors()
        # on the CPU EP, switched convs in ONNX Runtime's blocked layout with BatchNorm folded (`blocked_convs`)
        self._blocked, self.blocked_fallback = None, None  # why nothing runs blocked where it was tried and failed
        if blocked and resident == "host" and device == "cpu" and providers == ["CPUExecutionProvider"]:
            self._blocked = self._derive_blocked()
            if self._blocked is not None:
                self.plans = blocked_plans(self._blocked, self.plans, self.n_tasks, keep=self.std.unread)
        self.varying = [p for p in self.plans if p.varies]  # the plans a switch writes into a slot
        self.ledger.reserve("model tensors", _model_tensor_bytes(self.plans))
        self.session_params: list[int] = []
        self._constant_values: list[Any] | None = None
        self.cache: SlotCache | None = None
        self._local = threading.local()
        if resident == "host":
            self._mask_bytes = sum(p.mask_bytes for p in self.plans)  # reserved at `start`, after the fixed costs
            self._store: Any = _HostStore(self.plans, self.varying, self.n_tasks, ledger, threads, self.std)
            self._slot_ledger, self._slot_extra = ledger, costs.SLOT_OVERHEAD
        else:  # every task's delta goes to the device now; the host keeps only the session's constants
            self._mask_bytes = 0
            # a BatchNorm after a conv the switch writes is folded into it there (`fold_bn`)
            self.folded_bn = FoldedBN(self.std.arch, self.plans, self.n_tasks, skip=set(self.std.convs))
            self.plans = self.folded_bn.plans
            self._store = DeviceStore(self.plans, device, device_ledger, self.n_tasks, cuda_graph, activation_bytes,
                                      self.std)
            self.plans = [p if p.constant else TensorPlan(p.name, p.plan, p.shape) for p in self.plans]
            self.varying = [p for p in self.plans if p.varies]
            self.ledger.release("model tensors")
            self.ledger.reserve("model tensors", costs.held_bytes(p.base for p in self.plans if p.constant))
            self._slot_ledger, self._slot_extra = device_ledger, 0
        self.arrays = self._store.arrays  # None: results are host arrays
        self.slot_bytes = self._store.slot_bytes
        self.task_bytes = self._store.task_bytes

    def _derive_blocked(self) -> blocked_convs.Blocked | None:
        """`blocked_convs.derive`, charged while it runs (`costs.BLOCKED_DERIVE_FACTOR` × the graph's weights, beside
        the model's tensors read so far); None, the reason in `blocked_fallback`, where it is unavailable or the
        budget leaves no room for that moment: the unblocked graph is as correct, only slower."""
        cands = blocked_convs.find_candidates(self.arch, {p.name: p for p in self.plans})
        transient = costs.BLOCKED_DERIVE_FACTOR * 4 * sum(int(np.prod(p.shape)) for p in self.plans)
        try:
            self.ledger.reserve(DERIVING, transient + _model_tensor_bytes(self.plans))
        except BudgetError:
            self.blocked_fallback = (f"the budget leaves no room for deriving it ({format_bytes(transient)} for a "
                                     "moment at start-up); switched convs run unblocked (slower)")
            return None
        try:
            derived = blocked_convs.derive(self.std.arch, self.plans, self._factors, candidates=cands,
                                           unread=self.std.unread)
        except blocked_convs.Unavailable as exc:
            self.blocked_fallback = str(exc)
            warnings.warn(f"blocked layout unavailable, switched convs run unblocked (slower): {exc}",
                          EdgeclWarning, stacklevel=3)
            return None
        finally:
            self.ledger.release(DERIVING)
        if derived is not None:  # what the process keeps of the derivation (`costs.BLOCKED_FIXED`)
            self.ledger.reserve("blocked layout (what deriving it leaves)", costs.BLOCKED_FIXED)
        return derived

    @property
    def blocked_convs(self) -> list[str]:
        """The convolutions whose weights a switch writes in ONNX Runtime's blocked layout (`blocked_convs`)."""
        return [p.conv for p in self.plans if isinstance(p, BlockedPlan)]

    @property
    def n_slots(self) -> int:
        return 0 if self.cache is None else len(self.cache)

    def start(self, cache_tasks: int | None) -> None:
        if self._mask_bytes:
            self.ledger.reserve("task masks", self._mask_bytes)
        constants = self._constants()
        self.ledger.reserve("session", costs.switchable_session_bytes(constants.values(), self.arch, self._factors))
        if self.device == "cuda":  # the CUDA EP copies the constants to the device, and has its fixed cost
            self._slot_ledger.reserve("device session constants", costs.held_bytes(constants.values()))
            self._slot_ledger.reserve("device CUDA EP session", costs.CUDA_SESSION_FIXED)
        self._session = self.new_session()
        require_placement(self._session, self.device)
        buffers = []
        for i in range(self._slot_count(cache_tasks)):
            # BudgetError before allocating; each slot also holds its bindings (measured ~25 KB, charged 64 KB)
            host_bytes = self.slot_bytes if self._slot_ledger is self.ledger else 0  # device slots: their ledger
            self.ledger.reserve(f"cache slot {i}", host_bytes + costs.SLOT_OVERHEAD)
            buffers.append(self._store.new_slot(i))
        self.cache = SlotCache(buffers, lambda slot, t: self._store.fill(slot.buffers, t), owner="this TaskRuntime")

    def _constants(self) -> dict[str, np.ndarray]:
        return {p.name: p.base for p in self.plans if p.constant and p.name not in self.std.unread}

    def new_session(self, profile_prefix: str | None = None) -> ort.InferenceSession:
        """The session every task runs (`start`); `profile_prefix` turns on ONNX Runtime's profiler for the same
        graph and options, so `tools/profile_inplace.py` times exactly what `infer` runs."""
        constants = self._constants()
        options = session_options(self.threads)
        if profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        if self._blocked is not None:  # optimised already; its external constants are the const plans' arrays
            model = self._blocked.model
            options.graph_optimization_level = blocked_convs.session_level()
        else:
            model = build_onnx(self.folded_bn.arch, weights_as_inputs=True, constants=constants,
                               factors=self._factors, external_constants=True)
        self.graph_ops = frozenset(n.op_type for n in model.graph.node)  # what each call computes, for tests
        if constants:
            if self._constant_values is None:  # must outlive every session made here: made once
                self._constant_values = [to_ortvalue(a) for a in constants.values()]
            options.add_external_initializers(list(constants), self._constant_values)
        # GemmTransposeFusion would turn a permuted layer's GEMM + transpose into one GEMM that reads the weight
        # un-packed: 0.9× at batch 64 but 1.5× at batch 1 (tools/bench_switch.py); devices mostly run batch 1
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=session_providers(self.providers, self.cuda_graph),
                                    disabled_optimizers=["GemmTransposeFusion"])

    def _slot_count(self, cache_tasks: int | None) -> int:
        """As asked, else as many as the budget (the device's for device slots) leaves room for (`DEFAULT_SLOTS`
        without one); one when a switch writes nothing."""
        if not self.slot_bytes:
            return 1
        if cache_tasks is None:
            ledger, per_slot = self._slot_ledger, self.slot_bytes + self._slot_extra
            free = None if ledger.limit is None else ledger.limit - ledger.used
            cache_tasks = max(1, DEFAULT_SLOTS if free is None else free // per_slot)
        return min(cache_tasks, self.n_tasks)

    def warm(self, t: int) -> None:
        """Have task t's weights in a slot (a miss fills one)."""
        with self.cache.use(t):
            pass

    def run(self, t: int, x: Any) -> Any:
        """Logits of task t: a host array, or with a device store a device array."""
        with self.cache.use(t) as slot:
            session = self._session  # read once: `close` may drop it while this call holds its slot
            if session is None:
                raise UsageError("this TaskRuntime is closed")
            if self.cuda_graph:
                return self._store.run_graph(session, slot.buffers, slot.index, t, x, self._n_classes[t])
            return self._store.run(session, self._binding(session, slot, t), x, self._n_classes[t])

    def as_bound(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A task's `materialize` as the session reads it: standardised convs standardised, BatchNorms folded."""
        return self.folded_bn.fold(self.std.fold(params))

    def bound_tensors(self, t: int) -> dict[str, np.ndarray]:
        """Host copies of every tensor the session reads for task t on the device path (filling a slot on a miss):
        what `tools/gpu_check.py` compares with `materialize` bit for bit."""
        with self.cache.use(t) as slot:
            return {name: self.arrays.to_host(a) for name, a in self._store.tensors(slot.buffers, t).items()}

    def _binding(self, session: ort.InferenceSession, slot: Slot, t: int) -> _Binding:
        """This thread's IOBinding of `session` for `slot`: static and slot tensors bound once, task-owned tensors
        on change."""
        bindings = getattr(self._local, "bindings", None)
        if bindings is None:
            bindings = self._local.bindings = {}
        binding = bindings.get(slot.index)
        if binding is None:
            io = session.io_binding()
            self._store.bind_slot(io, slot.buffers)
            binding = bindings[slot.index] = _Binding(io)
        if binding.task != t:
            self._store.bind_task(binding.io, slot.buffers, t)
            binding.task, binding.out = t, None
        return binding

    def cache_info(self) -> dict[str, Any]:
        return self.cache.info()

    def close(self) -> None:
        """Wake waiting callers (they raise) and drop the session, slots and fill threads."""
        if self.cache is not None:
            self.cache.close()
        self._store.close()
        if self._blobs is not None:
            self._blobs.close()
        self._session = None
        self._local = threading.local()


CACHED_TASK_TENSORS_SHARE = 0.10  # "auto" caches task tensors once all tasks' would be this share of the model


def _model_tensor_bytes(plans: list[TensorPlan]) -> int:
    """What the plans hold of the model beside keep masks and permutations: bases and per-task arrays, each once."""
    return costs.held_bytes([p.base for p in plans if p.base is not None]
                            + [a for p in plans if not p.keeps_masks for a in p.task_arrays()])


def may_read_on_miss(task_tensors: str, resident: str, origin: str) -> bool:
    """Whether task tensors can be read on a miss at all: not kept resident by choice, on the host path, from a
    file (the memory floor counts one task's of them where this holds)."""
    return task_tensors != "resident" and resident == "host" and origin != IN_MEMORY


def _reads_on_miss(task_tensors: str, resident: str, plans: list[TensorPlan], src: ModelSource) -> bool:
    """Whether task tensors (heads, …) live in the cache slots, read from the artifact on a miss, rather than for
    every task. "auto": yes for a file on the host path whose switches already write weights on a miss, where every
    task's task tensors would be at least `CACHED_TASK_TENSORS_SHARE` of the resident model: reading a head costs
    ~30 µs (BLAKE2b, zstd; the demo's LPS miss goes from 0.03 to 0.09 ms), worth it where heads are a large part of
    the memory (a third of the 40-task demo model's), not where they are 2 % of it (a 4 M MLP). A model whose switches
    only rebind per-task vectors keeps them all, so its switch stays a rebind. The device path keeps every task's
    delta on the device."""
    if task_tensors == "cached" and resident == "host" and src.origin == IN_MEMORY:
        raise UsageError("task_tensors='cached' reads task tensors from the artifact file on a cache miss: give "
                         "the runtime an artifact path (or an opened Artifact), not an in-memory model")
    if not may_read_on_miss(task_tensors, resident, src.origin):
        return False
    if task_tensors == "cached":
        return True
    if not any(p.varies for p in plans):
        return False
    task = [a for p in task_tensor_plans(plans, src) for a in p.task_arrays()]
    resident_model = _model_tensor_bytes(plans) + sum(p.mask_bytes for p in plans)
    return costs.held_bytes(task) >= CACHED_TASK_TENSORS_SHARE * resident_model
