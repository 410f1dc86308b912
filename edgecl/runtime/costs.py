"""The runtime's cost model: what each resident part costs in bytes, in one place, so the budget the runtime enforces
(`TaskRuntime.ledger`) and the prediction the audit reports are the same numbers.

ONNX Runtime's own costs are constants measured as RSS increases on onnxruntime 1.32 / x86-64 Linux (the audit
reports the measured figure next to these predictions); everything else is counted from the arrays themselves.
"""
from __future__ import annotations

import math
import threading
from typing import Iterable

import numpy as np

from edgecl.arch.op_shapes import intermediates
from edgecl.arch.spec import Arch, dense_params, node_shapes, param_shapes, shapes_after
from edgecl.runtime.budget import Ledger

ORT_ENVIRONMENT = 10_300_000  # first session in a process: environment, thread pool, kernel registry, first arena
#                               (measured 8.7-10.3 MB depending on what the heap already held; an upper bound, so a
#                               runtime built with budget B stays under B: tools/bench_budget.py)
RUNTIME_OVERHEAD = 1_600_000  # every runtime: the opened model's and the plans' Python objects, the graph it builds,
#                               modules imported on first use (measured 1.2-1.5 MB, the same on models of 0.1-1 MB),
#                               and since heads may be read on a miss, the task-blob index and a kept zstd
#                               decompressor (~0.1 MB: a budget of exactly "needed" reached 98-100 % of B without it)
SESSION_OVERHEAD = 200_000  # every further session (graph, kernels, allocation plan)
TASK_SESSION_OVERHEAD = 300_000  # ... a per-task session: ~290 KB each for the trained demo's 10 once each has
#                                  run twice at batch 64 (with 200 KB, B = "needed" was reached at 101 % of B)
CUDA_SESSION_FIXED = 154_000_000  # device bytes a CUDA EP session holds whatever its model: cuBLAS and cuDNN handles
#                                   and workspaces, the arena's first chunk, kernels loaded on first use. Measured by
#                                   tools/gpu_check.py as the GPU's used-memory increase for a one-layer session:
#                                   153.1 and 155.2 MB on an H200 (onnxruntime-gpu 1.31.1, CUDA 13.0), 2026-11-30
# Deriving the blocked layout (`blocked_convs.derive`: ONNX Runtime optimises the graph with placeholders, twice, its
# model written and read back) holds this many times the graph's float32 weights for a moment at start-up, over what
# the unblocked runtime peaks at: measured 3.5× (mobilenet_v2), 5.9× (resnet18), 4.9× (resnet50), LPS with per-task
# BatchNorm, 3×32×32 (tools/bench_startup_peak.py). Charged while it runs, so a budget that leaves no room for it
# gets the unblocked graph instead of a peak over the budget.
BLOCKED_DERIVE_FACTOR = 6
# ... and after it the process keeps this much more, whatever the model (once: a second runtime in the process adds
# what an unblocked one adds): RSS after serving, blocked less unblocked, fresh processes: 3.5 MB (resnet preset,
# 20 K weights), 4.0 MB (mobilenet_v2), 3.1 MB (resnet18); the ledger did not see it (the audit of a small model
# measured 14.2 MB against 12.97 predicted). Charged to every blocked runtime: an upper bound after the first.
BLOCKED_FIXED = 4_200_000
SLOT_OVERHEAD = 65_536  # every in-place cache slot beside its buffers: OrtValues, each thread's IOBinding, logits
SESSION_WEIGHT_FACTOR = 2  # a folded session holds ~2× its weights: parsed initializers and pre-packed GEMM copies
#                            (measured 1.9× for 4.4 MB weights, RSS after start-up with freed heap returned)
SESSION_CONV_OVERHEAD = 40_000  # per convolution of a session: its kernel's state and workspace; without it the
#                                 sessions of graphs of many small convolutions were under-counted by 31-42 KB per
#                                 conv (ShuffleNet v2 ×0.5, 56 convs: 5.34 MB measured per session, 3.14 predicted;
#                                 mobilenet_v2 ×0.25, 52: 3.98 vs 2.34; convnext_atto, 40: 28.8 vs 27.3), while
#                                 resnet18 and the presets were within 0.5 MB (tools/results/session_memory.json)


ENVIRONMENT_ITEM = "onnxruntime environment"  # its ledger item


class Environment:
    """ONNX Runtime's one-off cost per process (environment, thread pool, kernel registry, first arena).

    A process pays it once, with its first session, so it is charged to the first runtime's ledger only — unless a
    caller asks for it regardless (the audit, which answers for a fresh device process). `charged` says whether
    this process already holds it; the audit reads it to leave it out of a comparison with a measured increase."""

    def __init__(self) -> None:
        self._charged = False
        self._lock = threading.Lock()

    @property
    def charged(self) -> bool:
        return self._charged

    def due(self, always: bool | None = None) -> int:
        """What `charge` would reserve now: the environment's bytes, or 0."""
        return ORT_ENVIRONMENT if always or (always is None and not self._charged) else 0

    def charge(self, ledger: Ledger, always: bool | None = None) -> None:
        """Reserve the environment in `ledger` if this process has not paid it yet (None), or in any case (True);
        never twice in one ledger (a runtime built again unblocked keeps the first build's charge)."""
        with self._lock:
            if self.due(always) and ENVIRONMENT_ITEM not in ledger.items:
                ledger.reserve(ENVIRONMENT_ITEM, ORT_ENVIRONMENT)
                self._charged = True


