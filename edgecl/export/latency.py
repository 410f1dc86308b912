"""What compaction buys at run time: a task's dense and compacted graphs timed side by side in ONNX Runtime (CPU,
one thread, interleaved repeats, the median), at batch 1 and 64 — so `edgecl export --latency` reports per task
parameters *and* latency before/after. Ratios from one process are what to compare (machines here are noisy)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from edgecl.graph.builder import INPUT

BATCHES = (1, 64)


def compare_latency(dense: onnx.ModelProto, compact: onnx.ModelProto, input_shape: list[int], repeats: int = 7,
                    batches: tuple[int, ...] = BATCHES) -> dict[str, dict[str, float]]:
    """{"dense": {"1": ms, "64": ms}, "compact": {...}, "speedup": {...}}: median milliseconds per call."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {k: ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for k, m in (("dense", dense), ("compact", compact))}
    out: dict[str, dict[str, float]] = {"dense": {}, "compact": {}, "speedup": {}}
    for batch in batches:
        x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for session in sessions.values():
            session.run(None, {INPUT: x})  # warm: allocations and kernel selection
        for _ in range(repeats):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {INPUT: x})
                times[key].append(1000 * (time.perf_counter() - start))
        for key in sessions:
            out[key][str(batch)] = statistics.median(times[key])
        out["speedup"][str(batch)] = out["dense"][str(batch)] / out["compact"][str(batch)]
    return out
