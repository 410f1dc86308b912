/* The runtime's one hot loop that numpy cannot fuse: out[i] = bit i of `bits` ? base[i] : +0.0 (MSB-first bits, as
 * numpy.packbits writes them), on the float32 bit patterns so the result is bit-identical to deltas.materialize.
 * numpy needs an unpack, a cast and a multiply for this (2.3-2.6x a memcpy of the weights); one pass through an 8 KB
 * table of 0 / ~0 words is 1.0-1.2x (tools/bench_switch.py). Plain C with no Python API: loaded through ctypes, which
 * releases the GIL, so several threads can fill ranges of one tensor.
 *
 * Two builds of the loop. `edgecl_masked_copy_stream` reads the base with a non-temporal prefetch: it is streamed
 * once per switch and would otherwise push the freshly written weights out of the last-level cache, which the
 * inference right after the switch reads (measured on an AMD EPYC, 4.35 M-weight LPS MLP, batch 1: 0.30-0.38 ms
 * instead of 0.43-0.47 ms; per-task dense sessions 0.37-0.51 ms). On an AVX-512 Intel Xeon the same prefetch halves
 * the loop's speed (2.6 ms instead of 1.3 ms, a memcpy 1.27 ms, for 4.3 M weights), so `edgecl_masked_copy` has no
 * prefetch; maskfill.py uses the stream build on AMD CPUs and this one elsewhere. */
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH_STREAM(p) __builtin_prefetch((p), 0, 0)
#else
#define PREFETCH_STREAM(p) ((void)0)
#endif
#define AHEAD 1024 /* elements: 4 KB ahead of the loop */

static uint32_t table[256][8];

void edgecl_maskfill_init(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++)
            table[b][j] = ((b >> (7 - j)) & 1) ? 0xFFFFFFFFu : 0u;
}

/* Elements [lo, hi); lo is a multiple of 8 so each range starts on a byte of `bits`. */
#define MASKED_COPY_BODY(PREFETCH)                                                                     \
    size_t i = lo;                                                                                     \
    for (; i + 8 <= hi; i += 8) {                                                                      \
        if (PREFETCH && (i & 15) == 0 && i + AHEAD < hi)                                               \
            PREFETCH_STREAM(base + i + AHEAD); /* one per 64-byte line */                              \
        const uint32_t *m = table[bits[i >> 3]];                                                       \
        for (int j = 0; j < 8; j++)                                                                    \
            out[i + j] = base[i + j] & m[j];                                                           \
    }                                                                                                  \
    for (; i < hi; i++)                                                                                \
        out[i] = base[i] & table[bits[i >> 3]][i & 7];

void edgecl_masked_copy(const uint32_t *restrict base, const uint8_t *restrict bits, uint32_t *restrict out,
                        size_t lo, size_t hi) {
    MASKED_COPY_BODY(0)
}

void edgecl_masked_copy_stream(const uint32_t *restrict base, const uint8_t *restrict bits, uint32_t *restrict out,
                               size_t lo, size_t hi) {
    MASKED_COPY_BODY(1)
}

/* The same fill with a per-output-channel scale, for a convolution weight in ONNX Runtime's blocked (NCHWc) order
 * with a task's BatchNorm folded in (edgecl/runtime/blocked_plans.py): out[i] = bit i ? base[i] * scale[c(i)] : +0.0,
 * where the output channel of element i is (i / inner) * block + i % block (`inner`: elements per block of output
 * channels, a multiple of `block`; `block` 8 or 16, so 8 elements starting at a multiple of 8 share one block).
 * One pass instead of a fill and a multiply over the weight. */
void edgecl_masked_scale(const float *restrict base, const uint8_t *restrict bits, const float *restrict scale,
                         uint32_t *restrict out, size_t lo, size_t hi, size_t inner, size_t block) {
    size_t i = lo;
    while (i < hi) {
        const size_t ob = i / inner, end = (ob + 1) * inner < hi ? (ob + 1) * inner : hi; /* one division a block */
        const float *sb = scale + ob * block;
        for (; i + 8 <= end; i += 8) {
            const float *s = sb + (i & (block - 1)); /* block: a power of two */
            const uint32_t *m = table[bits[i >> 3]];
            for (int j = 0; j < 8; j++) {
                float v = base[i + j] * s[j];
                uint32_t u;
                __builtin_memcpy(&u, &v, 4);
                out[i + j] = u & m[j];
            }
        }
        for (; i < end; i++) {
            float v = base[i] * sb[i & (block - 1)];
            uint32_t u;
            __builtin_memcpy(&u, &v, 4);
            out[i] = u & table[bits[i >> 3]][i & 7];
        }
    }
}
