"""Random tensors for a spec: what the torch-free graph tests (compaction, channel fuzzing) feed the ONNX builder."""
from __future__ import annotations

import numpy as np

from edgecl.arch import param_shapes


def random_params(arch: dict, n_classes: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal trunk and head tensors of `arch` (BatchNorm variances in [0.5, 2]), float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(arch, n_classes).items():
        if name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out
