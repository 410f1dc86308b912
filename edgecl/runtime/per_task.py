"""The ``sessions`` strategy: one folded (and, where that removes weights, structurally compacted) ONNX Runtime session
per task, created once at start-up. Inference is a plain dense session's and a switch costs nothing; memory is ~2×
one dense model per task. Nothing of the model is kept once the sessions exist: they hold their own weights."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from edgecl.graph.builder import INPUT, build_onnx
from edgecl.graph.standardize import fold_standardized
from edgecl.graph.compact import compact_task, count_params
from edgecl.runtime import costs
from edgecl.runtime.budget import Ledger
from edgecl.runtime.process_memory import return_free_heap
from edgecl.runtime.providers import session_options, to_ortvalue
from edgecl.source import IN_MEMORY, ModelSource


class PerTaskSessions:
    """Holds `src` only until `start` has built every task's session from it."""

    name = "sessions"
    n_slots = slot_bytes = 0
    plans: list = []  # nothing is switched: no plans (the in-place strategy's attributes, empty here)
    varying: list = []
    arrays = None  # results are host arrays (CPU only: the device path switches in place)

    def __init__(self, src: ModelSource, ledger: Ledger, *, device: str, providers: list[str], threads: int | None,
                 factor: bool):
        del device, factor  # sessions run where their provider puts them; every delta is folded
        self._src: ModelSource | None = src
        self.ledger, self.providers, self.threads = ledger, providers, threads
        self.session_params: list[int] = []  # parameters in each task's (compacted) session
        self.task_bytes = 0
        self._sessions: list[ort.InferenceSession] = []
        self._weights: list = []

    def start(self, cache_tasks: int | None) -> None:
        del cache_tasks  # every task has its session: nothing to cache
        src, self._src = self._src, None
        for t, info in enumerate(src.tasks):
            item = f"session of task {t} ({info.name})"
            # what building it holds, reserved before its weights are materialised (refused before allocation),
            # then what the (compacted) session keeps: never more
            self.ledger.reserve(item, costs.task_session_build_bytes(src.arch, info.n_classes))
            arch, params = fold_standardized(src.arch, src.materialize(t))  # a plain conv per standardised one
            if t == 0 and src.origin != IN_MEMORY:
                # the opened file keeps its decoded shared tensors (weights, owner maps) until every session is
                # built: charged from the first task on (measured: the demo-shaped model's 10 sessions peaked
                # ~1.2 MB above the ledger without this item)
                self.ledger.reserve("model read while building",
                                    costs.held_bytes(src.read_base(name) for name in src.base_names()))
            small_arch, small, report = compact_task(arch, params)
            if report.compacted and report.params_compact < report.params_dense:
                arch, params = small_arch, small
            nbytes = costs.folded_session_bytes(params, arch)
            self.ledger.release(item)
            self.ledger.reserve(item, nbytes)
            self.task_bytes += nbytes
            self.session_params.append(count_params(params))
            self._sessions.append(self._session(arch, params, t))
            del params, small  # the task's dense weights and compaction temporaries: the session holds its own
            return_free_heap()  # else glibc keeps them: the trained demo's builds peaked ~1 MB above the ledger
        self.ledger.release("model read while building")  # the file is closed once the runtime is built

    def _session(self, arch: dict, params: dict[str, np.ndarray], t: int) -> ort.InferenceSession:
        """A folded session whose weights ONNX Runtime reads from `params` itself (external initializers, kept alive
        here): no serialised copy of the weights is ever made, so building one never holds more than it keeps."""
        arrays = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in params.items()}
        model = build_onnx(arch, weights_as_inputs=True, constants=arrays, external_constants=True,
                           graph_name=f"task{t}")
        values = [to_ortvalue(a) for a in arrays.values()]
        options = session_options(self.threads)
        options.add_external_initializers(list(arrays), values)
        self._weights.append((arrays, values))  # ONNX Runtime reads them for the session's lifetime
        return ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)

    def warm(self, t: int) -> None:
        """Nothing to do: every task's session is ready."""

    def run(self, t: int, x: np.ndarray) -> np.ndarray:
        return self._sessions[t].run(None, {INPUT: x})[0]

    def cache_info(self) -> dict[str, Any]:
        return {"hits": 0, "misses": 0, "slots": 0, "cached": []}

    def close(self) -> None:
        self._sessions = []
        self._weights = []