ENVIRONMENT = Environment()  # the one per process


def activation_bytes(arch: Arch, batch: int, n_classes: int) -> int:
    """Float32 bytes of every intermediate activation at `batch` (input and logits included): an upper bound on what
    ONNX Runtime's planner keeps live, since it reuses buffers of dead activations."""
    per_sample = int(np.prod(arch["input_shape"])) + n_classes
    per_sample += sum(int(np.prod(shape)) for shape in shapes_after(arch))
    shapes = node_shapes(arch)  # attention's scores (heads × T² each), attention pooling's softmax: no node's output
    per_sample += sum(intermediates(n, [shapes[s] for s in n["inputs"]]) for n in arch["nodes"])
    return 4 * batch * per_sample


def task_session_estimate(arch: Arch, n_classes: int) -> int:
    """A folded per-task session before it is built (dense: compaction can only make it smaller)."""
    return SESSION_WEIGHT_FACTOR * 4 * dense_params(arch, n_classes) + _graph_bytes(arch)


def _graph_bytes(arch: Arch) -> int:
    """A per-task session's cost beside its weights: the session and each convolution's kernel state."""
    return TASK_SESSION_OVERHEAD + _convs_bytes(arch)


def _convs_bytes(arch: Arch) -> int:
    return SESSION_CONV_OVERHEAD * sum(n["op"] == "conv" for n in arch["nodes"])


def task_session_build_bytes(arch: Arch, n_classes: int) -> int:
    """What building one per-task session holds at most: the dense session, and the task's materialised weights
    beside it until compaction has run."""
    return task_session_estimate(arch, n_classes) + 4 * dense_params(arch, n_classes)


def folded_session_bytes(params: dict[str, np.ndarray], arch: Arch) -> int:
    """A built folded session of `arch` holding `params` (parsed initializers + pre-packed copies)."""
    return SESSION_WEIGHT_FACTOR * sum(a.nbytes for a in params.values()) + _graph_bytes(arch)


def switchable_session_bytes(constants: Iterable[np.ndarray], arch: Arch, factors: dict | None = None) -> int:
    """The switchable session: ONNX Runtime reads its constants from the runtime's own arrays (no serialised copy
    is made) and keeps one pre-packed copy of each GEMM weight (measured RSS after start-up: within 1 %), and each
    convolution's kernel state as a per-task session does (a low-rank factored one runs three: its own and the
    residual's two 1×1 convolutions, `edgecl.graph.builder`)."""
    convs = {n["name"] for n in arch["nodes"] if n["op"] == "conv"}
    lowrank = sum(form == "lowrank" for layer, (form, _) in (factors or {}).items() if layer in convs)
    return SESSION_OVERHEAD + _convs_bytes(arch) + 2 * SESSION_CONV_OVERHEAD * lowrank + \
        sum(a.nbytes for a in constants)


def slot_bytes(shapes: Iterable[tuple[int, ...]]) -> int:
    """One cache slot: a float32 buffer per switched tensor."""
    return sum(4 * int(np.prod(shape)) for shape in shapes)


def held_bytes(arrays: Iterable[np.ndarray]) -> int:
    """Bytes of the memory behind `arrays`, each buffer counted once (views count their whole owner, which they keep
    alive)."""
    owners: dict[int, int] = {}
    for a in arrays:
        while isinstance(a.base, np.ndarray):
            a = a.base
        owners[id(a)] = a.nbytes
    return sum(owners.values())


def model_floor(arch: Arch, params: dict[str, dict], tasks: list, strategy: str,
                read_on_miss: bool = False) -> dict[str, int]:
    """The least a runtime of `strategy` can keep of a model, per part, from its architecture, delta specs and task
    list alone — the manifest, before any tensor is read — so a budget it cannot meet is refused before a blob is
    decoded: every task's head and per-task tensors (each strategy keeps them; the largest task's alone where they
    may be `read_on_miss` into one cache slot), and in place the base weights (one float32 copy each), LPS keep bits
    (1 bit per weight per task) and one session; per task a session otherwise."""
    shapes = [param_shapes(arch, info.n_classes) for info in tasks]
    own = [sum(4 * math.prod(s[name]) for name, spec in params.items() if spec.get("kind") == "task" and name in s)
           for s in shapes]
    floor = {"heads and per-task tensors": max(own, default=0) if read_on_miss else sum(own)}
    trunk = param_shapes(arch)
    if strategy == "inplace":
        floor["base weights"] = sum(4 * math.prod(trunk[name]) for name, spec in params.items()
                                    if spec.get("kind") != "task" and name in trunk)
        floor["task masks"] = len(tasks) * sum(-(-math.prod(trunk[name]) // 8) for name, spec in params.items()
                                               if spec.get("kind") == "lps" and name in trunk)
        floor["session"] = SESSION_OVERHEAD
    else:
        floor["sessions"] = len(tasks) * TASK_SESSION_OVERHEAD
    return floor
