"""Backend and device resolution for ONNX Runtime, session options, and device placement of tensors.

`auto` picks the CPU EP on "cpu" and the CUDA EP on "cuda": the switchable graph takes its switched weights as graph
inputs, which the TensorRT EP would build into engines as dynamic network inputs (``ort-tensorrt`` stays selectable;
unverified). Device "cuda" also needs CuPy (the device-resident switch, `edgecl.runtime.device_arrays`); every missing
piece is named in one UsageError with the fix. Only the CPU path is verified on the project's machines; the CUDA
path is built to ONNX Runtime's documented IOBinding API and CPU-tested through its numpy twin (README, "What runs
where").
"""
from __future__ import annotations

import contextlib
import io
import threading
from typing import Any

import numpy as np
import onnxruntime as ort

from edgecl.checks import MAX_THREADS, check_int
from edgecl.errors import UsageError
from edgecl.runtime.device_arrays import GPU_EXTRA, cupy_problem

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
    wanted = {"auto": ["CUDAExecutionProvider"], "ort-cuda": ["CUDAExecutionProvider"],
              "ort-tensorrt": ["TensorrtExecutionProvider"]}.get(backend, [])
    chosen = [p for p in wanted if p in available]
    missing = [] if chosen else [f"onnxruntime-gpu ({' or '.join(wanted)}; this onnxruntime offers only {available})"]
    cupy = cupy_problem()
    if cupy:
        missing.append(cupy)
    if missing:
        raise UsageError(f"device 'cuda' with backend {backend!r} needs {' and '.join(missing)}; install the 'gpu' "
                         f"extra instead of onnxruntime: {GPU_EXTRA}")
    preload_cuda_libraries()
    fallbacks = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available and p not in chosen]
    return chosen + fallbacks


_PRELOAD_LOCK = threading.Lock()
_PRELOADED: list[str] = []  # [what onnxruntime said while preloading] once tried


def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries of the `nvidia-*` pip packages before the first CUDA session, once per
    process. onnxruntime-gpu's CUDA EP links them by name, and pip puts them where the loader does not look:
    without this the EP fails to load and ONNX Runtime runs the session on the CPU (caught by `require_placement`).
    Best effort (`onnxruntime.preload_dlls`, onnxruntime-gpu >= 1.21; a library torch loaded already is the same
    file, not a second copy); what it printed is kept for `require_placement`'s message."""
    with _PRELOAD_LOCK:
        if not _PRELOADED:
            preload = getattr(ort, "preload_dlls", None)
            said = io.StringIO()
            try:
                with contextlib.redirect_stdout(said):
                    if preload is not None:
                        preload()
            except Exception as exc:  # noqa: BLE001 - libraries on the loader's path still work; the message keeps it
                said.write(f"preload_dlls failed: {type(exc).__name__}: {exc}")
            _PRELOADED.append(said.getvalue().strip() if preload else "onnxruntime has no preload_dlls (< 1.21)")
        return _PRELOADED[0]


def session_providers(providers: list[str], cuda_graph: bool = False) -> list[Any]:
    """`providers` with the CUDA EP's options: its arena grows by what is asked (not the next power of two), so
    device memory stays near the audit's prediction; CUDA graphs where asked (`edgecl.runtime.device_store`); no
    TF32. The CUDA EP's default rounds matmul and conv inputs to TF32's 10-bit mantissa on Ampere and later: on an
    H200 that moved logits by up to 1.8e-3 against the CPU runtime (tools/gpu_check.py, 2026-11-30), where full
    fp32 keeps them within 1e-6."""
    options = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0",
               "enable_cuda_graph": "1" if cuda_graph else "0"}
    return [(p, options) if p == "CUDAExecutionProvider" else p for p in providers]


def require_placement(session: ort.InferenceSession, device: str) -> None:
    """UsageError when a session meant for the GPU was placed on the CPU: ONNX Runtime falls back silently when its
    CUDA EP finds no device (or not its CUDA libraries)."""
    placed = session.get_providers()
    if device == "cuda" and placed[0] not in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        raise UsageError(f"device 'cuda': ONNX Runtime placed the session on {placed}, not on a GPU: no CUDA device is "
                         "visible to onnxruntime-gpu, or its CUDA 13 libraries (libcudart, libcublas, libcudnn) are "
                         "missing; check the driver, CUDA_VISIBLE_DEVICES and `python -c \"import onnxruntime as o; "
                         f"o.preload_dlls()\"`{_preload_note()}")


def _preload_note() -> str:
    said = _PRELOADED[0] if _PRELOADED else ""
    return f"; preloading the CUDA libraries said: {said[:600]}" if said else ""


def session_options(threads: int | None) -> ort.SessionOptions:
    """Options for every session the runtime creates: `threads` intra-op threads (None: ONNX Runtime's default), and
    CPU activations from one arena shared by all of them (`shared_cpu_arena`)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = check_int(threads, "threads", 1, MAX_THREADS)  # beyond int32: pybind TypeError
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


ALIGN = 64  # bytes: one cache line, MLAS's widest (AVX-512) vector


def aligned_zeros(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """Zeros starting on a 64-byte boundary, as ONNX Runtime allocates its own tensors. numpy only guarantees 16
    bytes: a blocked conv's filter bound from such a buffer made MLAS's 64-byte vector loads straddle cache lines
    (tools/profile_inplace.py: resnet18 LPS convs' kernels 1.15× a dense session's at batch 64)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    """A bind-ready value sharing the numpy memory (no copy; keep the array alive). Host memory only: the device path
    binds device arrays by pointer (`edgecl.runtime.device_store`)."""
    return ort.OrtValue.ortvalue_from_numpy(array)
