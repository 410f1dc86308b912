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
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edgecl.graph.builder import INPUT, OUTPUT, build_onnx
from edgecl.runtime import costs
from edgecl.runtime.budget import Ledger
from edgecl.runtime.plan import TensorPlan, read_plans
from edgecl.runtime.providers import empty_ortvalue, session_options, to_ortvalue
from edgecl.runtime.slots import Slot, SlotCache
from edgecl.source import ModelSource

DEFAULT_SLOTS = 4  # slots without a budget: enough for a few alternating tasks, not a copy of every task


@dataclass
class _Buffers:
    """One slot's switched-tensor buffers: host arrays (CPU) and the OrtValues bound once over them."""

    host: dict[str, np.ndarray]
    values: dict[str, ort.OrtValue]


@dataclass
class _Binding:
    """One thread's IOBinding of one slot, and what it holds: a call rebinds only what changed."""

    io: ort.IOBinding
    task: int | None = None
    out: np.ndarray | None = None  # the bound logits buffer (CPU)


class InPlace:
    """Reads what a switch needs from `src` now (task by task) and reserves it; `start` builds the session and the
    slots once the runtime's fixed costs are reserved too."""

    name = "inplace"

    def __init__(self, src: ModelSource, ledger: Ledger, *, device: str, providers: list[str], threads: int | None,
                 factor: bool):
        self.ledger, self.device, self.providers, self.threads = ledger, device, providers, threads
        self.arch = src.arch
        self.n_tasks = src.n_tasks
        self._n_classes = [info.n_classes for info in src.tasks]
        switch = read_plans(src, factored=factor)
        self.plans: list[TensorPlan] = switch.plans
        self.varying = [p for p in self.plans if p.varies]  # the plans a switch writes into a slot
        self._factors = switch.graph_factors()
        self.ledger.reserve("model tensors", costs.held_bytes(
            [p.base for p in self.plans if p.base is not None]
            + [a for p in self.plans if not p.keeps_masks for a in p.task_arrays()]))
        self._mask_bytes = sum(p.mask_bytes for p in self.plans)  # reserved at `start`, after the fixed costs
        self.task_bytes = costs.held_bytes(a for p in self.plans for a in p.task_arrays())
        self.slot_bytes = costs.slot_bytes(p.shape for p in self.varying)
        self.session_params: list[int] = []
        self.cache: SlotCache[_Buffers] | None = None
        self._fill_pool: ThreadPoolExecutor | None = None  # threads for large masked fills
        self._fill_workers = 1
        self._local = threading.local()

    @property
    def n_slots(self) -> int:
        return 0 if self.cache is None else len(self.cache)

    def start(self, cache_tasks: int | None) -> None:
        if self._mask_bytes:
            self.ledger.reserve("task masks", self._mask_bytes)
        constants = {p.name: p.base for p in self.plans if p.constant}
        self.ledger.reserve("session", costs.switchable_session_bytes(constants.values()))
        model = build_onnx(self.arch, weights_as_inputs=True, constants=constants, factors=self._factors,
                           external_constants=True)
        options = session_options(self.threads)
        if constants:
            self._constant_values = [to_ortvalue(a, "cpu") for a in constants.values()]  # must outlive the session
            options.add_external_initializers(list(constants), self._constant_values)
        # GemmTransposeFusion would turn a permuted layer's GEMM + transpose into one GEMM that reads the weight
        # un-packed: 0.9× at batch 64 but 1.5× at batch 1 (tools/bench_switch.py); devices mostly run batch 1
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=self.providers,
                                             disabled_optimizers=["GemmTransposeFusion"])
        self._static = {p.name: to_ortvalue(p.base, self.device) for p in self.plans if p.plan == "static"}
        self._own = [{p.name: to_ortvalue(p.per_task[t], self.device) for p in self.plans if p.plan == "own"}
                     for t in range(self.n_tasks)]
        self._staging = None
        self._staging_lock = threading.Lock()  # one host staging set, shared by fills of different slots
        if self.device == "cuda" and self.varying:
            self.ledger.reserve("host staging buffers", self.slot_bytes)
            self._staging = {p.name: np.empty(p.shape, np.float32) for p in self.varying}
        buffers = []
        for i in range(self._slot_count(cache_tasks)):
            # BudgetError before allocating; each slot also holds its bindings (measured ~25 KB, charged 64 KB)
            self.ledger.reserve(f"cache slot {i}", self.slot_bytes + costs.SLOT_OVERHEAD)
            buffers.append(self._new_buffers())
        self.cache = SlotCache(buffers, self._fill, owner="this TaskRuntime")
        # masked tensors are written by as many threads as ONNX Runtime may use (all cores by default)
        self._fill_workers = self.threads or os.cpu_count() or 1
        if any(p.splits for p in self.varying) and self._fill_workers > 1:
            self._fill_pool = ThreadPoolExecutor(self._fill_workers, "edgecl-fill")

    def _slot_count(self, cache_tasks: int | None) -> int:
        """As asked, else as many as the budget leaves room for (`DEFAULT_SLOTS` without one); one when a switch
        writes nothing."""
        if not self.slot_bytes:
            return 1
        if cache_tasks is None:
            free = None if self.ledger.limit is None else self.ledger.limit - self.ledger.used
            cache_tasks = max(1, DEFAULT_SLOTS if free is None else free // (self.slot_bytes + costs.SLOT_OVERHEAD))
        return min(cache_tasks, self.n_tasks)

    def _new_buffers(self) -> _Buffers:
        if self.device == "cpu":
            host = {p.name: np.zeros(p.shape, np.float32) for p in self.varying}
            return _Buffers(host, {n: to_ortvalue(a, "cpu") for n, a in host.items()})
        return _Buffers({}, {p.name: empty_ortvalue(p.shape, "cuda") for p in self.varying})

    def _fill(self, slot: Slot[_Buffers], t: int) -> None:
        for plan in self.varying:
            if self.device == "cpu":
                plan.fill(t, slot.buffers.host[plan.name], self._fill_pool, self._fill_workers)
            else:
                with self._staging_lock:
                    staging = self._staging[plan.name]
                    plan.fill(t, staging, self._fill_pool, self._fill_workers)
                    slot.buffers.values[plan.name].update_inplace(staging)

    def warm(self, t: int) -> None:
        """Have task t's weights in a slot (a miss fills one)."""
        with self.cache.use(t):
            pass

    def run(self, t: int, x: np.ndarray) -> np.ndarray:
        with self.cache.use(t) as slot:
            binding = self._binding(slot, t)
            binding.io.bind_cpu_input(INPUT, x)
            if self.device != "cpu":
                binding.io.bind_output(OUTPUT, self.device)
                self._session.run_with_iobinding(binding.io)
                return binding.io.copy_outputs_to_cpu()[0]
            # on CPU the logits go into a buffer bound once per (thread, slot, task, batch) and are returned as a
            # copy: 1.6 µs less per call than letting ONNX Runtime allocate them (a small model's inference: ~7 µs)
            if binding.out is None or binding.out.shape[0] != x.shape[0]:
                binding.out = np.empty((x.shape[0], self._n_classes[t]), np.float32)
                binding.io.bind_output(OUTPUT, "cpu", element_type=np.float32, shape=binding.out.shape,
                                       buffer_ptr=binding.out.ctypes.data)
            self._session.run_with_iobinding(binding.io)
            return binding.out.copy()

    def _binding(self, slot: Slot[_Buffers], t: int) -> _Binding:
        """This thread's IOBinding for `slot`: static and slot tensors bound once, task-owned tensors on change."""
        bindings = getattr(self._local, "bindings", None)
        if bindings is None:
            bindings = self._local.bindings = {}
        binding = bindings.get(slot.index)
        if binding is None:
            io = self._session.io_binding()
            for name, value in {**self._static, **slot.buffers.values}.items():
                io.bind_ortvalue_input(name, value)
            binding = bindings[slot.index] = _Binding(io)
        if binding.task != t:
            for name, value in self._own[t].items():
                binding.io.bind_ortvalue_input(name, value)
            binding.task, binding.out = t, None
        return binding

    def cache_info(self) -> dict[str, Any]:
        return self.cache.info()

    def close(self) -> None:
        """Wake waiting callers (they raise) and drop the session, slots and fill threads."""
        if self.cache is not None:
            self.cache.close()
        if self._fill_pool is not None:
            self._fill_pool.shutdown(wait=False)
            self._fill_pool = None
        self._session = None
        self._local = threading.local()
