"""Backend and device resolution for ONNX Runtime, session options, and device placement of tensors.

`auto` picks the best execution providers that exist: TensorRT EP, then CUDA EP on device "cuda"; the CPU EP on "cpu".
Only the CPU path is verified on the project's machines (onnxruntime-gpu and TensorRT are not installable there); the
CUDA/TensorRT EP paths follow ONNX Runtime's documented IOBinding API and are marked unverified in the README.
"""
from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from edgecl.errors import UsageError

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-tensorrt")
DEVICES = ("cpu", "cuda")


def resolve_providers(backend: str, device: str) -> list[str]:
    """Execution providers for a backend/device pair, or UsageError naming what is missing."""
    if device not in DEVICES:
        raise UsageError(f"device {device!r} unknown (known: {', '.join(DEVICES)})")
    if backend not in BACKENDS:
        hint = "; TensorRT engines run through onnxruntime's TensorRT EP here ('ort-tensorrt')" \
            if backend == "tensorrt" else ""
        raise UsageError(f"backend {backend!r} unknown (known: {', '.join(BACKENDS)}){hint}")
    available = ort.get_available_providers()
    if device == "cpu":
        if backend not in ("auto", "ort-cpu"):
            raise UsageError(f"backend {backend!r} needs device='cuda'")
        return ["CPUExecutionProvider"]
    wanted = {"auto": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
              "ort-cuda": ["CUDAExecutionProvider"], "ort-tensorrt": ["TensorrtExecutionProvider"]}.get(backend, [])
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise UsageError(f"device 'cuda' with backend {backend!r} needs {' or '.join(wanted)} in onnxruntime, which "
                         f"offers only {available}; install the 'gpu' extra (onnxruntime-gpu) instead of onnxruntime")
    fallbacks = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available and p not in chosen]
    return chosen + fallbacks


def session_options(threads: int | None) -> ort.SessionOptions:
    """Options for every session the runtime creates: `threads` intra-op threads (None: ONNX Runtime's default), and
    CPU activations from one arena shared by all of them (`shared_cpu_arena`)."""
    options = ort.SessionOptions()
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise UsageError(f"threads must be a positive int, got {threads!r}")
        options.intra_op_num_threads = threads
    if shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


_ARENA_LOCK = threading.Lock()
_ARENA: list[bool] = []  # [registered] once tried


def shared_cpu_arena() -> bool:
    """Register one CPU arena in ONNX Runtime's environment, once per process, for every session to allocate its
    activations from. Each session otherwise keeps its own arena at its peak: per-task sessions held N arenas (4.7 MB
    on a small ResNet) where one suffices, since runs of different sessions reuse the same memory."""
    with _ARENA_LOCK:
        if not _ARENA:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            try:  # registering again (another user of this process) is accepted by onnxruntime 1.32
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                _ARENA.append(True)
            except Exception:  # noqa: BLE001 - a build without environment allocators: one arena per session
                _ARENA.append(False)
        return _ARENA[0]


def ort_device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def to_ortvalue(array: np.ndarray, device: str) -> ort.OrtValue:
    """Bind-ready value. On CPU it shares the numpy memory (no copy; keep the array alive); on CUDA it is a device
    copy."""
    if device == "cpu":
        return ort.OrtValue.ortvalue_from_numpy(array)
    return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)


def empty_ortvalue(shape: tuple[int, ...], device: str) -> ort.OrtValue:
    """A device buffer for a switched tensor (CUDA only; CPU buffers are numpy arrays wrapped by `to_ortvalue`)."""
    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, "cuda", 0)
