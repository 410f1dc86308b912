"""The in-memory form of a continually learned model — shared base tensors, per-task deltas, per-task heads — and the
one function that turns a task's delta into dense weights (`materialize`). Training produces a `PackedModel`, the
artifact module stores it, the exporter and runtime consume it; none of them re-implements the delta arithmetic.

Delta kinds (``PackedModel.params[name]["kind"]``), with what each stores:

==========  ===========================================================  =========================================
kind        stored                                                       task t's tensor
==========  ===========================================================  =========================================
shared      ``base[name]``                                               ``base[name]``
task        ``task_tensors[t][name]``                                    that tensor (heads, STL, per-task biases)
lps         ``base[name]`` = W̄ (superposed); ``base[name:owner]`` owner   ``W̄ ⊙ keep_t``; keep_t = own_t ∪ share_t
            per unit (0 free, i+1 task i; unit = element | row |
            column of the GEMM view); ``task_tensors[t][name:share]``
            bool over the elements owned by tasks < t (C order)
node        ``base[name]``; ``task_tensors[t][nodes:GROUP]`` bool per     ``W`` with rows of dead output nodes and
            channel of a channel group; spec fields rows/cols (a group,  columns of dead input nodes zeroed
            or ``[[group, repeat], ...]`` segments), repeat, groups      (a grouped conv: per conv group)
lowrank     ``base[name]`` = W_base; ``task_tensors[t][name:r|s|u|v]``    ``r ⊙_rows W_base ⊙_cols s + U Vᵀ``
            (missing r/s → ones, missing u/v → no residual)              (conv: U Vᵀ constant over kernel positions)
permute     ``base[name]``; ``tasks[t].seed``; spec field group           ``base[name]`` with axis 0 permuted by
                                                                         ``task_permutation(seed, group, n)``
==========  ===========================================================  =========================================
"""
from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgecl.arch.spec import INPUT, Arch, gemm_shape, param_shapes
from edgecl.errors import UsageError

KINDS = ("shared", "task", "lps", "node", "lowrank", "permute")
MAX_GROUP = 255
"""Characters in a permutation group name (a layer name): `task_permutation` folds the length into the top byte of a
64-bit key, so longer names never computed (OverflowError); every name that did keeps its permutation."""


@dataclass
class TaskInfo:
    """What a deployed task is: its name, its classes, and (RGO) the seed of its feature permutations."""

    name: str
    n_classes: int
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PackedModel:
    """Everything needed to rebuild every task's weights. Tensors are numpy; `params` maps every trunk tensor and
    ``head.weight``/``head.bias`` to its delta spec (a JSON dict with at least ``kind``)."""

    arch: Arch
    method: str
    config: dict[str, Any]
    params: dict[str, dict[str, Any]]
    base: dict[str, np.ndarray]
    tasks: list[TaskInfo] = field(default_factory=list)
    task_tensors: list[dict[str, np.ndarray]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able method metadata (capacity, ranks, …)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: int | str) -> int:
        """Resolve a task given by index or name; UsageError names the task and what exists."""
        return resolve_task(self.tasks, task)

    # -- the read-only `edgecl.source.ModelSource` protocol, so an in-memory model goes wherever a file does
    @property
    def origin(self) -> str:
        return "<memory>"

    def base_names(self) -> list[str]:
        return list(self.base)

    def read_base(self, name: str) -> np.ndarray:
        return self.base[name]

    def read_task(self, t: int) -> dict[str, np.ndarray]:
        return dict(self.task_tensors[t])

    def task_blobs(self, names: set[str]) -> None:
        return None  # nothing to read again: a consumer keeps references to these arrays

    def materialize(self, task: int | str) -> dict[str, np.ndarray]:
        return materialize(self, task)


