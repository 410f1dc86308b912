"""Multi-task models built in numpy without training, for tests and benchmarks: every delta kind at any size
(`random_packed`), and LPS models with an exact structured kept fraction (`structured_lps_model`), which a trained
model would only land near, and AGS-CL-shaped node masks over the channel groups of a graph (`group_node_masks` on
tensors, `group_node_model` as a multi-task model).
Weights are random; only the structure matters for switching, export and compaction."""
from __future__ import annotations

import numpy as np

from edgecl.arch.channels import ChannelMap, channel_map
from edgecl.arch.spec import INPUT, WEIGHT_OPS, Arch, gemm_shape, node_by_name, param_shapes, prunable
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
                  seed: int = 0, bn: str = "shared") -> PackedModel:
    """`lps`: element-wise LPS (disjoint owners, sharing masks over earlier support) on every prunable layer;
    `finetune`: one shared trunk; `mixed`: prunable layers cycle through lps / node / lowrank / permute / task kinds;
    `node`, `lowrank`, `permute`: every prunable layer of that kind (AGS-CL-, HALRP-, RGO-shaped).
    Heads are per task, with class counts cycling through `classes`. `bn="task"`: every BatchNorm's four tensors are
    the task's own (LPS's default, ``batchnorm="task"``), else shared."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r} (known: {', '.join(SHAPES)})")
    rng = np.random.default_rng(seed)
    weights = prunable(arch)
    params, base = {}, {}
    tasks = [TaskInfo(f"task{t}", classes[t % len(classes)], seed=1000 + t) for t in range(n_tasks)]
    per_task: list[dict[str, np.ndarray]] = [{} for _ in range(n_tasks)]
    kinds = {"finetune": ["shared"], "mixed": ["lps", "node", "lowrank", "permute", "task"]}.get(shape, [shape])
    task_bn = {f"{n['name']}.{k}" for n in arch["nodes"] if n["op"] == "bn" and bn == "task"
               for k in ("weight", "bias", "running_mean", "running_var")}
    for name, dims in param_shapes(arch).items():
        w = (rng.standard_normal(dims) / np.sqrt(np.prod(dims[1:]) if len(dims) > 1 else 10)).astype(np.float32)
        if name.endswith("running_var"):  # a variance: positive (BatchNorm of a negative one is NaN)
            w = np.abs(w) + np.float32(0.5)
        kind = kinds[weights.index(name) % len(kinds)] if name in weights else "task" if name in task_bn else "shared"
        params[name] = {"kind": kind}
        if kind == "task":
            for tt in per_task:
                tt[name] = (w + (0.1 if name in task_bn else 0.01) * rng.standard_normal(dims)).astype(np.float32)
                if name.endswith("running_var"):
                    tt[name] = np.abs(tt[name])
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


def group_node_masks(arch: Arch, params: dict[str, np.ndarray], alive_fraction: float, seed: int = 0,
                     columns: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """AGS-CL-shaped structure on any graph: per channel group (`edgecl.arch.channel_map`) a random `alive_fraction`
    of its channels (at least one) is alive; every conv/linear row and bias of a dead channel and every column that
    reads one (heads included) is +0.0, as `materialize` leaves node masks. The network input and one-channel groups
    stay alive; BatchNorm tensors are untouched. `columns=False` zeroes the rows only (dead channels then carry their
    bias or BatchNorm constant to readers that still read them). Returns (a masked copy of `params`, the alive
    channels per group)."""
    cm = channel_map(arch)
    alive = _group_alive(cm, alive_fraction, np.random.default_rng(seed))
    out = {k: np.array(v, copy=True) for k, v in params.items()}
    nodes = node_by_name(arch)

    def along(segments: list[tuple[str, int]]) -> np.ndarray:
        return np.concatenate([np.repeat(alive[g], r) for g, r in segments])

    for tensor, segments in cm.rows.items():
        if nodes[tensor.rsplit(".", 1)[0]]["op"] in WEIGHT_OPS:
            out[tensor][~along(segments)] = 0
    for tensor, segments in [*cm.cols.items(), ("head.weight", cm.head_cols)] if columns else []:
        node = nodes.get(tensor.rsplit(".", 1)[0], {})
        groups = node.get("groups", 1) if node.get("op") == "conv" else 1
        w, dead = out[tensor], ~along(segments).reshape(groups, -1)
        rows = w.shape[0] // groups
        for a in range(groups):
            w[a * rows:(a + 1) * rows, dead[a]] = 0
    return out, alive


def _group_alive(cm: ChannelMap, alive_fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per channel group, a random `alive_fraction` of its channels (at least one); the input and one-channel groups
    whole."""
    alive = {}
    for g, n in cm.groups.items():
        alive[g] = np.ones(n, bool)
        if g != INPUT and n > 1:
            alive[g][:] = False
            alive[g][rng.choice(n, max(1, int(round(alive_fraction * n))), replace=False)] = True
    return alive


def group_node_model(arch: Arch, alive_fraction: float, n_tasks: int = 2, classes: tuple[int, ...] = (10,),
                     seed: int = 0) -> PackedModel:
    """An AGS-CL-shaped multi-task model on a graph whose conv/linear axes are each one channel group (resnet18,
    mobilenet_v2; not a concatenation): node specs on every conv/linear weight and bias (rows: its group; columns:
    the group it reads, with the flatten repeat) and, per task, a random `alive_fraction` of every group alive
    (``nodes:GROUP``), so `materialize` zeroes the dead rows and columns; BatchNorm shared, heads per task with the
    dead features' columns zero. Weights as `random_packed`'s."""
    packed = random_packed(arch, n_tasks, "finetune", classes, seed)  # shared trunk, per-task heads
    cm = channel_map(arch)
    nodes = node_by_name(arch)

    def one(segments: list[tuple[str, int]], what: str) -> tuple[str, int]:
        if len(segments) != 1:
            raise ValueError(f"{what} spans {len(segments)} channel groups; node specs name one")
        return segments[0]

    for name in param_shapes(arch):
        if nodes[name.rsplit(".", 1)[0]]["op"] in WEIGHT_OPS:
            spec = {"kind": "node", "rows": one(cm.rows[name], name)[0]}
            source, repeat = one(cm.cols.get(name, [(INPUT, 1)]), name)
            if source != INPUT:
                spec.update(cols=source, repeat=repeat)
            packed.params[name] = spec
    head, repeat = one(cm.head_cols, "the heads' features")
    rng = np.random.default_rng(seed + 1)
    for tt in packed.task_tensors:
        alive = _group_alive(cm, alive_fraction, rng)
        tt.update({f"nodes:{g}": a for g, a in alive.items() if g != INPUT})
        tt["head.weight"][:, ~np.repeat(alive[head], repeat)] = 0
    packed.method = "node"
    return packed
