"""Writing a task's weights from a 1-bit keep mask: ``out = where(unpack(bits), base, +0.0)``, bit for bit as
`deltas.materialize` defines it. This is the whole cost of an element-wise LPS task switch, so it has a compiled
loop (`_maskfill.c`, built by `pip install` where a C compiler exists, loaded through ctypes, which releases the GIL)
and a numpy fallback. The loop comes in two builds, "c-stream" (the base read with a non-temporal prefetch, which
keeps the written weights in the last-level cache for the next inference: faster overall on an AMD EPYC) and "c"
(no prefetch: on an AVX-512 Intel Xeon the prefetch made the loop 2× slower than a copy, 2.4 ms against 1.25 ms for
4.2 M weights); the stream build is used on AMD CPUs, the plain one elsewhere. ``EDGECL_MASKFILL=numpy|c|c-stream``
forces one."""
from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

from edgecl.machine import cpuinfo

CHUNK = 1 << 18  # numpy path: elements per chunk, so the unpacked mask stays in L2 while base and out stream through


def _load_kernel():
    try:
        spec = importlib.util.find_spec("edgecl.runtime._maskfill")
    except ImportError:
        spec = None
    if spec is None or not spec.origin:
        STATUS["why"] = "not built: the install found no C compiler (or edgecl runs from a source tree not installed)"
        return None
    STATUS["library"] = spec.origin
    try:
        lib = ctypes.CDLL(spec.origin)
        init, loops = lib.edgecl_maskfill_init, {"c": lib.edgecl_masked_copy, "c-stream": lib.edgecl_masked_copy_stream}
    except (OSError, AttributeError) as exc:  # not loadable here, or a stale build without these symbols
        STATUS["why"] = f"built but not loadable: {exc}"
        return None
    init.restype = None
    init()  # fill the lookup table once, before any thread uses it
    for fn in loops.values():
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        fn.restype = None
    scaled = getattr(lib, "edgecl_masked_scale", None)  # absent from a build older than blocked convolutions
    if scaled is not None:
        scaled.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_size_t] * 4
        scaled.restype = None
        SCALED.append(scaled)
    return loops