def resolve_task(tasks: list[TaskInfo], task: int | str) -> int:
    """Index of a task given by index or name, among `tasks`; UsageError naming the task and what exists otherwise.
    A string that reads as an integer (`int()` accepts it: "3", " 03", "-1", "٣") is an index, never a name — `save`
    refuses such names, so only old files can have them, and there they are selected by index. A name several tasks
    share is refused as ambiguous. Every model source (in memory or a file) resolves tasks here, so they all agree."""
    if isinstance(task, str):
        index = _as_index(task)
        if index is None:
            matches = [i for i, info in enumerate(tasks) if info.name == task]
            if len(matches) > 1:
                raise UsageError(f"task name {task!r} is ambiguous: tasks {matches} share it; select one by index")
            if not matches:
                raise UsageError(f"unknown task {task!r}; tasks are {[t.name for t in tasks]}")
            return matches[0]
        i = index
    else:
        try:
            i = operator.index(task) if not isinstance(task, (bool, np.bool_)) else None
        except TypeError:
            i = None
        if i is None:
            raise UsageError(f"task must be an index or a name, got {task!r}")
    if not 0 <= i < len(tasks):
        raise UsageError(f"task {i} out of range: this model has {len(tasks)} tasks (0..{len(tasks) - 1})")
    return i


