"""`edgecl run` as one library call: one task of an artifact on an input file — logits written, labels printed — or
timed on random input (`benchmark`), the way trtexec and ONNX Runtime's perf tool time a model. Torch-free."""
from __future__ import annotations

import io
import os
import time
from typing import Any, Callable

import numpy as np

from edgecl.checks import MAX_BATCH, MAX_BENCHMARK, check_int, check_path, refuse_overwrite
from edgecl.errors import UsageError
from edgecl.io import write_atomic
from edgecl.runtime.budget import refuse_device_budget_off_gpu
from edgecl.runtime.inputs import load_input
from edgecl.runtime.task_runtime import TaskRuntime

WARMUP = 10  # untimed runs before a benchmark: the first calls allocate ONNX Runtime's arena and bindings


def run_task(artifact: Any, task: int | str, *, input: str | None = None, output: str | None = None,
             labels: bool = False, benchmark: int = 0, batch: int | None = None, device: str = "cpu",
             backend: str = "auto",
             budget: int | str | None = None, device_budget: int | str | None = None, cuda_graph: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `task` on the array in `input` (logits saved to `output`, argmax labels logged unless only logits were
    asked for) and/or `benchmark` timed runs on random input of `batch` (or on `input`). Returns what was done:
    ``{"task", "logits"?, "latency_ms"?}``. UsageError for bad arguments or files, as everywhere."""
    check_int(benchmark, "--benchmark", 0, MAX_BENCHMARK)
    if batch is not None and input is not None:
        raise UsageError(f"--batch {batch} sizes the random --benchmark input; with --input the batch is the file's "
                         "first dimension: drop --batch")
    batch = 1 if batch is None else batch
    check_int(batch, "--batch", 1, MAX_BATCH)
    if input is None and not benchmark:
        raise UsageError("give --input FILE (a .npy array), or --benchmark N to time the task on random input")
    refuse_device_budget_off_gpu(device_budget, device)
    if cuda_graph and device != "cuda":
        raise UsageError(f"--cuda-graph applies to --device cuda (it replays CUDA graphs); drop it with --device "
                         f"{device}")
    artifact_path = check_path(artifact, "artifact") if isinstance(artifact, (str, os.PathLike)) else None
    if output is not None:
        output = npy_path(check_path(output, "--output"))
        refuse_overwrite([("--output", output)], [("--input", input), ("artifact", artifact_path)])
    x = None if input is None else load_input(input, budget)
    max_batch = batch if x is None else max(1, len(x)) if x.ndim else 1
    runtime = TaskRuntime(artifact, backend=backend, device=device, budget=budget, strategy="inplace",
                          cache_tasks=1, max_batch=max_batch, device_budget=device_budget, cuda_graph=cuda_graph)
    t = runtime.switch(task)
    name = f"task {t} ({runtime.tasks[t]})"
    done: dict[str, Any] = {"task": t}
    if x is not None:
        try:
            logits = done["logits"] = runtime.infer(x)
        except UsageError as exc:  # the file and the task it was fed to, beside what was wrong with the array
            raise UsageError(f"--input {input} for {name}: {exc}") from None
        if output:
            path = _save_npy(output, logits)
            log(f"{name}: logits {logits.shape} written to {path}")
        if labels or not output:
            log(" ".join(str(int(c)) for c in logits.argmax(1)))
    if benchmark:
        data = x if x is not None else np.random.default_rng(0).random((batch, *runtime.input_shape), np.float32)
        done["latency_ms"] = timings = time_inference(runtime, t, data, benchmark)
        log(format_latency(name, timings, len(data), runtime.strategy))
    runtime.close()
    return done


def npy_path(path: str) -> str:
    """Where np.save puts `path`: ".npy" appended unless it ends so (in any case: y.NPY stays y.NPY). A folder is
    refused: np.save would write <folder>.npy beside it."""
    if os.path.isdir(path):
        raise UsageError(f"--output {path} is a folder; give a file name such as {os.path.join(path, 'logits.npy')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path}: its folder {folder} does not exist or is not writable")
    return path if path.lower().endswith(".npy") else f"{path}.npy"


def _save_npy(path: str, array: np.ndarray) -> str:
    """`array` as a .npy file at `path` (already `npy_path`'s), written atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(path, buffer.getvalue())
    return os.fspath(path)


def time_inference(runtime: TaskRuntime, t: int, x: np.ndarray, n: int) -> dict[str, float]:
    """Latency percentiles (ms) of `n` inferences of task t on `x`, after `WARMUP` untimed ones."""
    for _ in range(min(WARMUP, n)):
        runtime.infer(x, task=t)
    ms = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        runtime.infer(x, task=t)
        ms[i] = 1000 * (time.perf_counter() - start)
    return {"runs": n, "mean": float(ms.mean()), "min": float(ms.min()),
            **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}, "max": float(ms.max())}


def format_latency(name: str, ms: dict[str, float], batch: int, strategy: str) -> str:
    """One line: the percentiles and the throughput they imply."""
    return (f"{name}: {ms['runs']} runs at batch {batch} ({strategy}, after {min(WARMUP, ms['runs'])} warm-up): "
            f"mean {ms['mean']:.3f} ms, min {ms['min']:.3f}, p50 {ms['p50']:.3f}, p90 {ms['p90']:.3f}, "
            f"p99 {ms['p99']:.3f}, max {ms['max']:.3f} ms; {1000 * batch / ms['p50']:,.0f} samples/s at p50")
