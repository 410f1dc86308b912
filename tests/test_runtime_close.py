"""`TaskRuntime.close()` while other threads infer: each of them stops with the typed "closed" error, never a raw
AttributeError from a session dropped under it (a call that had pinned its slot before the close read the
strategy's session afterwards). Host path, device path on its numpy twin, and the CUDA-graph layout."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from test_runtime import DEEP

from edgecl.errors import UsageError
from edgecl.runtime import TaskRuntime
from edgecl.synthetic import random_packed


@pytest.mark.parametrize("options", [{}, {"resident": "device"}, {"resident": "device", "cuda_graph": True}])
def test_close_while_threads_infer_stops_each_with_the_closed_error(options):
    packed = random_packed(DEEP, n_tasks=4, shape="mixed", classes=(5, 3))
    x = np.ones((1, *DEEP["input_shape"]), np.float32)
    for _ in range(6):  # the race needs a call between its pin and its read of the session: try a few closes
        runtime = TaskRuntime(packed, cache_tasks=2, strategy="inplace", **options)
        started, errors = threading.Barrier(5), []

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            started.wait()
            try:
                while True:
                    runtime.infer(x, task=int(rng.integers(4)))
            except Exception as exc:  # what each thread ends with
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        started.wait()
        threading.Event().wait(0.05)
        runtime.close()
        for thread in threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in threads)
        assert [type(e) for e in errors] == [UsageError] * 4, [repr(e) for e in errors]
        assert all("closed" in str(e) for e in errors)