def _numpy_fill(base: np.ndarray, bits: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    base_bits, out_bits = base.reshape(-1).view(np.int32), out.reshape(-1).view(np.int32)
    for start in range(lo, hi, CHUNK):  # int32 × 0/1, not a float product: that gives -0.0, and inf·0 = NaN
        stop = min(start + CHUNK, hi)
        keep = np.unpackbits(bits[start // 8:(stop + 7) // 8], count=stop - start)
        np.multiply(base_bits[start:stop], keep, out=out_bits[start:stop])


def _c_fill(kernel):
    def fill(base: np.ndarray, bits: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
        kernel(base.ctypes.data, bits.ctypes.data, out.ctypes.data, lo, hi)
    return fill


STATUS: dict[str, str | None] = {"library": None, "why": None}  # for `edgecl doctor`
SCALED: list = []  # the compiled scaled fill, when the build has it
_LOOPS = _load_kernel()
IMPLEMENTATIONS = {"numpy": _numpy_fill, **{name: _c_fill(fn) for name, fn in (_LOOPS or {}).items()}}
_FORCED = os.environ.get("EDGECL_MASKFILL", "").lower()


CPU_VENDOR = cpuinfo("vendor_id")  # "AuthenticAMD", "GenuineIntel", … where Linux tells it, else ""


def _default_build() -> str:
    """`c-stream` on AMD CPUs, `c` elsewhere: measured on one machine of each (module docstring). Timing both at run
    time was tried and was not reliable: on the Xeon the plain loop needs ~4 runs to reach its speed and the stream
    build sometimes ran fast for a run or two after a copy, so a short calibration picked either."""
    return "c-stream" if CPU_VENDOR == "AuthenticAMD" else "c"


# what `masked_copy` uses (recorded by the benchmarks)
IMPLEMENTATION = _FORCED if _FORCED in IMPLEMENTATIONS else _default_build() if _LOOPS else "numpy"
if _FORCED and _FORCED not in IMPLEMENTATIONS:
    STATUS["why"] = f"EDGECL_MASKFILL={_FORCED!r} is not one of {', '.join(sorted(IMPLEMENTATIONS))}; ignored"
elif _FORCED:
    STATUS["why"] = f"EDGECL_MASKFILL={_FORCED} is set"
if _LOOPS:
    STATUS["build"] = f"c-stream on AMD CPUs, c elsewhere; this CPU: {CPU_VENDOR or 'vendor unknown'}"


def masked_copy(base: np.ndarray, bits: np.ndarray, out: np.ndarray, lo: int = 0, hi: int | None = None,
                implementation: str | None = None) -> None:
    """Write elements [lo, hi) of `out` (float32, contiguous, base's size) from `base` where the MSB-first `bits`
    are set and +0.0 elsewhere. `lo` must be a multiple of 8 (ranges start on a byte of `bits`)."""
    hi = base.size if hi is None else hi
    _check(base, bits, out, lo, hi)
    IMPLEMENTATIONS[implementation or IMPLEMENTATION](base, bits, out, lo, hi)


def _check(base: np.ndarray, bits: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """The compiled loop trusts its pointers: every call is checked here, cheaply, first."""
    for name, a, dtype in (("base", base, np.float32), ("out", out, np.float32), ("bits", bits, np.uint8)):
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"masked_copy: {name} must be a C-contiguous {np.dtype(dtype).name} array, "
                             f"got {a.dtype} (contiguous: {a.flags.c_contiguous})")
    if np.may_share_memory(base, out):
        raise ValueError("masked_copy: out must not overlap base (the compiled loop assumes separate memory)")
    if out.size != base.size or not out.flags.writeable:
        raise ValueError(f"masked_copy: out must be a writable array of {base.size} elements, got {out.size}")
    if bits.size * 8 < base.size:
        raise ValueError(f"masked_copy: {bits.size} mask bytes cover {bits.size * 8} elements, base has {base.size}")
    if not (0 <= lo <= hi <= base.size) or lo % 8:
        raise ValueError(f"masked_copy: range [{lo}, {hi}) must lie in [0, {base.size}] and start on a multiple of 8")


def masked_scale(base: np.ndarray, bits: np.ndarray, scale: np.ndarray, out: np.ndarray, block: int,
                 lo: int = 0, hi: int | None = None) -> None:
    """`masked_copy`, then elements [lo, hi) times the per-output-channel `scale` of a weight in blocked order
    ((O/block, inner/block, block) with the output channel lane last, `edgecl.runtime.blocked_plans`): one compiled
    pass where the build has it (a fill and a multiply would read and write the weight twice)."""
    hi = base.size if hi is None else hi
    _check(base, bits, out, lo, hi)
    inner = base.size // (scale.size // block)
    if scale.dtype != np.float32 or not scale.flags.c_contiguous or scale.size % block or inner % block \
            or inner * (scale.size // block) != base.size:
        raise ValueError(f"masked_scale: scale of {scale.size} float32 in blocks of {block} does not cover "
                         f"{base.size} elements")
    if SCALED and IMPLEMENTATION != "numpy":
        SCALED[0](base.ctypes.data, bits.ctypes.data, scale.ctypes.data, out.ctypes.data, lo, hi, inner, block)
        return
    first, last = lo // inner, -(-hi // inner)  # the blocks of output channels [lo, hi) touches
    flat_base, flat_out = base.reshape(-1), out.reshape(-1)
    for ob in range(first, last):  # where(keep, base·s, +0.0): a dropped weight is +0.0 whatever the sign of s
        a, b = max(lo, ob * inner), min(hi, (ob + 1) * inner)  # a: a multiple of 8 (lo and inner are)
        keep = np.unpackbits(bits[a // 8:(b + 7) // 8], count=b - a).view(bool)
        scaled = flat_base[a:b] * scale[ob * block + np.arange(a, b) % block]
        np.copyto(flat_out[a:b], np.where(keep, scaled, np.float32(0.0)))
