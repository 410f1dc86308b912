"""`TaskRuntime`: run any task of a continually learned model, switching tasks without re-creating a session.

This is the facade: it opens the model (`edgecl.source.open_model`, lazily), keeps the budget ledger, checks inputs
and task names, and hands each call to one strategy, chosen once at start-up by measurement (tools/bench_switch.py)
and the budget:

- ``inplace`` (`edgecl.runtime.inplace`) — one session of the switchable graph; a switch rebinds per-task vectors or
  writes a task's weights into one of K cached slots (`edgecl.runtime.slots`).
- ``sessions`` (`edgecl.runtime.per_task`) — one folded session per task. ``auto`` takes it when a budget is given
  and every task's session fits in it, else ``inplace``.

Devices: on ``device="cuda"`` the in-place strategy keeps the switched base tensors and every task's delta in GPU
memory and switches there (`edgecl.runtime.device_store`; CuPy); device bytes are charged to a second ledger,
``device_budget``, apart from host RAM (``budget``). ``resident="device"`` on "cpu" runs that same device path with
numpy standing in for the GPU — what CI tests it with.

Threading: ``infer`` may be called from any number of threads (tests/test_concurrency.py: 8 threads × 1,000 calls);
the slot cache's rules say why nothing deadlocks. ``switch`` sets the runtime's default task (shared by all threads)
and warms its slot; concurrent callers should pass ``task=``. What each part costs is `edgecl.runtime.costs`.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Protocol

import numpy as np

from edgecl.deltas import resolve_task
from edgecl.errors import BudgetError, UsageError
from edgecl.runtime import costs, maskfill
from edgecl.runtime.budget import Ledger, format_bytes, parse_budget
from edgecl.runtime.device_arrays import host_value
from edgecl.runtime.inplace import InPlace, may_read_on_miss
from edgecl.runtime.inputs import check_device_input, check_device_output, check_input, check_output
from edgecl.runtime.per_task import PerTaskSessions
from edgecl.runtime.process_memory import process_rss, return_free_heap
from edgecl.runtime.providers import resolve_providers, session_options
from edgecl.source import open_model

STRATEGIES = ("auto", "inplace", "sessions")
TASK_TENSORS = ("auto", "resident", "cached")
RESIDENCES = ("host", "device")
DEFAULT_BATCH = 64


class Strategy(Protocol):
    """How tasks are served. Built from the model (reserving what it keeps of it), then `start`ed once the
    runtime's fixed costs are reserved too."""

    name: str
    n_slots: int
    slot_bytes: int  # bytes of one cache slot (0: a switch writes nothing)
    task_bytes: int  # bytes held that grow with the task count (per-task arrays, or per-task sessions)
    session_params: list[int]
    plans: list
    varying: list

    def start(self, cache_tasks: int | None) -> None: ...

    def warm(self, t: int) -> None: ...

    def run(self, t: int, x: np.ndarray) -> np.ndarray: ...

    def cache_info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    arrays: Any  # the device path's arrays (`device_arrays`), or None when results are host arrays


_STRATEGY_TYPES = {"inplace": InPlace, "sessions": PerTaskSessions}


