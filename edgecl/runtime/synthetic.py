"""Random multi-task models in numpy (no training), shaped like what each method packs, so runtime tests and benchmarks
can cover every delta kind at any size. Weights are random; only the structure matters for switching."""
from __future__ import annotations

import numpy as np

from edgecl.arch import Arch, param_shapes, prunable
from edgecl.deltas import PackedModel, TaskInfo

SHAPES = ("lps", "finetune", "mixed")


def random_packed(arch: Arch, n_tasks: int = 4, shape: str = "lps", classes: tuple[int, ...] = (10, 5),
                  seed: int = 0) -> PackedModel:
    """`lps`: element-wise LPS (disjoint owners, sharing masks over earlier support) on every prunable layer;
    `finetune`: one shared trunk; `mixed`: prunable layers cycle through lps / node / lowrank / permute / task kinds.
    Heads are per task, with class counts cycling through `classes`."""
    rng = np.random.default_rng(seed)
    weights = prunable(arch)
    params, base = {}, {}
    tasks = [TaskInfo(f"task{t}", classes[t % len(classes)], seed=1000 + t) for t in range(n_tasks)]
    per_task: list[dict[str, np.ndarray]] = [{} for _ in range(n_tasks)]
    kinds = {"lps": ["lps"], "finetune": ["shared"], "mixed": ["lps", "node", "lowrank", "permute", "task"]}[shape]
    for name, dims in param_shapes(arch).items():
        w = (rng.standard_normal(dims) / np.sqrt(np.prod(dims[1:]) if len(dims) > 1 else 10)).astype(np.float32)
        kind = kinds[weights.index(name) % len(kinds)] if name in weights else "shared"
        params[name] = {"kind": kind}
        if kind == "task":
            for tt in per_task:
                tt[name] = (w + 0.01 * rng.standard_normal(dims)).astype(np.float32)
            continue
        base[name] = w
        if kind == "lps":
            owner = rng.integers(0, n_tasks + 1, size=dims).astype(np.uint8)
            w[owner == 0] = 0
            base[f"{name}:owner"] = owner
            for t, tt in enumerate(per_task):
                tt[f"{name}:share"] = rng.random(int(((owner >= 1) & (owner <= t)).sum())) < 0.5
        elif kind == "node":
            params[name]["rows"] = name
            for tt in per_task:
                tt[f"nodes:{name}"] = rng.random(dims[0]) < 0.7
        elif kind == "lowrank":
            for tt in per_task:
                tt[f"{name}:r"] = (1 + 0.1 * rng.standard_normal(dims[0])).astype(np.float32)
                tt[f"{name}:s"] = (1 + 0.1 * rng.standard_normal(dims[1])).astype(np.float32)
                tt[f"{name}:u"] = (0.01 * rng.standard_normal((dims[0], 2))).astype(np.float32)
                tt[f"{name}:v"] = (0.01 * rng.standard_normal((dims[1], 2))).astype(np.float32)
        elif kind == "permute":
            params[name]["group"] = name
    feature = arch["feature_dim"]
    for info, tt in zip(tasks, per_task):
        tt["head.weight"] = (rng.standard_normal((info.n_classes, feature)) / np.sqrt(feature)).astype(np.float32)
        tt["head.bias"] = (0.1 * rng.standard_normal(info.n_classes)).astype(np.float32)
    params["head.weight"] = {"kind": "task"}
    params["head.bias"] = {"kind": "task"}
    return PackedModel(arch, shape, {"synthetic": True}, params, base, tasks, per_task)
