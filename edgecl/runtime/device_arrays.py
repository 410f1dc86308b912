"""Where the device-resident switch keeps its arrays and runs its programs — one small interface, two backends:

- `CupyArrays`: CuPy on a CUDA GPU (``device="cuda"``): uploads, the masked-select kernel (`device_kernel`), device
  pointers for ONNX Runtime's IOBinding, device memory in use. CuPy is imported here only, lazily: a CPU-only
  install never needs it.
- `HostArrays`: numpy, the CPU twin. The same programs (`edgecl.runtime.device_fill`) run on it, with the kernel's
  numpy twin, so CI checks the device path bit for bit against `deltas.materialize` on a machine without a GPU.

Both adopt caller arrays that already live where the model runs (an `onnxruntime.OrtValue`, a DLPack or
``__cuda_array_interface__`` array), so an input need not make a round trip through the host.
"""
from __future__ import annotations

import importlib
import importlib.util
import threading
from typing import Any

import numpy as np

from edgecl.errors import UsageError
from edgecl.runtime.device_kernel import (FLAG_NAME, KERNEL_NAME, SCALE_NAME, any_nonfinite_numpy, cuda_source,
                                          flag_cuda_source, masked_scale_numpy, masked_select_numpy, scale_cuda_source)

GPU_EXTRA = "pip install 'edgecl[gpu]'"
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65_535  # grid-stride loop: enough blocks to fill any GPU, never more than the grid limit


def cupy_problem() -> str | None:
    """Why CuPy cannot be used here (for the combined error message of `providers.resolve_providers`), or None."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy (not installed; the 'gpu' extra brings cupy-cuda13x)"
    return None


class HostArrays:
    """numpy as the "device": what CI runs the device path on."""

    name = "numpy"
    device_type = "cpu"
    device_id = 0
    xp = np

    def upload(self, a: np.ndarray) -> np.ndarray:
        """A copy owned by the backend (the host plans it came from can then be dropped)."""
        return np.array(a, order="C", copy=True)

    def empty(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> np.ndarray:
        return np.empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> np.ndarray:
        return np.zeros(shape, dtype)

    def masked_select(self, base: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
        masked_select_numpy(base, bits, out)

    def masked_scale(self, base: np.ndarray, bits: np.ndarray, scale: np.ndarray, out: np.ndarray,
                     table: np.ndarray, max_rows: int) -> None:
        """The scaled select over the segments of `table` (`device_kernel.SCALE_NAME`'s twin)."""
        del max_rows  # the twin walks every row
        masked_scale_numpy(base, bits, scale, out, table)

    def pointer(self, a: np.ndarray) -> int:
        return a.ctypes.data

    def synchronize(self) -> None:
        """Nothing runs asynchronously on the host."""

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def copy_into(self, out: np.ndarray, x: Any) -> None:
        np.copyto(out, x)

    def any_nonfinite(self, a: np.ndarray) -> bool:
        """Whether any float32 element of `a` is inf or NaN (the device's one-launch check's twin)."""
        return any_nonfinite_numpy(a)

    def used_bytes(self) -> int | None:
        """Device memory in use: not separate from the host's (the audit measures RSS instead)."""
        return None

    def adopt(self, x: Any) -> np.ndarray | None:
        """`x` as an array of this backend without a copy where possible (a DLPack array), or None when `x` is an
        ordinary host array (checked by `inputs.check_input`). OrtValues arrive here through `host_value` first."""
        if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
            if is_ortvalue(x):
                refuse_ortvalue(x, "cpu")
            return None
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError, ValueError) as exc:
            raise UsageError(f"input {type(x).__name__} cannot be read on the CPU through DLPack ({exc})") from None