class TaskRuntime:
    """Torch-free multi-task inference. ``switch(task)`` then ``infer(x)``, or ``infer(x, task=...)`` directly.

    ``task_tensors``: "cached" keeps heads and other per-task tensors only in the cache slots, read from the artifact
    file on a miss; "resident" keeps every task's; "auto" caches them for a file whose switches write weights anyway
    and where they would be a large share of the model (docs/RUNTIME.md, "What stays resident of the model").
    ``blocked_convs`` (in place on the CPU EP): switched convolutions are written in ONNX Runtime's blocked NCHWc
    layout with their BatchNorm folded, so they run at a dense model's speed (`edgecl.runtime.blocked_convs`); False
    keeps them plain graph inputs (to compare)."""

    def __init__(self, artifact: Any, backend: str = "auto", device: str = "cpu", budget: int | str | None = None,
                 *, strategy: str = "auto", cache_tasks: int | None = None, threads: int | None = None,
                 max_batch: int = DEFAULT_BATCH, charge_environment: bool | None = None, factor: bool = True,
                 device_budget: int | str | None = None, resident: str | None = None, cuda_graph: bool = False,
                 task_tensors: str = "auto", blocked_convs: bool = True):
        if strategy not in STRATEGIES:
            raise UsageError(f"strategy {strategy!r} unknown (known: {', '.join(STRATEGIES)})")
        if task_tensors not in TASK_TENSORS:
            raise UsageError(f"task_tensors {task_tensors!r} unknown (known: {', '.join(TASK_TENSORS)})")
        for name, value in (("cache_tasks", cache_tasks), ("max_batch", max_batch)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"{name} must be a positive int, got {value!r}")
        self.providers = resolve_providers(backend, device)
        self.device = device
        self.resident = self._residence(resident, strategy, cuda_graph)
        if task_tensors == "cached" and (self.resident == "device" or strategy == "sessions"):
            raise UsageError("task_tensors='cached' keeps task tensors in the in-place strategy's host cache slots: "
                             "the device path keeps every task on the device, per-task sessions hold their own")
        session_options(threads)  # a bad thread count is refused before the model is read
        self.ledger = Ledger(parse_budget(budget))
        self.device_ledger = Ledger(parse_budget(device_budget))  # device memory, apart from host RAM
        # activations live where the model runs
        self._act_ledger = self.device_ledger if device == "cuda" else self.ledger
        src = open_model(artifact)
        if src.n_tasks == 0:
            raise UsageError("the model has no tasks to run")
        self.arch = src.arch
        self.input_shape = tuple(self.arch["input_shape"])
        self._tasks = list(src.tasks)
        self.factor = factor  # apply node/low-rank/permutation deltas to activations (False: fold them, to compare)
        self._lock = threading.Lock()
        self._current: int | None = None
        self._batch_reserved = 0
        self.closed = False
        self._act_per_sample = costs.activation_bytes(self.arch, 1, max(info.n_classes for info in self._tasks))
        chosen = self._choose(strategy, charge_environment, max_batch, task_tensors)
        try:
            self._check_floor(src, chosen, charge_environment, max_batch, task_tensors)  # before a tensor is read
            self.ledger.reserve("runtime overhead", costs.RUNTIME_OVERHEAD)
            in_place = {"resident": self.resident, "device_ledger": self.device_ledger, "cuda_graph": cuda_graph,
                        "activation_bytes": lambda n: n * self._act_per_sample,
                        "task_tensors": task_tensors, "blocked": blocked_convs} if chosen == "inplace" else {}
            build = (src, chosen, device, threads, factor, charge_environment, max_batch, cache_tasks)
            try:
                self._build(*build, in_place)
            except BudgetError as exc:
                if not in_place.get("blocked") or self.ledger.limit is None:
                    raise
                # the blocked layout holds a little more (channels padded to the block, the derivation's moment):
                # a budget the unblocked graph fits gets that one, as before the layout existed
                self._undo_build()
                self._build(*build, {**in_place, "blocked": False})
                self._strategy.blocked_fallback = f"the budget does not fit it: {exc}"
        finally:
            if isinstance(artifact, (str, os.PathLike)):
                src.close()  # opened here: nothing of it stays but what the strategy kept
        del src
        return_free_heap()

    def _build(self, src: Any, chosen: str, device: str, threads: int | None, factor: bool,
               charge_environment: bool | None, max_batch: int, cache_tasks: int | None, in_place: dict) -> None:
        """The strategy, read from `src` and started, its costs reserved as it goes."""
        self._strategy: Strategy = _STRATEGY_TYPES[chosen](src, self.ledger, device=device, providers=self.providers,
                                                           threads=threads, factor=factor, **in_place)
        costs.ENVIRONMENT.charge(self.ledger, charge_environment)
        self._reserve_activations(max_batch)
        self._strategy.start(cache_tasks)

    def _undo_build(self) -> None:
        """Drop a strategy whose start ran out of budget and every reservation but the runtime's own and the
        environment's (charged once per process)."""
        strategy = getattr(self, "_strategy", None)
        if strategy is not None:
            strategy.close()
            del self._strategy
        for item in list(self.ledger.items):
            if item not in ("runtime overhead", costs.ENVIRONMENT_ITEM):
                self.ledger.release(item)
        self._batch_reserved = 0
        return_free_heap()

    # ----------------------------------------------------------------- public API
    @property
    def strategy(self) -> str:
        return self._strategy.name

    @property
    def tasks(self) -> list[str]:
        return [info.name for info in self._tasks]

    @property
    def n_tasks(self) -> int:
        return len(self._tasks)

    @property
    def current(self) -> int | None:
        return self._current

    @property
    def n_slots(self) -> int:
        return self._strategy.n_slots

    @property
    def slot_bytes(self) -> int:
        """Bytes of one cache slot (0 when no task needs a copy on a switch)."""
        return self._strategy.slot_bytes

    @property
    def task_bytes(self) -> int:
        """Resident bytes that grow with the task count (the audit's bytes per added task)."""
        return self._strategy.task_bytes

    @property
    def plans(self) -> list:
        """In place: one `TensorPlan` per graph tensor; empty for per-task sessions."""
        return self._strategy.plans

    @property
    def varying(self) -> list:
        """In place: the plans a switch writes into a slot."""
        return self._strategy.varying

    @property
    def session_params(self) -> list[int]:
        """Per-task sessions: parameters in each task's (compacted) session."""
        return self._strategy.session_params

    @property
    def hits(self) -> int:
        return self.cache_info()["hits"]

    @property
    def misses(self) -> int:
        return self.cache_info()["misses"]

    def n_classes(self, task: int | str) -> int:
        return self._tasks[resolve_task(self._tasks, task)].n_classes

    def switch(self, task: int | str) -> int:
        """Make `task` (index or name) the default for `infer` and have its weights ready; returns its index."""
        self._check_open()
        t = resolve_task(self._tasks, task)
        self._strategy.warm(t)
        self._current = t
        return t

    def infer(self, x: Any, task: int | str | None = None, *, on_device: bool = False) -> Any:
        """Logits (batch, classes of the task) for a float batch of shape (batch, *input_shape): a numpy array, or
        with ``on_device=True`` on the device path an array left where the model ran (CuPy on "cuda"). `x` may be a
        host array, an `onnxruntime.OrtValue`, or on "cuda" any ``__cuda_array_interface__`` / DLPack array, which
        is bound where it lives (no host round trip)."""
        self._check_open()
        if task is None:
            if self._current is None:
                raise UsageError("no task selected: call switch(task) first or pass task=")
            t = self._current
        else:
            t = resolve_task(self._tasks, task)
        name = f"{t} ({self._tasks[t].name})"
        arrays = self._strategy.arrays
        x = host_value(x, dlpack=arrays is None)
        on_device_x = None if arrays is None else arrays.adopt(x)
        if on_device_x is not None:
            x = check_device_input(on_device_x, self.input_shape, arrays)
        else:
            x = check_input(x, self.input_shape)
        self._reserve_activations(x.shape[0])
        logits = self._strategy.run(t, x)
        if arrays is None:
            return check_output(logits, x, name)
        logits = check_device_output(logits, x, name, arrays)
        return logits if on_device else arrays.to_host(logits)

    def bound_tensors(self, task: int | str) -> dict[str, np.ndarray]:
        """Device path only: host copies of every tensor the session reads for `task` (switched, static, per-task;
        not the factored layers' constants), to check them against `deltas.materialize`."""
        self._check_open()
        if self._strategy.arrays is None:
            raise UsageError("bound_tensors reads the device path's slots: build the runtime with resident='device' "
                             "(the default on device 'cuda')")
        return self._strategy.bound_tensors(resolve_task(self._tasks, task))

    def _check_open(self) -> None:
        if self.closed:
            raise UsageError("this TaskRuntime is closed")

    def close(self) -> None:
        """Drop the sessions and buffers (and their budget) now rather than at garbage collection."""
        with self._lock:
            self.closed = True
            self._strategy.close()
            self.ledger.items.clear()
            self.device_ledger.items.clear()

    def __enter__(self) -> "TaskRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line for logs: strategy, provider, slots, blocked convs and the budget use."""
        self._check_open()
        limit = "none" if self.ledger.limit is None else format_bytes(self.ledger.limit)
        blocked = len(getattr(self._strategy, "blocked_convs", []))
        convs = f", {blocked} switched convs blocked (NCHWc)" if blocked else ""
        return (f"{self.strategy} on {self.providers[0]}, {self.n_tasks} tasks, {self.n_slots} cached{convs}, "
                f"{format_bytes(self.ledger.used)} of budget {limit}")

    def cache_info(self) -> dict[str, Any]:
        """Hits, misses, and which task each slot holds (most recently used last)."""
        self._check_open()
        return self._strategy.cache_info()

    def memory_report(self, measure: bool = True) -> dict[str, Any]:
        """Predicted resident bytes per component (what the budget ledger holds and `budget` bounds) and, where
        measurable, `measured_rss`: the whole process's RSS, not comparable with the budget. What the runtime adds to
        a process is measured by `edgecl.runtime.audit`. Keys: docs/RUNTIME.md, first section."""
        self._check_open()
        report: dict[str, Any] = {"strategy": self.strategy, "providers": self.providers,
                                  "blocked_convs": list(getattr(self._strategy, "blocked_convs", [])),
                                  "blocked_fallback": getattr(self._strategy, "blocked_fallback", None),
                                  "task_tensors": getattr(self._strategy, "task_tensors", None),
                                  "masked_fill": maskfill.IMPLEMENTATION, "budget": self.ledger.limit,
                                  "predicted": dict(self.ledger.items), "predicted_total": self.ledger.used}
        if measure:
            report["measured_rss"] = process_rss()
        arrays = self._strategy.arrays
        if arrays is not None:
            report["device"] = {"arrays": arrays.name, "budget": self.device_ledger.limit,
                                "predicted": dict(self.device_ledger.items), "predicted_total": self.device_ledger.used,
                                "bytes_per_task": self.task_bytes / self.n_tasks}
            if measure:
                report["device"]["measured_used"] = arrays.used_bytes()  # whole device; None on the CPU twin
        return report

    def _residence(self, resident: str | None, strategy: str, cuda_graph: bool) -> str:
        """Where task deltas live and switches run: "device" on "cuda" (the only way there), "host" on "cpu" unless
        "device" is asked for (the device path with numpy as the device)."""
        resident = resident or ("device" if self.device == "cuda" else "host")
        if resident not in RESIDENCES:
            raise UsageError(f"resident {resident!r} unknown (known: {', '.join(RESIDENCES)})")
        if self.device == "cuda" and resident != "device":
            raise UsageError("device 'cuda' keeps every task on the device: resident must be 'device'")
        if resident == "device" and strategy == "sessions":
            raise UsageError("the device path switches one session in place: strategy 'sessions' runs on the CPU "
                             "only (use 'inplace' or 'auto')")
        if cuda_graph and resident != "device":
            raise UsageError("cuda_graph needs the device path (device='cuda', or resident='device' to run its "
                             "bookkeeping on the CPU)")
        return resident

    # ----------------------------------------------------------------- budget
    def _choose(self, strategy: str, charge_environment: bool | None, max_batch: int, task_tensors: str) -> str:
        if strategy != "auto":
            return strategy
        return auto_strategy(self.arch, self._tasks, self.ledger.limit, max_batch, charge_environment, self.resident,
                             task_tensors)

    def _check_floor(self, src: Any, strategy: str, charge_environment: bool | None, max_batch: int,
                     task_tensors: str) -> None:
        """BudgetError when the least the model can cost (`costs.model_floor`, from the manifest alone), with ONNX
        Runtime's environment, the runtime's own overhead and the activations at `max_batch`, exceeds the budget:
        refused before any tensor is read or decoded. The host reads the whole model also on the device path (it
        uploads it from there), so its floor is the same; the device's is what stays resident there."""
        reads = strategy == "inplace" and may_read_on_miss(task_tensors, self.resident, src.origin)
        floor = costs.model_floor(self.arch, src.params, self._tasks, strategy, reads)
        fixed = {"onnxruntime environment": costs.ENVIRONMENT.due(charge_environment),
                 "runtime overhead": costs.RUNTIME_OVERHEAD, "activations": max_batch * self._act_per_sample}
        if self.resident == "device":
            on_device = {k: v for k, v in floor.items() if k != "session"}
            if self.device == "cuda":
                on_device["activations"] = fixed.pop("activations")
                on_device["device CUDA EP session"] = costs.CUDA_SESSION_FIXED
            _refuse_below(self.device_ledger, "device memory budget", on_device, strategy)
        _refuse_below(self.ledger, "memory budget", {**floor, **fixed}, strategy)

    def _reserve_activations(self, batch: int) -> None:
        """Activation memory grows with the largest batch seen; a batch beyond the budget is refused up front."""
        if batch <= self._batch_reserved:
            return
        need = batch * self._act_per_sample
        ledger = self._act_ledger
        with self._lock:
            held = ledger.items.get("activations", 0)
            if need <= held:
                self._batch_reserved = max(self._batch_reserved, batch)
                return
            ledger.release("activations")
            try:
                ledger.reserve("activations", need)
            except BudgetError as exc:
                ledger.reserve("activations", held)
                raise BudgetError(f"batch {batch}: {exc}") from None
            self._batch_reserved = max(self._batch_reserved, batch)


