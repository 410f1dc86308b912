"""Multi-task models built in numpy without training, for tests and benchmarks: every delta kind at any size
(`random_packed`), and LPS models with an exact structured kept fraction (`structured_lps_model`), which a trained
model would only land near. Weights are random; only the structure matters for switching, export and compaction."""
from __future__ import annotations

import numpy as np

from edgecl.arch.spec import Arch, gemm_shape, param_shapes, prunable
from edgecl.deltas import PackedModel, TaskInfo

HEAD_SPECS = {"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}}


def random_head(rng: np.random.Generator, n_classes: int, feature_dim: int) -> dict[str, np.ndarray]:
    """A fan-in scaled random head for one task."""
    return {"head.weight": (rng.standard_normal((n_classes, feature_dim)) / np.sqrt(feature_dim)).astype(np.float32),
            "head.bias": (0.1 * rng.standard_normal(n_classes)).astype(np.float32)}


def random_share(rng: np.random.Generator, owner_elements: np.ndarray, t: int) -> np.ndarray:
    """Task t's LPS sharing mask: a random half of the elements owned by earlier tasks (C order)."""
    return rng.random(int(((owner_elements >= 1) & (owner_elements <= t)).sum())) < 0.5


SHAPES = ("lps", "finetune", "mixed", "node", "lowrank", "permute")


def random_packed(arch: Arch, n_tasks: int = 4, shape: str = "lps", classes: tuple[int, ...] = (10, 5),
                  seed: int = 0) -> PackedModel:
    """`lps`: element-wise LPS (disjoint owners, sharing masks over earlier support) on every prunable layer;
    `finetune`: one shared trunk; `mixed`: prunable layers cycle through lps / node / lowrank / permute / task kinds;
    `node`, `lowrank`, `permute`: every prunable layer of that kind (AGS-CL-, HALRP-, RGO-shaped).
    Heads are per task, with class counts cycling through `classes`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r} (known: {', '.join(SHAPES)})")
    rng = np.random.default_rng(seed)
    weights = prunable(arch)
    params, base = {}, {}
    tasks = [TaskInfo(f"task{t}", classes[t % len(classes)], seed=1000 + t) for t in range(n_tasks)]
    per_task: list[dict[str, np.ndarray]] = [{} for _ in range(n_tasks)]
    kinds = {"finetune": ["shared"], "mixed": ["lps", "node", "lowrank", "permute", "task"]}.get(shape, [shape])
    for name, dims in param_shapes(arch).items():
        w = (rng.standard_normal(dims) / np.sqrt(np.prod(dims[1:]) if len(dims) > 1 else 10)).astype(np.float32)
        if name.endswith("running_var"):  # a variance: positive (BatchNorm of a negative one is NaN)
            w = np.abs(w) + np.float32(0.5)
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
                tt[f"{name}:share"] = random_share(rng, owner, t)
        elif kind == "node":
            params[name]["rows"] = name
            for tt in per_task:
                tt[f"nodes:{name}"] = rng.random(dims[0]) < 0.7
        elif kind == "lowrank":
            rank = max(2, min(dims[:2]) // 64)  # HALRP-like: a few percent of the full rank
            for tt in per_task:
                tt[f"{name}:r"] = (1 + 0.1 * rng.standard_normal(dims[0])).astype(np.float32)
                tt[f"{name}:s"] = (1 + 0.1 * rng.standard_normal(dims[1])).astype(np.float32)
                tt[f"{name}:u"] = (0.01 * rng.standard_normal((dims[0], rank))).astype(np.float32)
                tt[f"{name}:v"] = (0.01 * rng.standard_normal((dims[1], rank))).astype(np.float32)
        elif kind == "permute":
            params[name]["group"] = name
    for info, tt in zip(tasks, per_task):
        tt.update(random_head(rng, info.n_classes, arch["feature_dim"]))
    params.update(HEAD_SPECS)
    return PackedModel(arch, shape, {"synthetic": True}, params, base, tasks, per_task)


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
    params.update(HEAD_SPECS)
    packed = PackedModel(arch, "lps", {"synthetic": True, "keep_fraction": keep_fraction, "unit": unit}, params, base,
                         [TaskInfo(f"task{t}", n_classes) for t in range(n_tasks)], [])
    for t in range(n_tasks):
        tensors = random_head(rng, n_classes, arch["feature_dim"])
        for name in weights:
            owner = packed.base[f"{name}:owner"]
            per_element = np.broadcast_to(owner.reshape((-1, 1) if unit == "row" else (1, -1)),
                                          gemm_shape(shapes[name]))
            tensors[f"{name}:share"] = random_share(rng, per_element, t)
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
