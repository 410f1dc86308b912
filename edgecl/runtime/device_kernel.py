"""The device path's two raw kernels. The switch's:  ``out[i] = bit i of bits ? base[i] : +0.0`` (MSB-first bits, as
`numpy.packbits` writes them), on the float32 bit patterns, so the result is bit-identical to `deltas.materialize`
(``np.where(keep, base, +0.0)``: NaN payloads and -0.0 pass through where kept, +0.0 where not).

Why a raw kernel and not an ONNX graph run by ONNX Runtime's CUDA EP: ONNX has no bit-cast, and the CUDA EP has no
BitShift or Bitwise* kernels (docs/OperatorKernels.md), so unpacking 1-bit masks in a graph takes a cast, a divide, a
modulo, a cast to bool and a Where, each a pass over int32 or bool temporaries: ~5× the memory traffic of a copy,
against a goal of ≤ 2× one device-to-device copy. This kernel reads the base once, 1/32 of it in mask bits, and
writes the output once, in a single launch over every masked tensor of a model (`edgecl.runtime.device_fill` lays
them out in one buffer). CuPy compiles it (NVRTC) on first use.

The per-element function is plain C shared by both builds: `cuda_source()` wraps it in a grid-stride CUDA kernel;
`c_source()` wraps the *same text* in a C loop, which the tests compile with the host's C compiler, so the kernel's
arithmetic is checked bit for bit on a CPU-only machine too. `masked_select_numpy` is its numpy twin, what the
device path runs on the CPU (`TaskRuntime(resident="device")` on device "cpu").

The second, `FLAG_NAME`, is `infer`'s finiteness check, one launch per array: it writes the call's token into a flag where any element is inf or NaN, so one 4-byte read answers. `infer` checks a device batch
with it before the run (a refused batch must run nothing) and the logits after. It replaced CuPy reductions
(isfinite + all, each read back); on an H200 `infer` with them took 0.14-0.45 ms a call more than the session run
alone (tools/results/gpu_check_nvidia_h200.json, "runtime_ms" less "unchecked_ms"), more than a batch-1 MLP's
inference. Its element function is shared with a C twin in the same way."""
from __future__ import annotations

import numpy as np

KERNEL_NAME = "edgecl_masked_select"

# One element: base and out as uint32 bit patterns, bits MSB-first; `SELECT_FN` is `__device__` inline on CUDA,
# `static inline` in C. Indices are unsigned long long (NVRTC defines no size_t without headers).
ELEMENT = r"""
SELECT_FN unsigned int masked_element(const unsigned int *base, const unsigned char *bits, unsigned long long i) {
    return ((bits[i >> 3] >> (7u - (unsigned int)(i & 7u))) & 1u) ? base[i] : 0u;
}
"""


def cuda_source() -> str:
    """The CUDA kernel: a grid-stride loop over [0, n), one element per thread and step (coalesced loads and stores;
    eight neighbouring threads read the same mask byte, served from L1)."""
    return ("#define SELECT_FN __device__ __forceinline__\n" + ELEMENT + f"""
extern "C" __global__ void {KERNEL_NAME}(const unsigned int *base, const unsigned char *bits, unsigned int *out,
                                          unsigned long long n) {{
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = masked_element(base, bits, i);
}}
""")


def c_source() -> str:
    """The same element function in a C loop (for the tests: compiled with the host's C compiler, loaded by
    ctypes, compared bit for bit with `masked_select_numpy` and `deltas.materialize`)."""
    return ("#define SELECT_FN static inline\n" + ELEMENT + f"""
void {KERNEL_NAME}(const unsigned int *base, const unsigned char *bits, unsigned int *out, unsigned long long n) {{
    for (unsigned long long i = 0; i < n; i++)
        out[i] = masked_element(base, bits, i);
}}
""")


def masked_select_numpy(base: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
    """The kernel's numpy twin: `out` (float32, base's size) = where(unpack(bits), base, +0.0), on the bit patterns."""
    n = base.size
    keep = np.unpackbits(bits, count=n).view(bool)
    np.copyto(out.reshape(-1).view(np.uint32), np.where(keep, base.reshape(-1).view(np.uint32), np.uint32(0)))


FLAG_NAME = "edgecl_flag_nonfinite"

# One element: inf or NaN is an all-ones exponent in the float32 bit pattern.
NONFINITE = r"""
SELECT_FN unsigned int nonfinite_element(const unsigned int *a, unsigned long long i) {
    return (a[i] & 0x7f800000u) == 0x7f800000u;
}
"""


def _flag_body(prefix: str) -> str:
    return (prefix + NONFINITE + f"""
extern "C" KERNEL void {FLAG_NAME}(const unsigned int *a, unsigned long long n, unsigned int *flag,
                                    unsigned int token) {{
    for (unsigned long long i = FIRST; i < n; i += STRIDE)
        if (nonfinite_element(a, i))
            *flag = token;
}}
""")


def flag_cuda_source() -> str:
    """The finiteness kernel: a grid-stride loop over a; every thread that meets inf/NaN stores the same
    token (a benign race)."""
    return _flag_body("#define SELECT_FN __device__ __forceinline__\n#define KERNEL __global__\n"
                      "#define FIRST ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x)\n"
                      "#define STRIDE ((unsigned long long)blockDim.x * gridDim.x)\n")


def flag_c_source() -> str:
    """The same element function and loop in C (for the tests)."""
    return _flag_body("#define SELECT_FN static inline\n#define KERNEL\n#define FIRST 0\n#define STRIDE 1\n"
                      ).replace('extern "C" ', "")


def any_nonfinite_numpy(a: np.ndarray) -> bool:
    """The finiteness kernel's numpy twin."""
    return not bool(np.isfinite(a).all())
