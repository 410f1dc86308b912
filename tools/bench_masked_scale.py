"""The blocked-conv switch's fill with a per-task BatchNorm scale, against the plain masked fill and a copy.

    python tools/bench_masked_scale.py [--weights 9437184] [--block 16] [--repeats 60] \
        [--out tools/results/bench_masked_scale.json]

A blocked convolution weight whose BatchNorm differs among tasks is written at a switch as
``where(keep, base · scale[channel], 0)`` (`maskfill.masked_scale`, one compiled pass). Timed, interleaved in the same
process: `np.copyto` of the weight (the floor), `masked_copy` (what an LPS switch writes without the scale), the
scaled fill, and the two-pass alternative (masked copy, then a multiply over the buffer). Medians; ratios are the
claim (a shared machine)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from edgecl.machine import machine_info
from edgecl.runtime import maskfill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=int, default=512 * 512 * 9 * 4, help="elements (a multiple of 8 · block)")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--out", default="bench_masked_scale.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n, block = args.weights, args.block
    base = rng.standard_normal(n).astype(np.float32)
    bits = np.packbits(rng.random(n) < 0.5)
    out = np.empty(n, np.float32)
    scale = rng.standard_normal(max(block, n // 4608 // block * block)).astype(np.float32)  # ~4608 per channel
    variants = {
        "copy": lambda: np.copyto(out, base),
        "masked_copy": lambda: maskfill.masked_copy(base, bits, out),
        "masked_scale": lambda: maskfill.masked_scale(base, bits, scale, out, block),
        "masked_copy_then_multiply": lambda: (maskfill.masked_copy(base, bits, out),
                                              out.reshape(scale.size // block, -1, block).__imul__(
                                                  scale.reshape(-1, 1, block))),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ratios = {f"{k}_over_masked_copy": v / ms["masked_copy"] for k, v in ms.items()}
    ratios.update({f"{k}_over_copy": v / ms["copy"] for k, v in ms.items()})
    print({k: round(v, 3) for k, v in ms.items()}, {k: round(v, 2) for k, v in ratios.items()})
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "maskfill": maskfill.IMPLEMENTATION,
                   "scaled_compiled": bool(maskfill.SCALED), "args": vars(args), "ms": ms, "ratios": ratios}, f,
                  indent=2)


if __name__ == "__main__":
    main()
