"""8 threads × 1,000 calls with random tasks (a short 4 × 100 run in the quick set): every output equals that task's
reference, and nothing deadlocks."""
from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from edgecl.arch import preset
from edgecl.deltas import materialize
from edgecl.graph.builder import build_onnx
from edgecl.runtime import TaskRuntime
from edgecl.synthetic import random_packed

THREADS, CALLS = 8, 1000


@pytest.mark.slow
@pytest.mark.parametrize("strategy,cache,shape", [("inplace", 2, "lps"), ("inplace", 1, "lps"),
                                                 ("sessions", None, "lps"), ("inplace", 1, "lowrank")])
def test_threads_with_random_tasks(strategy, cache, shape):
    """`lowrank`: fc2 (256×256) is factored (vectors rebound per thread's binding), fc1 folded on a miss."""
    run_threads(strategy, cache, shape, THREADS, CALLS)


def test_a_few_threads_share_one_slot():
    run_threads("inplace", 1, "lps", 4, 100)


@pytest.mark.slow
def test_threads_reading_heads_on_misses(tmp_path):
    """From a file, heads live in the slots and are read from the artifact on a miss, by whichever thread fills."""
    run_threads("inplace", 2, "lps", THREADS, CALLS, tmp_path)


def test_a_few_threads_read_heads_into_one_slot(tmp_path):
    run_threads("inplace", 1, "lps", 4, 100, tmp_path)


def run_threads(strategy: str, cache: int | None, shape: str, n_threads: int, calls: int, folder=None) -> None:
    """`folder`: serve the model from an artifact written there, task tensors read on a miss, instead of memory."""
    packed = random_packed(preset("mlp"), n_tasks=5, classes=(10, 4, 6), shape=shape)
    inputs = np.random.default_rng(3).standard_normal((16, 2, 1, 8, 8)).astype(np.float32)
    expected = [[ort.InferenceSession(build_onnx(packed.arch, materialize(packed, t)).SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for x in inputs]
                for t in range(packed.n_tasks)]
    model = packed
    if folder is not None:
        from edgecl import artifact
        model = folder / "model.edgecl"
        artifact.save(packed, model)
    cached = {"task_tensors": "cached"} if folder is not None else {}
    runtime = TaskRuntime(model, strategy=strategy, cache_tasks=cache, threads=1, **cached)
    if folder is not None:
        assert {p.name for p in runtime.plans if p.plan == "read"} == {"head.weight", "head.bias"}
    failures: list[str] = []
    done = [0] * n_threads

    def worker(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        try:
            for _ in range(calls):
                t, i = int(rng.integers(packed.n_tasks)), int(rng.integers(len(inputs)))
                if rng.random() < 0.1:
                    runtime.switch(t)  # the shared default moves under other threads; they pass task= anyway
                y = runtime.infer(inputs[i], task=t)
                if y.shape != expected[t][i].shape or not np.allclose(y, expected[t][i], atol=1e-5, rtol=0):
                    failures.append(f"thread {k}: task {t} input {i} differs")
                done[k] += 1
        except Exception as exc:  # noqa: BLE001 - any exception is a failure to report
            failures.append(f"thread {k}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_threads)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 240
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), f"deadlock: calls done per thread {done}"
    assert not failures, failures[:5]
    assert sum(done) == n_threads * calls
    if shape == "lowrank":
        assert {p.name for p in runtime.plans if p.plan == "const"} == {"fc2.weight", "fc1.bias", "fc2.bias"}
        assert [p.name for p in runtime.varying] == ["fc1.weight"]
    if strategy == "inplace":
        info = runtime.cache_info()
        assert info["hits"] + info["misses"] >= n_threads * calls and info["misses"] > 1
