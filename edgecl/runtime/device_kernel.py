"""The device path's raw kernels. The switch's:  ``out[i] = bit i of bits ? base[i] : +0.0`` (MSB-first bits, as
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

`SCALE_NAME` is the same select for weights a BatchNorm is folded into at a switch (`edgecl.runtime.fold_bn`): the
kept element times its output row's scale, one launch over every such tensor.

The last, `FLAG_NAME`, is `infer`'s finiteness check, one launch per array: it writes the call's token into a flag where any element is inf or NaN, so one 4-byte read answers. `infer` checks a device batch
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


SCALE_NAME = "edgecl_masked_scale"

# The same select where a BatchNorm is folded into the weight (`edgecl.runtime.fold_bn`): a kept element is the
# float32 product base · scale of its output row (one IEEE multiply, as numpy's), a dropped one +0.0. AS_FLOAT and
# AS_BITS reinterpret 32 bits (CUDA's intrinsics; a union in C).
SCALED_ELEMENT = r"""
SELECT_FN unsigned int scaled_element(const unsigned int *base, const unsigned char *bits, float scale,
                                      unsigned long long i) {
    return ((bits[i >> 3] >> (7u - (unsigned int)(i & 7u))) & 1u) ? AS_BITS(AS_FLOAT(base[i]) * scale) : 0u;
}
"""
# table: per segment four numbers — its first element, its rows, its row length, its first scale
_SCALE_LOOP = r"""
extern "C" KERNEL void {name}(const unsigned int *base, const unsigned char *bits, const float *scale,
                              unsigned int *out, const unsigned long long *table) {{
    SEGMENTS {{
        const unsigned long long *seg = table + 4ull * s;
        unsigned long long offset = seg[0], rows = seg[1], row_len = seg[2];
        const float *row_scale = scale + seg[3];
        for (unsigned long long row = FIRST_ROW; row < rows; row += ROW_STRIDE)
            for (unsigned long long col = FIRST_COL; col < row_len; col += COL_STRIDE) {{
                unsigned long long i = offset + row * row_len + col;
                out[i] = scaled_element(base, bits, row_scale[row], i);
            }}
    }}
}}
"""


def scale_cuda_source() -> str:
    """The scaled select as a CUDA kernel: grid (rows, segments), one block per row of a segment (its scale read
    once), the block's threads along the row (coalesced); no division per element."""
    return ("#define SELECT_FN __device__ __forceinline__\n#define KERNEL __global__\n"
            "#define AS_FLOAT(u) __uint_as_float(u)\n#define AS_BITS(f) __float_as_uint(f)\n"
            "#define SEGMENTS unsigned long long s = blockIdx.y;\n"
            "#define FIRST_ROW ((unsigned long long)blockIdx.x)\n#define ROW_STRIDE ((unsigned long long)gridDim.x)\n"
            "#define FIRST_COL ((unsigned long long)threadIdx.x)\n#define COL_STRIDE ((unsigned long long)blockDim.x)\n"
            + SCALED_ELEMENT + _SCALE_LOOP.format(name=SCALE_NAME))


def scale_c_source() -> str:
    """The same element function and loops in C (for the tests); `segments` is one more argument there."""
    return ("#define SELECT_FN static inline\n#define KERNEL\n"
            "static inline float AS_FLOAT(unsigned int u) { union { unsigned int u; float f; } v; v.u = u; return v.f; }\n"
            "static inline unsigned int AS_BITS(float f) { union { unsigned int u; float f; } v; v.f = f; return v.u; }\n"
            "#define SEGMENTS for (unsigned long long s = 0; s < segments; s++)\n"
            "#define FIRST_ROW 0\n#define ROW_STRIDE 1\n#define FIRST_COL 0\n#define COL_STRIDE 1\n"
            + SCALED_ELEMENT + _SCALE_LOOP.format(name=SCALE_NAME).replace('extern "C" ', "").replace(
                "const unsigned long long *table)",
                "const unsigned long long *table,\n                              unsigned long long segments)"))


def masked_scale_numpy(base: np.ndarray, bits: np.ndarray, scale: np.ndarray, out: np.ndarray,
                       table: np.ndarray) -> None:
    """The scaled kernel's numpy twin over the segments of `table` ((segments, 4) uint64, as the kernel reads it):
    out = where(bit, base · scale of the row, +0.0) in float32."""
    flat = out.reshape(-1)
    for offset, rows, row_len, first in table.tolist():
        n = rows * row_len
        keep = np.unpackbits(bits[offset // 8:], count=n).view(bool).reshape(rows, row_len)
        product = base.reshape(-1)[offset:offset + n].reshape(rows, row_len) * scale[first:first + rows, None]
        flat[offset:offset + n] = np.where(keep, product, np.float32(0.0)).reshape(-1)


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