class CupyArrays:
    """CuPy on CUDA device `device_id`. Construction checks, with a UsageError naming the fix, that CuPy imports
    and sees a GPU."""

    name = "cupy"
    device_type = "cuda"

    def __init__(self, device_id: int = 0):
        try:
            self.cupy = importlib.import_module("cupy")
        except ImportError as exc:
            raise UsageError(f"device 'cuda' needs CuPy, which cannot be imported ({exc}); install the 'gpu' extra: "
                             f"{GPU_EXTRA}") from None
        self.xp = self.cupy
        self.device_id = device_id
        try:
            count = self.cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError: no driver, no device, a driver too old
            raise UsageError(f"device 'cuda': CuPy sees no usable GPU ({exc}); check the NVIDIA driver and "
                             "CUDA_VISIBLE_DEVICES") from None
        if count <= device_id:
            raise UsageError(f"device 'cuda': {count} GPUs visible, device {device_id} asked for")
        self.cupy.cuda.Device(device_id).use()
        self._kernel = self._flag_kernel = self._scale_kernel = None
        self._flags = threading.local()  # each thread's flag and token: calls run concurrently from threads

    def upload(self, a: np.ndarray) -> Any:
        return self.cupy.asarray(np.ascontiguousarray(a))

    def empty(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> Any:
        return self.cupy.empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> Any:
        return self.cupy.zeros(shape, dtype)

    def masked_select(self, base: Any, bits: Any, out: Any) -> None:
        """One launch over every element (base and out as their uint32 bit patterns)."""
        if self._kernel is None:
            self._kernel = self.cupy.RawKernel(cuda_source(), KERNEL_NAME)
        n = base.size
        blocks = max(1, min(-(-n // THREADS_PER_BLOCK), MAX_BLOCKS))
        self._kernel((blocks,), (THREADS_PER_BLOCK,),
                     (base.view(self.cupy.uint32), bits, out.view(self.cupy.uint32), np.uint64(n)))

    def masked_scale(self, base: Any, bits: Any, scale: Any, out: Any, table: Any, max_rows: int) -> None:
        """One launch over every row of every segment of `table` (a (segments, 4) uint64 device array)."""
        if self._scale_kernel is None:
            self._scale_kernel = self.cupy.RawKernel(scale_cuda_source(), SCALE_NAME)
        grid = (max(1, min(max_rows, MAX_BLOCKS)), table.shape[0])
        self._scale_kernel(grid, (THREADS_PER_BLOCK,),
                           (base.view(self.cupy.uint32), bits, scale, out.view(self.cupy.uint32), table))

    def pointer(self, a: Any) -> int:
        return int(a.data.ptr)

    def synchronize(self) -> None:
        """Wait for this thread's CuPy stream: ONNX Runtime reads the weights on its own stream."""
        self.cupy.cuda.get_current_stream().synchronize()

    def to_host(self, a: Any) -> np.ndarray:
        return self.cupy.asnumpy(a)

    def copy_into(self, out: Any, x: Any) -> None:
        if isinstance(x, np.ndarray):
            out.set(np.ascontiguousarray(x, dtype=out.dtype))
        else:
            self.cupy.copyto(out, x)

    def any_nonfinite(self, a: Any) -> bool:
        """Whether any element of a float32 device array is inf or NaN: one launch and one 4-byte read. The kernel stores this call's token in this thread's flag, so the flag is never cleared."""
        if self._flag_kernel is None:
            self._flag_kernel = self.cupy.RawKernel(flag_cuda_source(), FLAG_NAME)
        local = self._flags
        if getattr(local, "flag", None) is None:
            local.flag, local.token = self.cupy.zeros(1, self.cupy.uint32), 0
        local.token = local.token % 0xFFFFFFFF + 1  # 1 .. 2**32 - 1: the zeroed flag never matches
        bits = a.reshape(-1).view(self.cupy.uint32)
        blocks = max(1, min(-(-bits.size // THREADS_PER_BLOCK), MAX_BLOCKS))
        self._flag_kernel((blocks,), (THREADS_PER_BLOCK,),
                          (bits, np.uint64(bits.size), local.flag, np.uint32(local.token)))
        return int(local.flag.get()[0]) == local.token

    def used_bytes(self) -> int | None:
        """Device memory in use on the whole GPU (every process, the CUDA context and every allocator)."""
        free, total = self.cupy.cuda.runtime.memGetInfo()
        return int(total - free)

    def adopt(self, x: Any) -> Any:
        """A CuPy view of `x` (an OrtValue on the GPU, a ``__cuda_array_interface__`` or DLPack array), or None for
        a host array. Pending work on this thread's stream is waited for: ONNX Runtime reads on its own stream."""
        if isinstance(x, np.ndarray):
            return None
        cp = self.cupy
        if is_ortvalue(x):
            if x.device_name().lower() != "cuda" or x.data_type() != "tensor(float)":
                refuse_ortvalue(x, "cuda")
            shape = tuple(x.shape())
            memory = cp.cuda.UnownedMemory(x.data_ptr(), 4 * int(np.prod(shape)), x)  # keeps the OrtValue alive
            array = cp.ndarray(shape, cp.float32, cp.cuda.MemoryPointer(memory, 0))
        elif hasattr(x, "__cuda_array_interface__"):
            array = cp.asarray(x)
        elif hasattr(x, "__dlpack__"):
            try:
                array = cp.from_dlpack(x)
            except (TypeError, RuntimeError, BufferError, ValueError):
                return None  # a host-side DLPack array: read on the host
        else:
            return None
        self.synchronize()
        return array


def is_ortvalue(x: Any) -> bool:
    return type(x).__name__ == "OrtValue" and hasattr(x, "device_name")


DLPACK_CPU = 1  # DLPack's kDLCPU


def host_value(x: Any, dlpack: bool = False) -> Any:
    """An OrtValue in host memory as the numpy array it holds (read like any host input), and with `dlpack` (the
    host path, which has no `adopt`) a DLPack array in host memory too: a DLPack carrier that is not an ndarray (a
    CPU torch or JAX array) would otherwise become a 0-d object array, refused as "dtype object". Anything else as
    is."""
    if is_ortvalue(x) and x.device_name().lower() == "cpu":
        return x.numpy()
    if dlpack and not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        try:
            on_host = x.__dlpack_device__()[0] == DLPACK_CPU
        except Exception as exc:  # noqa: BLE001 - a foreign object's own failure, reported as bad input
            raise UsageError(f"input's __dlpack_device__() failed: {type(exc).__name__}: {exc}") from None
        if on_host:
            try:
                return np.from_dlpack(x)
            except (BufferError, TypeError, ValueError, RuntimeError) as exc:
                raise UsageError(f"input DLPack array cannot be read as a numpy array: {exc}") from None
    return x


def refuse_ortvalue(x: Any, device: str) -> None:
    raise UsageError(f"input OrtValue of {x.data_type()} on {x.device_name()!r}: this runtime takes tensor(float) "
                     f"on {device!r} or on the CPU")


def backend_for(device: str) -> HostArrays | CupyArrays:
    """The arrays of the device-resident path: CuPy on "cuda", the numpy twin on "cpu"."""
    return CupyArrays() if device == "cuda" else HostArrays()