def _refuse_below(ledger: Ledger, what: str, parts: dict[str, int], strategy: str) -> None:
    """BudgetError when `parts` (the least the model needs) exceed `ledger`'s limit."""
    if ledger.fits(sum(parts.values())):
        return
    raise BudgetError(f"{what} {format_bytes(ledger.limit)} ({ledger.limit} B) is below the least this model needs "
                      f"under {strategy!r}: {format_bytes(sum(parts.values()))} ("
                      + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
                      + "); refused before reading any tensor")


def auto_strategy(arch: Any, tasks: list[Any], budget: int | None, max_batch: int,
                  charge_environment: bool | None = None, resident: str | None = None,
                  task_tensors: str = "auto") -> str:
    """What ``strategy="auto"`` serves, from the manifest alone: per-task sessions when a budget is given and every
    task's session fits in it (with the environment and activations), else in place (always in place on the device
    path, and where task tensors were asked to be cached: only the in-place slots cache them). `edgecl audit` asks
    it too, so it audits what the runtime will run."""
    if budget is None or resident == "device" or task_tensors == "cached":
        return "inplace"
    per_sample = costs.activation_bytes(arch, 1, max(info.n_classes for info in tasks))
    need = costs.ENVIRONMENT.due(charge_environment) + max_batch * per_sample + costs.RUNTIME_OVERHEAD
    need += sum(costs.task_session_estimate(arch, info.n_classes) for info in tasks)
    return "sessions" if need <= budget else "inplace"
