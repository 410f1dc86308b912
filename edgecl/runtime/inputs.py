"""Inputs and outputs of `TaskRuntime.infer` and `edgecl run`: a wrong array or file is a clear UsageError, never an
ONNX Runtime traceback, an allocation a file cannot back, or a silently wrong answer.

Policy (docs/RUNTIME.md, "Inputs"; tested):
- shape must be (batch, *input_shape) with batch ≥ 1; a single sample must be given as x[None];
- float32 is used as is; float16 and float64 are cast to float32 (the model computes in float32 either way, so the
  cast loses nothing a float32 caller would keep); integer, bool, complex and object arrays are refused, because the
  model was trained on scaled floats and raw pixel integers would give confident nonsense;
- the check is on what is computed on: a `numpy.ma` masked array is refused (the model cannot honour a mask, and
  its hidden values would be used), NaN or ±inf anywhere is refused (one pass over the input);
- finite inputs can still overflow inside the model (an all-3e38 batch): logits that are not finite are refused
  (`check_output`), never returned — weights are finite by the artifact's rules, so only the input can cause them.
Files (`load_input`): a regular `.npy` file, or an `.npz` holding exactly one array, never unpickled, and refused
by its header before any data is read or decompressed: a dtype that is not plain numbers (structured, sub-array,
bytes, time, zero-sized), more or fewer bytes than the file (or zip member) holds, more than `MAX_INPUT_BYTES`, or
more than the memory budget.
"""
from __future__ import annotations

import os
import stat
import sys
import zipfile
import zlib
from typing import IO, Any

import numpy as np

from edgecl.errors import BudgetError, UsageError
from edgecl.npy import read_npy_header
from edgecl.runtime.budget import format_bytes, parse_budget

NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"  # an archive of no member (np.savez(path) without an array) starts at its end
NUMERIC_KINDS = "biufc"  # bool, ints, floats, complex: the header's dtype may be read (`check_input` wants floats)
MAX_INPUT_BYTES = 1 << 29  # 512 MiB of data in one input file: beyond it, split the batch (docs/RUNTIME.md)


def check_input(x: Any, input_shape: tuple[int, ...], what: str = "input") -> np.ndarray:
    """A C-contiguous float32 batch ready to bind, or UsageError naming what was wrong."""
    masked = sys.modules.get("numpy.ma")  # a caller holding a masked array has imported it; never import it here
    if masked is not None and isinstance(x, masked.MaskedArray):
        raise UsageError(f"{what} is a numpy masked array: the model cannot honour a mask and would compute on the "
                         "masked values; pass x.filled(value) or the plain array")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{what} is not an array: {exc}") from None
    _check_layout(x, input_shape, what)
    if x.dtype != np.float32 or not x.flags.c_contiguous or type(x) is not np.ndarray:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf and is refused below
            x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise UsageError(f"{what} has {len(bad)} NaN/inf values (first at index {tuple(int(i) for i in bad[0])})")
    return x


def check_device_input(x: Any, input_shape: tuple[int, ...], arrays: Any, what: str = "input") -> Any:
    """`check_input` for a batch already on the device (a CuPy array, or numpy on the CPU twin): the same policy,
    checked where the batch lives and before the run, as a host batch is (a refused batch fills no slot, captures no
    CUDA graph and meets no budget first); only a refused batch is copied to the host, for the message. The check is
    one launch and one 4-byte read (`device_kernel.FLAG_NAME`), which waits for this thread's stream: a cast or
    contiguous copy made here has finished before ONNX Runtime reads the batch on its own stream."""
    _check_layout(x, input_shape, what)
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        with np.errstate(over="ignore"):
            x = arrays.xp.ascontiguousarray(x, dtype=np.float32)
    if arrays.any_nonfinite(x):
        check_input(arrays.to_host(x), input_shape, what)  # raises; a false flag would pass on
    return x


def _check_layout(x: Any, input_shape: tuple[int, ...], what: str) -> None:
    """dtype kind, shape and a non-empty batch: what any array (host or device) reports without being read."""
    if x.dtype.kind != "f":
        raise UsageError(f"{what} has dtype {x.dtype}; expected float32 (float16/float64 are cast), scaled as in "
                         f"training")
    want = tuple(input_shape)
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        hint = " (a single sample needs a batch axis: x[None])" if tuple(x.shape) == want else ""
        raise UsageError(f"{what} has shape {tuple(x.shape)}; expected (batch, {', '.join(map(str, want))}){hint}")
    if x.shape[0] == 0:
        raise UsageError(f"{what} has an empty batch")


