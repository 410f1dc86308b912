"""Structured-mask models built without training, for compaction tests and the inference benchmark: they let a
benchmark set the kept fraction exactly (a trained LPS model lands wherever its α and the data put it)."""
from __future__ import annotations

import numpy as np

from edgecl.arch import Arch, gemm_shape, param_shapes, prunable
from edgecl.deltas import PackedModel, TaskInfo


def structured_lps_model(arch: Arch, keep_fraction: float, n_tasks: int = 2, n_classes: int = 10,
                         unit: str = "column", seed: int = 0) -> PackedModel:
    """An LPS-kind PackedModel whose prunable layers own whole GEMM columns (or rows, `unit="row"`).

    Task 0 owns `keep_fraction` of every layer's units; each later task owns up to that fraction of the units still
    free and shares a random half of the earlier support (element-wise, as LPS's sharing masks are). Weights are
    random (fan-in scaled), biases are shared and of both signs, heads are per task and dense."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(arch)
    weights = set(prunable(arch))
    params, base = {}, {}
    for name, shape in shapes.items():
        if name in weights:
            fan_in = gemm_shape(shape)[1]
            base[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
            params[name] = {"kind": "lps", "unit": unit}
            base[f"{name}:owner"] = _owners(rng, gemm_shape(shape)[0 if unit == "row" else 1], keep_fraction,
                                            n_tasks)
        elif name.endswith("running_var"):
            base[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
            params[name] = {"kind": "shared"}
        else:
            base[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            params[name] = {"kind": "shared"}
    params["head.weight"] = {"kind": "task"}
    params["head.bias"] = {"kind": "task"}
    packed = PackedModel(arch, "lps", {"synthetic": True, "keep_fraction": keep_fraction, "unit": unit}, params, base,
                         [TaskInfo(f"task{t}", n_classes) for t in range(n_tasks)], [])
    feature_dim = arch["feature_dim"]
    for t in range(n_tasks):
        tensors = {"head.weight": (rng.standard_normal((n_classes, feature_dim)) / np.sqrt(feature_dim)).astype(
            np.float32), "head.bias": (0.1 * rng.standard_normal(n_classes)).astype(np.float32)}
        for name in weights:
            owner = packed.base[f"{name}:owner"]
            per_element = np.broadcast_to(owner.reshape((-1, 1) if unit == "row" else (1, -1)),
                                          gemm_shape(shapes[name]))
            earlier = int(((per_element >= 1) & (per_element <= t)).sum())
            tensors[f"{name}:share"] = rng.random(earlier) < 0.5
        packed.task_tensors.append(tensors)
    return packed


def _owners(rng: np.random.Generator, n_units: int, keep_fraction: float, n_tasks: int) -> np.ndarray:
    """Owner per unit (0 free, t+1 task t): each task claims round(keep_fraction·n) of the units still free."""
    owner = np.zeros(n_units, dtype=np.uint8)
    take = max(1, int(round(keep_fraction * n_units)))
    for t in range(n_tasks):
        free = np.flatnonzero(owner == 0)
        owner[rng.choice(free, size=min(take, len(free)), replace=False)] = t + 1
    return owner
