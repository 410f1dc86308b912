"""Does a batch size that changes from call to call slow ONNX Runtime's CUDA EP, for the runtime and a dense session
alike? (It does, on convolutions: tools/results/gpu_batch_probe_nvidia_h200.json.)

    python tools/gpu_batch_probe.py                       # the CUDA EP's default cuDNN algorithm search (EXHAUSTIVE)
    ALGO=HEURISTIC python tools/gpu_batch_probe.py        # or DEFAULT: another `cudnn_conv_algo_search`

Per preset: the median time of one call at a fixed batch of 4, and with the batch cycling 1, 4, 16, for the
device-resident runtime (`infer` on a host batch) and a dense CUDA session of the same task (a device batch).
Needs a GPU with the `gpu` extra."""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgecl.runtime.inplace as inplace  # noqa: E402
import edgecl.runtime.providers as providers  # noqa: E402
import tools.gpu_check as gpu_check  # noqa: E402
from edgecl.arch import preset  # noqa: E402
from edgecl.runtime import TaskRuntime  # noqa: E402
from edgecl.runtime.device_arrays import backend_for  # noqa: E402
from edgecl.runtime.providers import resolve_providers  # noqa: E402
from edgecl.synthetic import random_packed  # noqa: E402
from tools.gpu_check import DenseSession  # noqa: E402

_plain = providers.session_providers


def with_algo_search(chosen, cuda_graph=False):
    """`session_providers` with the CUDA EP's `cudnn_conv_algo_search` set to $ALGO."""
    return [(p[0], {**p[1], "cudnn_conv_algo_search": os.environ["ALGO"]}) if isinstance(p, tuple) else p
            for p in _plain(chosen, cuda_graph)]


if os.environ.get("ALGO"):
    providers.session_providers = inplace.session_providers = gpu_check.session_providers = with_algo_search

for arch in ("lenet", "resnet"):
    packed = random_packed(preset(arch), n_tasks=2, shape="lps", classes=(10, 3))
    runtime = TaskRuntime(packed, device="cuda", cache_tasks=2)
    arrays = backend_for("cuda")
    dense = DenseSession(packed, 0, resolve_providers("auto", "cuda"), arrays, False)
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal((b, *packed.arch["input_shape"])).astype(np.float32) for b in (1, 4, 16)}
    on_device = {b: arrays.upload(x) for b, x in xs.items()}
    row = {}
    for mode, sizes in (("fixed", [4] * 60), ("cycling", [1, 4, 16] * 20)):
        for name, call in (("runtime", lambda b: runtime.infer(xs[b], task=0)),
                           ("dense", lambda b: arrays.to_host(dense.run(on_device[b])))):
            for b in (1, 4, 16):
                call(b)
                call(b)
            times = []
            for b in sizes:
                start = time.perf_counter()
                call(b)
                arrays.synchronize()
                times.append(time.perf_counter() - start)
            row[f"{name} {mode}"] = 1e3 * float(np.median(times))
    print(arch, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