def _as_index(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


_RANGE = re.compile(r"\s*\d+\s*-\s*\d+\s*")


def selector_problem(name: str) -> str | None:
    """Why a task could not be selected by this name — `resolve_task` or a task list (`export --tasks 0,2-5,all`)
    would read it as something else — or None."""
    if _as_index(name) is not None:
        return "reads as a task index"
    if name != name.strip():
        return "has leading or trailing spaces (task lists strip them)"
    if "," in name:
        return "contains ',' (task lists are comma-separated)"
    if _RANGE.fullmatch(name) or name.lower() == "all":
        return "reads as a task range or 'all'"
    return None


def task_name_conflicts(names: list[str], first: int = 0) -> list[tuple[int, str]]:
    """(task, why) for every name from index `first` on that cannot select its task: one that reads as an index, a
    range or a list, or one an earlier task already has. `save` refuses them; old files load with a warning."""
    out, seen = [], {}
    for i, name in enumerate(names):
        why = selector_problem(name) if i >= first else None
        if why is None and name in seen and i >= first:
            why = f"duplicates task {seen[name]}'s name"
        if why:
            out.append((i, why))
        seen.setdefault(name, i)
    return out


def materialize(packed: PackedModel, task: int | str) -> dict[str, np.ndarray]:
    """Dense float32 tensors of one task: every trunk tensor plus that task's ``head.weight``/``head.bias``."""
    t = packed.task_index(task)
    return {name: materialize_param(packed, t, name) for name in packed.params}


def materialize_param(packed: PackedModel, t: int, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """One tensor of task t; the only place the delta arithmetic lives. With `out` (float32, the tensor's shape) the
    values are written there (low-rank weights without allocating) and `out` is returned."""
    spec = packed.params[name]
    tt = packed.task_tensors[t]
    if spec["kind"] == "lowrank":
        return lowrank_weight(packed.base[name], tt.get(f"{name}:r"), tt.get(f"{name}:s"), tt.get(f"{name}:u"),
                              tt.get(f"{name}:v"), out=out)
    value = _param_value(packed, t, name, spec, tt)
    if out is None:
        return value
    np.copyto(out, value)
    return out


def _param_value(packed: PackedModel, t: int, name: str, spec: dict[str, Any],
                 tt: dict[str, np.ndarray]) -> np.ndarray:
    kind = spec["kind"]
    if kind == "task":
        return tt[name]
    base = packed.base[name]
    if kind == "shared":
        return base
    # np.where, not a product: masked-out entries are +0.0 whatever the weight there (no -0.0, no inf·0 = NaN), so a
    # task's bits never depend on weights it does not use — appending a task keeps earlier tasks bit-identical.
    if kind == "lps":
        return np.where(lps_keep(packed, t, name), base, base.dtype.type(0))
    if kind == "node":
        return np.where(node_factor(packed, t, spec, base.shape), base, base.dtype.type(0))
    if kind == "permute":
        seed = packed.tasks[t].seed
        if seed is None:
            return base
        return np.take(base, task_permutation(seed, spec["group"], base.shape[0]), axis=0)
    raise UsageError(f"tensor {name!r}: unknown delta kind {kind!r} (known: {KINDS})")


def lps_owner_elements(packed: PackedModel, name: str) -> np.ndarray:
    """The owner of every weight element (0 free, i+1 task i), expanded from row/column units if structured."""
    owner = packed.base[f"{name}:owner"]
    shape = packed.base[name].shape
    unit = packed.params[name].get("unit", "element")
    if unit not in ("element", "row", "column"):
        raise UsageError(f"tensor {name!r}: unknown LPS unit {unit!r} (element, row, column)")
    return expand_owner(owner, shape, unit)


def expand_owner(owner: np.ndarray, shape: tuple[int, ...], unit: str) -> np.ndarray:
    """An LPS owner map per unit ("element", GEMM "row" or "column") laid over a weight of `shape`. The artifact
    codes sharing masks and W̄'s support with this same expansion, so the two can never disagree."""
    p, q = gemm_shape(shape)
    if unit == "element":
        return owner.reshape(shape)
    per_unit = owner.reshape((p, 1) if unit == "row" else (1, q))
    return np.broadcast_to(per_unit, (p, q)).reshape(shape)


def lps_keep(packed: PackedModel, t: int, name: str) -> np.ndarray:
    """Boolean support of task t: the entries it owns plus the earlier entries its sharing mask selects."""
    owner = lps_owner_elements(packed, name)
    keep = owner == t + 1
    earlier = (owner >= 1) & (owner <= t)
    share = packed.task_tensors[t].get(f"{name}:share")
    n_earlier = int(earlier.sum())
    if share is None:
        share = np.zeros(n_earlier, dtype=bool)
    if share.shape != (n_earlier,):
        raise UsageError(f"tensor {name!r}, task {t}: sharing mask has {share.size} bits, earlier support has "
                         f"{n_earlier}")
    keep[earlier] = share
    return keep


def node_segments(spec: dict[str, Any], axis: str) -> list[tuple[str, int]]:
    """The ``rows`` or ``cols`` of a node spec as segments ``(group, repeat)``: the axis is the concatenation of the
    groups' node masks, each node repeated `repeat` times. The string form (edgecl ≤ 0.2, chains) names one group,
    its cols repeated by the spec's ``repeat``; the list form ``[[group, repeat], ...]`` spans several (a
    concatenation). Empty when the spec has no such field."""
    value = spec.get(axis)
    if not value:
        return []
    if isinstance(value, str):
        return [(value, int(spec.get("repeat", 1)) if axis == "cols" else 1)]
    if int(spec.get("repeat", 1)) != 1:
        raise UsageError(f"node spec: 'repeat' applies to a string {axis!r} only; segments carry their own repeats")
    return [(str(g), int(r)) for g, r in value]


def node_mask(packed: PackedModel, t: int, segments: list[tuple[str, int]], width: int, what: str) -> np.ndarray:
    """Task t's node mask over an axis made of `segments` (bool, one per position); UsageError, before anything is
    allocated, unless the segments cover exactly `width` positions (an artifact's repeat of 10^7 made the loader
    allocate 954 MB before refusing the width; 10^9, ~100 GB)."""
    tt = packed.task_tensors[t]
    masks = []
    for group, repeat in segments:
        if group == INPUT:  # the network input is no node: never masked
            mask = np.ones(packed.arch["input_shape"][0], dtype=bool)
        else:
            mask = np.asarray(tt[f"nodes:{group}"])
            if mask.dtype != np.bool_ or mask.ndim != 1:
                raise UsageError(f"node mask 'nodes:{group}' of task {t} is {mask.dtype}{mask.shape}, needs 1-D bool")
        if repeat < 1:
            raise UsageError(f"node {what}: segment {group!r} repeats {repeat} times, needs at least 1")
        masks.append((mask, repeat))
    covered = sum(mask.size * repeat for mask, repeat in masks)
    if covered != width:
        raise UsageError(f"node {what} cover {covered} {'rows' if what == 'rows' else 'inputs'}, the tensor has "
                         f"{width}")
    return np.concatenate([np.repeat(mask, repeat) for mask, repeat in masks])


def node_vectors(packed: PackedModel, t: int, spec: dict[str, Any],
                 shape: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Task t's node masks of one tensor: over its rows (axis 0), and over the input channels/features its columns
    read — ``shape[1] × groups`` of them, since a grouped conv's rows each read their own group's slice. None where
    the spec has no rows/cols. UsageError when the masks do not cover the tensor."""
    rows = cols = None
    if node_segments(spec, "rows"):
        if len(shape) < 1:
            raise UsageError(f"node rows given for a tensor of shape {shape}")
        rows = node_mask(packed, t, node_segments(spec, "rows"), shape[0], "rows")
    if node_segments(spec, "cols") and len(shape) > 1:
        groups = int(spec.get("groups", 1))
        if groups < 1 or shape[0] % groups:
            raise UsageError(f"node cols: groups={groups} does not divide the tensor {shape}")
        cols = node_mask(packed, t, node_segments(spec, "cols"), shape[1] * groups, f"cols (groups={groups})")
    return rows, cols


def node_factor(packed: PackedModel, t: int, spec: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """0/1 factor broadcastable to `shape`: output rows of dead nodes and input columns of dead source nodes."""
    rows, cols = node_vectors(packed, t, spec, shape)
    factor = np.ones(shape, dtype=bool)
    if rows is not None:
        factor &= rows.reshape((-1,) + (1,) * (len(shape) - 1))
    if cols is not None:
        groups = int(spec.get("groups", 1))
        # row j of a grouped conv reads input channels [g·in/G, (g+1)·in/G) of its group g = j // (out/G)
        per_row = np.repeat(cols.reshape(groups, -1), shape[0] // groups, axis=0) if groups > 1 else cols[None]
        factor &= per_row.reshape(per_row.shape + (1,) * (len(shape) - 2))
    return factor


def lowrank_weight(base: np.ndarray, r: np.ndarray | None, s: np.ndarray | None, u: np.ndarray | None,
                   v: np.ndarray | None, out: np.ndarray | None = None, xp: Any = np) -> np.ndarray:
    """``r ⊙ W ⊙ s + U Vᵀ``; r scales output rows, s input columns (channels for conv), the residual is broadcast
    over kernel positions. The arithmetic is fixed here so every consumer gets the same bits: in float32, each
    element is ``((r·W)·s) + (UVᵀ)``. `out` (float32, base's shape) is written instead of a new array. No
    weight-sized temporary is made either way (a convolution's J×I residual is the one temporary): a runtime
    switching tasks must not churn the heap (glibc hands freed temporaries back to the OS and page-faults them in
    again on the next switch: 5× the arithmetic itself on a LeNet). A linear layer's residual is written first (one
    BLAS call into `out`), the scaled base added in blocks of rows (float addition commutes exactly). `xp` is the
    array namespace (numpy; CuPy for the runtime's device-resident switch, `edgecl.runtime.device_fill`), so the
    device computes the same sequence of operations; on a device the rows go in one block (a launch per block)."""
    out = xp.empty(base.shape, np.float32) if out is None else out
    nd = base.ndim
    r, s, u, v = (None if a is None else xp.asarray(a, dtype=np.float32) for a in (r, s, u, v))
    low = u is not None and v is not None and u.shape[-1] > 0
    rows = None if r is None else r.reshape((-1,) + (1,) * (nd - 1))
    cols = None if s is None else s.reshape((1, -1) + (1,) * (nd - 2))
    if low and nd == 2:
        xp.matmul(u, v.T, out=out)
        # 32 KB blocks on the host: small enough to come from the free heap
        step = max(1, (1 << 13) // max(1, base.shape[1])) if xp is np else max(1, base.shape[0])
        for lo in range(0, base.shape[0], step):
            hi = min(lo + step, base.shape[0])
            block = _scaled(base[lo:hi], None if rows is None else rows[lo:hi], cols, xp=xp)
            xp.add(block, out[lo:hi], out=out[lo:hi])
        return out
    _scaled(base, rows, cols, out, xp)
    if low:
        xp.add(out, (u @ v.T).reshape(u.shape[:1] + v.shape[:1] + (1,) * (nd - 2)), out=out)
    return out


def _scaled(w: np.ndarray, rows: np.ndarray | None, cols: np.ndarray | None,
            out: np.ndarray | None = None, xp: Any = np) -> np.ndarray:
    """(rows ⊙ w) ⊙ cols in float32, into `out` (a new array when None); a missing factor is skipped."""
    out = xp.empty(w.shape, np.float32) if out is None else out
    xp.copyto(out, w) if rows is None else xp.multiply(rows, w, out=out)
    if cols is not None:
        xp.multiply(out, cols, out=out)
    return out


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fixed, version-independent hash (numpy's Generator streams may change between
    releases; a deployed artifact's permutations must not)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def task_permutation(seed: int, group: str, n: int) -> np.ndarray:
    """The feature permutation (int64 indices) of one layer for one task: a pure function of (seed, group, n)."""
    if not isinstance(group, str) or len(group) > MAX_GROUP:
        raise UsageError(f"permutation group {str(group)[:40]!r}… must be a string of at most {MAX_GROUP} characters")
    g = np.uint64(int.from_bytes(group.encode()[:8].ljust(8, b"\0"), "little") ^ (len(group) << 56))
    key = _splitmix64(np.array([np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ g], dtype=np.uint64))[0]
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ key)
    return np.argsort(keys, kind="stable").astype(np.int64)


def checked(packed: PackedModel) -> PackedModel:
    """`packed` itself once `check_consistent` passes; UsageError "inconsistent model: …" otherwise. How a caller
    that was handed an in-memory model (rather than a file) accepts it."""
    try:
        check_consistent(packed)
    except UsageError as exc:
        raise UsageError(f"inconsistent model: {exc}") from None
    return packed


def check_finite(packed: PackedModel) -> None:
    """UsageError naming the tensor and task when a float tensor holds NaN or ±inf. A trained model never does, and
    the runtime's factored forms compute ``W·(0·x)`` where `materialize` defines a masked element as +0.0: only
    finite weights give every path the same output (docs/ARTIFACT.md)."""
    tensors = [("shared base", packed.base)] + [(f"task {t}", tt) for t, tt in enumerate(packed.task_tensors)]
    for where, arrays in tensors:
        for name, arr in arrays.items():
            bad = nonfinite_count(np.asarray(arr))
            if bad:
                raise UsageError(f"tensor {name!r} ({where}) has {bad} NaN/inf values; only finite numbers can be "
                                 "stored or run")


def nonfinite_count(arr: np.ndarray) -> int:
    """How many NaN/±inf elements a float array holds (0 for other dtypes); min/max first, so a finite array costs
    two reductions and no temporary."""
    if arr.dtype.kind != "f" or arr.size == 0 or (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def check_consistent(packed: PackedModel) -> None:
    """Raise UsageError naming the tensor/task when shapes, kinds or per-task entries disagree with the arch, or a
    tensor is not finite. The artifact loader wraps this into ArtifactError; the exporter and runtime may then trust
    the model."""
    check_finite(packed)
    heads = [info.n_classes for info in packed.tasks]
    if len(packed.task_tensors) != len(heads):
        raise UsageError(f"{len(heads)} tasks but {len(packed.task_tensors)} per-task tensor sets")
    trunk = param_shapes(packed.arch)
    missing = set(trunk) - set(packed.params)
    if missing:
        raise UsageError(f"no delta spec for trunk tensors {sorted(missing)}")
    for name, spec in packed.params.items():
        kind = spec.get("kind")
        if kind not in KINDS:
            raise UsageError(f"tensor {name!r}: unknown delta kind {kind!r} (known: {KINDS})")
        group = spec.get("group", "")
        if kind == "permute" and (not isinstance(group, str) or len(group) > MAX_GROUP):
            raise UsageError(f"tensor {name!r}: permutation group must be a string of at most {MAX_GROUP} characters")
        if kind != "task":
            if name not in packed.base:
                raise UsageError(f"tensor {name!r}: base tensor missing")
            if name in trunk and packed.base[name].shape != trunk[name]:
                raise UsageError(f"tensor {name!r}: base shape {packed.base[name].shape}, arch says {trunk[name]}")
    for t, info in enumerate(packed.tasks):
        want = param_shapes(packed.arch, info.n_classes)
        for name in packed.params:
            try:
                got = materialize_param(packed, t, name)
            except (KeyError, IndexError, ValueError) as exc:
                raise UsageError(f"tensor {name!r}, task {t} ({info.name}): inconsistent delta ({exc})") from None
            expect = want.get(name, packed.base.get(name, got).shape)
            if got.shape != tuple(expect) or got.dtype != np.float32:
                raise UsageError(f"tensor {name!r}, task {t} ({info.name}): materialises to {got.dtype}{got.shape},"
                                 f" expected float32{tuple(expect)}")