def check_output(logits: np.ndarray, x: np.ndarray, task: str) -> np.ndarray:
    """`logits` when every value is finite; otherwise UsageError: the input overflowed float32 inside the model."""
    if np.isfinite(logits).all():
        return logits
    rows = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    raise UsageError(f"task {task}: the logits of {len(rows)} of {len(logits)} inputs are not finite (first: input "
                     f"{int(rows[0])}, max |x| {float(np.abs(x[rows[0]]).max()):.3g}): the input overflows float32 "
                     "inside the model; scale inputs as in training")


def check_device_output(logits: Any, x: Any, task: str, arrays: Any) -> Any:
    """`check_output` for logits on the device: one launch and one 4-byte read there; only refused logits (and
    their batch, for the message) are copied to the host."""
    if not arrays.any_nonfinite(logits):
        return logits
    host_x = x if isinstance(x, np.ndarray) else arrays.to_host(x)
    check_output(arrays.to_host(logits), host_x, task)
    return logits


def load_input(path: str | os.PathLike, budget: int | str | None = None) -> np.ndarray:
    """The array in a `.npy` file, or in an `.npz` archive holding exactly one; never unpickled. Its header is judged
    before any data is read or decompressed: a numeric dtype, the data the file holds, at most `MAX_INPUT_BYTES`
    and `budget`. UsageError (BudgetError over the budget) naming the file otherwise."""
    path = os.fspath(path)
    limit = parse_budget(budget)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"input file {path!r} not found") from None
    except OSError as exc:
        raise UsageError(f"input file {path!r}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"input {path!r} is not a regular file (a device, folder or pipe); save the array with "
                         "numpy.save")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            if magic == NPY_MAGIC:
                f.seek(0)
                return _read_npy(f, info.st_size, path, limit)
        if magic[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC):
            return _read_npz(path, limit)
    except OSError as exc:
        raise UsageError(f"input file {path!r}: {exc.strerror or exc}") from None
    raise UsageError(f"input file {path!r} is not a .npy or .npz file (no NumPy header); save the array with "
                     "numpy.save")


def _read_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy header, the dtype one a plain array of numbers can have."""
    try:
        shape, fortran, dtype = read_npy_header(f)
    except ValueError as exc:
        raise UsageError(f"input {where!r} has a damaged .npy header ({exc})") from None
    if dtype.hasobject:
        raise UsageError(f"input {where!r} holds Python objects, which would need unpickling; refused")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in NUMERIC_KINDS \
            or dtype.itemsize == 0:
        raise UsageError(f"input {where!r} has dtype {dtype}: "
                         "not an array of plain numbers (structured, sub-array, byte-string, time or empty "
                         "dtypes are refused); save a float32 array")
    return shape, fortran, dtype


def _read_npy(f: IO[bytes], size: int, where: str, limit: int | None) -> np.ndarray:
    """One .npy array from an open file (or zip member) of `size` bytes: its header checked against `size`, the
    input cap and the budget before any data is read."""
    shape, fortran, dtype = _read_header(f, where)
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = size - f.tell()
    if declared != held:
        raise UsageError(f"input {where!r} declares shape {shape} of {dtype} ({declared} bytes) but holds {held} "
                         "bytes of data (truncated or damaged)")
    if limit is not None and declared > limit:
        raise BudgetError(f"input {where!r} declares {format_bytes(declared)} of data, over the memory budget "
                          f"{format_bytes(limit)} ({limit} B)")
    if declared > MAX_INPUT_BYTES:
        raise UsageError(f"input {where!r} declares {format_bytes(declared)} of data, over the "
                         f"{format_bytes(MAX_INPUT_BYTES)} one input may hold; run it in smaller batches")
    data = np.empty(declared // dtype.itemsize, dtype)
    view, done = memoryview(data).cast("B"), 0
    while done < held:
        n = f.readinto(view[done:])
        if not n:
            raise UsageError(f"input {where!r} ends after {done} of {held} bytes")
        done += n
    return data.reshape(shape, order="F" if fortran else "C")


def _read_npz(path: str, limit: int | None) -> np.ndarray:
    """The one array of an .npz; its member's npy header judged before the data is decompressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                names = [m.filename.removesuffix(".npy") for m in members]
                raise UsageError(f"input {path!r} holds {len(members)} arrays {names[:8]}; pass a .npy file or an "
                                 ".npz with exactly one array")
            with archive.open(members[0]) as f:
                return _read_npy(f, members[0].file_size, f"{path}:{members[0].filename}", limit)
    except UsageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error, RuntimeError,
            ValueError) as exc:  # RuntimeError: an encrypted member; zlib.error: damaged deflate data
        raise UsageError(f"input {path!r} is not a readable .npz archive ({exc})") from None
