"""The manifest: what an artifact declares (format, arch, method, tasks, delta specs, blob entries) and every check
that declaration must pass before a single blob is read.

`validate` turns a manifest text from the container into a trusted dict, or raises ArtifactError naming the file and
field: types and ranges first, then the structure — every blob a task needs exists with the shape the arch and its
delta spec imply — from declared shapes alone, bounded by `limits`. The name rules and blob keys live here too, so
the writer refuses exactly what the reader would.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Iterable

import numpy as np

from edgecl import __version__
from edgecl.arch.spec import INPUT, gemm_shape, param_shapes
from edgecl.arch.spec import validate as validate_arch
from edgecl.artifact import node_masks
from edgecl.artifact.container import ST_CODE, TableEntry, parse_json, stored_form
from edgecl.artifact.encodings import stored_dtype
from edgecl.artifact.limits import (MAX_CLASSES, MAX_NDIM, MAX_TASK_NAME, MAX_TASKS, MAX_TENSOR_NAME,
                                    budget_problem, dense_bytes, is_int)
from edgecl.deltas import KINDS, MAX_GROUP, node_segments, task_name_conflicts
from edgecl.errors import ArtifactError, EdgeclWarning, UsageError

FORMAT_NAME = "edgecl-artifact"
FORMAT_VERSION = 3  # 3: a task's node masks are one blob (node_masks); 2: the architecture is a graph of nodes
READABLE_VERSIONS = (1, 2, 3)  # 1: a list of layers, read as the same graph
BLOB_FIELDS = ("dtype", "shape", "encoding", "blake2b")
"""A manifest blob entry has exactly these: decoded dtype and shape, encoding steps, BLAKE2b of the stored bytes."""

_TENSOR_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.:\-]{{0,{MAX_TENSOR_NAME - 1}}}")
_KEY = re.compile(r"(base|task(0|[1-9][0-9]{0,5}))::(.+)")
_CHECKSUM = re.compile(r"[0-9a-f]{32}")
MAX_SEGMENTS = 4096  # node segments per rows/cols: ~8× the widest concatenation of a real network


def _segments_ok(value: Any) -> bool:
    """A node spec's rows/cols: null, a group name, or a non-empty list of [group name, repeat ≥ 1] pairs."""
    if value is None or isinstance(value, str):
        return True
    return (isinstance(value, list) and 0 < len(value) <= MAX_SEGMENTS
            and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and is_int(s[1], 1) for s in value))


_SPEC_FIELDS = {"unit": lambda v: v in ("element", "row", "column"), "rows": _segments_ok, "cols": _segments_ok,
                "repeat": lambda v: is_int(v, 1), "groups": lambda v: is_int(v, 1),
                "group": lambda v: isinstance(v, str) and len(v) <= MAX_GROUP}


def blob_key(scope: str | int, name: str) -> str:
    """``base::NAME`` for shared tensors, ``task<T>::NAME`` for task T's own."""
    return f"base::{name}" if scope == "base" else f"task{scope}::{name}"


def param_of(name: str, suffix: str) -> str | None:
    """The tensor a per-tensor blob belongs to (``fc1.weight`` for ``fc1.weight:owner``), or None."""
    return name[:-len(suffix)] if name.endswith(suffix) else None


def name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _TENSOR_NAME.fullmatch(name) or ".." in name:
        return f"tensor name {name!r} is not allowed (letters, digits, _ . : -; no '..'; ≤ {MAX_TENSOR_NAME} chars)"
    return None


def task_name_problem(name: object) -> str | None:
    if (not isinstance(name, str) or not 0 < len(name) <= MAX_TASK_NAME or not name.isprintable()
            or name.startswith(".") or any(c in name for c in "/\\")):
        return (f"task name {name!r} is not allowed (1-{MAX_TASK_NAME} printable characters, no '/' or '\\', "
                "no leading '.')")
    return None


def task_names_problem(names: list[str], first: int = 0) -> str | None:
    """Why these task names cannot be stored (`task_name_problem`), or the first from index `first` on that cannot
    select its task (`deltas.task_name_conflicts`), or None. The writer's rule, also checked on a stream's names
    before training so that a bad name is refused before the work, not after it."""
    for name in names:
        problem = task_name_problem(name)
        if problem:
            return problem
    for t, why in task_name_conflicts(names, first):
        return f"task {t} name {names[t]!r} {why}: a task must be selectable by its name"
    return None


def owner_problem(owner: np.ndarray, n_tasks: int) -> str | None:
    """What is wrong with an LPS owner map's values (0 free, i+1 task i), or None."""
    if owner.dtype.kind not in "iu":
        return f"owner map has dtype {owner.dtype}, needs an integer dtype"
    if owner.size and (owner.min() < 0 or owner.max() > n_tasks):
        return f"owner values span {owner.min()}..{owner.max()}, allowed 0..{n_tasks} (0 free, i+1 task i)"
    return None


def owner_units_shape(shape: tuple[int, ...], unit: str) -> tuple[int, ...]:
    """Shape of an LPS owner map: one owner per element, GEMM row or GEMM column of a weight of `shape`."""
    p, q = gemm_shape(shape) if len(shape) >= 1 else (1, 1)
    return {"element": shape, "row": (p,), "column": (q,)}[unit]


def validate(path: str, text: str, table: dict[str, TableEntry], file_size: int) -> dict[str, Any]:
    """The manifest `text` of the file at `path`, parsed and checked against its tensor table; ArtifactError
    otherwise. In the returned dict the arch is normalised and each blob entry also has its ``scope`` and ``name``."""
    manifest = parse_json(path, text.encode(), "manifest")
    check = _Check(path, manifest, table)
    check.fields(file_size)
    check.structure()
    return manifest


class _Check:
    """The checks of one manifest, in order; each raises ArtifactError(path, field, problem)."""

    def __init__(self, path: str, manifest: Any, table: dict[str, TableEntry]):
        self.path, self.m, self.table = path, manifest, table
        self.layout: dict[str, int] | None = None  # format 3: group → size of its mask; None: one blob per group

    def fail(self, field: str, problem: str) -> ArtifactError:
        return ArtifactError(self.path, field, problem)

    # -- types and ranges
    def fields(self, file_size: int) -> None:
        m = self.m
        if not isinstance(m, dict):
            raise self.fail("manifest", "not a JSON object")
        if m.get("format") != FORMAT_NAME:
            raise self.fail("manifest.format", f"is {m.get('format')!r}, expected {FORMAT_NAME!r}")
        version = m.get("format_version")
        if not is_int(version, 1):
            raise self.fail("manifest.format_version", f"invalid value {version!r}")
        if version not in READABLE_VERSIONS:
            raise self.fail("manifest.format_version", f"version {version} is not readable by this edgecl "
                                                       f"{__version__} (reads versions {READABLE_VERSIONS})")
        for key, typ in (("edgecl_version", str), ("method", str), ("config", dict), ("arch", dict),
                         ("fp16", bool), ("tasks", list), ("params", dict), ("extra", dict), ("blobs", dict)):
            if not isinstance(m.get(key), typ):
                raise self.fail(f"manifest.{key}", f"missing or not a {typ.__name__}")
        try:
            m["arch"] = validate_arch(m["arch"])
            trunk = param_shapes(m["arch"])
        except (UsageError, TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
                RecursionError) as exc:
            raise self.fail("manifest.arch", f"invalid architecture ({str(exc)[:200]})") from None
        if len(m["tasks"]) > MAX_TASKS:
            raise self.fail("manifest.tasks", f"{len(m['tasks'])} tasks (limit {MAX_TASKS})")
        for i, t in enumerate(m["tasks"]):
            self.task(i, t)
        self.warn_unselectable_names([t["name"] for t in m["tasks"]])
        for name, spec in m["params"].items():
            self.spec(name, spec)
        missing = set(trunk) - set(m["params"])
        if missing:
            raise self.fail("manifest.params", f"no delta spec for trunk tensors {sorted(missing)}")
        self.node_groups(version)
        if set(m["blobs"]) != set(self.table):
            raise self.fail("manifest.blobs", f"blob list and tensor table differ: "
                                              f"{sorted(set(m['blobs']) ^ set(self.table))[:5]}")
        decoded = dense_bytes(m["arch"], [t["n_classes"] for t in m["tasks"]])
        decoded += node_masks.view_bytes(len(self.layout or ()), len(m["tasks"]))
        for key, e in m["blobs"].items():
            decoded += self.blob_entry(key, e, len(m["tasks"]))
        problem = budget_problem(decoded, file_size)
        if problem:
            raise self.fail("manifest.blobs", problem)

    def task(self, i: int, t: Any) -> None:
        field = f"manifest.tasks[{i}]"
        if not isinstance(t, dict):
            raise self.fail(field, "not an object")
        problem = task_name_problem(t.get("name"))
        if problem:
            raise self.fail(f"{field}.name", problem)
        if not is_int(t.get("n_classes"), 1, MAX_CLASSES):
            raise self.fail(f"{field}.n_classes", f"invalid value {t.get('n_classes')!r}")
        if t.get("seed") is not None and not is_int(t.get("seed"), -(1 << 63), (1 << 64) - 1):
            raise self.fail(f"{field}.seed", f"invalid value {t.get('seed')!r}")
        if t.get("input_shape") != self.m["arch"]["input_shape"] or t.get("input_dtype") != "float32":
            raise self.fail(f"{field}.input_shape", "disagrees with the architecture (float32 inputs)")

    def warn_unselectable_names(self, names: list[str]) -> None:
        """Old files may name tasks "3" or twice (`save` refuses both now): they load, and those tasks are selected
        by index only — said once per file, so nobody selects the wrong task by name."""
        conflicts = task_name_conflicts(names)
        if conflicts:
            listed = "; ".join(f"task {i} {names[i]!r} {why}" for i, why in conflicts[:5])
            more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
            warnings.warn(f"{self.path}: {listed}{more}: select these tasks by index", EdgeclWarning, stacklevel=2)

    def spec(self, name: str, spec: Any) -> None:
        field = f"manifest.params[{name!r}]"
        problem = name_problem(name)
        if problem:
            raise self.fail(field, problem)
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            raise self.fail(field, f"kind must be one of {KINDS}")
        for key, ok in _SPEC_FIELDS.items():
            if key in spec and not ok(spec[key]):
                raise self.fail(f"{field}.{key}", f"invalid value {spec[key]!r}")
        if spec["kind"] == "permute" and "group" not in spec:
            raise self.fail(f"{field}.group", "permute tensors need a group")

    def node_groups(self, version: int) -> None:
        """Format 3: ``node_groups``, the layout of every task's packed node masks, checked and kept as
        ``(group, size)`` pairs. Older formats store one blob per group; a ``node_groups`` there means nothing."""
        m = self.m
        if version < 3:
            m.pop("node_groups", None)
            return
        problem = node_masks.layout_problem(m.get("node_groups"))
        if problem:
            raise self.fail("manifest.node_groups", problem)
        for group, _ in m["node_groups"]:
            problem = name_problem(node_masks.PREFIX + group)
            if problem:
                raise self.fail("manifest.node_groups", f"group {group!r}: {problem}")
        m["node_groups"] = [(group, size) for group, size in m["node_groups"]]  # in memory: a node_masks.Layout
        self.layout = dict(m["node_groups"])

    def blob_entry(self, key: str, e: Any, n_tasks: int) -> int:
        """Validate one manifest blob entry against the tensor table; returns its decoded byte count."""
        field = f"blob {key!r}"
        match = _KEY.fullmatch(key)
        if not isinstance(e, dict) or match is None or set(e) != set(BLOB_FIELDS):
            raise self.fail(field, f"malformed key, or entry without exactly the fields {BLOB_FIELDS}")
        scope = "base" if match.group(1) == "base" else int(match.group(2))
        if scope != "base" and scope >= n_tasks:
            raise self.fail(field, f"task {scope} out of range ({n_tasks} tasks)")
        problem = name_problem(match.group(3))
        if problem:
            raise self.fail(field, problem)
        e["scope"], e["name"] = scope, match.group(3)  # in memory only: the key carries both
        if self.layout is not None and node_masks.is_mask(e["name"]):
            raise self.fail(field, f"format {self.m['format_version']} stores node masks packed, in "
                                   f"task<T>::{node_masks.PACKED} (manifest.node_groups), not one blob per group")
        if not isinstance(e["dtype"], str) or e["dtype"] not in ST_CODE:
            raise self.fail(f"{field}.dtype", f"unsupported dtype {e.get('dtype')!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(is_int(d) for d in shape):
            raise self.fail(f"{field}.shape", f"bad shape {shape!r}")
        dtype = np.dtype(e["dtype"])
        try:
            stored_dtype(dtype, e.get("encoding"))
        except ValueError as exc:
            raise self.fail(f"{field}.encoding", str(exc)) from None
        if not isinstance(e["blake2b"], str) or not _CHECKSUM.fullmatch(e["blake2b"]):
            raise self.fail(f"{field}.blake2b", "malformed checksum")
        slot = self.table[key]
        want = stored_form(e["dtype"], shape, e["encoding"], slot.stop - slot.start)
        if (slot.dtype, slot.shape) != want:
            raise self.fail(field, f"stored as {slot.dtype}{slot.shape}, the encoding {e['encoding']} implies {want}")
        return math.prod(shape) * dtype.itemsize

    # -- structure, from declared shapes alone
    def entry(self, scope: str | int, name: str) -> dict[str, Any] | None:
        return self.m["blobs"].get(blob_key(scope, name))

    def structure(self) -> None:
        """Declared shapes agree with the arch and the delta specs, for every task. Loops over tasks only where a
        blob is required, so a hostile manifest cannot make this slower than its size."""
        arch, params, tasks = self.m["arch"], self.m["params"], self.m["tasks"]
        trunk = param_shapes(arch)
        shapes = {}
        self.packed_node_masks(len(tasks))
        for name, spec in params.items():
            kind = spec["kind"]
            if kind == "task":
                for t, info in enumerate(tasks):
                    head = {"head.weight": (info["n_classes"], arch["feature_dim"]), "head.bias": (info["n_classes"],)}
                    self.need(t, name, {**trunk, **head}.get(name))
                continue
            shape = shapes[name] = self.need("base", name, trunk.get(name))
            if kind in ("lps", "permute") and len(shape) < 1:
                raise self.fail(f"manifest.params[{name!r}]", f"{kind} tensors need at least one dimension")
            if kind == "lps":
                self.need("base", f"{name}:owner", owner_units_shape(tuple(shape), spec.get("unit", "element")))
                if np.dtype(self.entry("base", f"{name}:owner")["dtype"]).kind not in "iu":
                    raise self.fail(f"blob {blob_key('base', name + ':owner')!r}", "owner maps need an integer dtype")
            if kind == "node":
                self.node_masks(name, spec, shape, len(tasks))
        for key, e in self.m["blobs"].items():
            self.blob_structure(key, e, params, shapes)

    def node_masks(self, name: str, spec: dict[str, Any], shape: list[int], n_tasks: int) -> None:
        """Every task has a 1-D bool `nodes:GROUP` blob for each group the spec's rows/cols name, and the segments
        cover the tensor: rows = shape[0], cols = shape[1] × groups. Work is per distinct group, not per segment."""
        field = f"manifest.params[{name!r}]"
        try:
            axes = {axis: node_segments(spec, axis) for axis in ("rows", "cols")}
        except UsageError as exc:
            raise self.fail(f"{field}.repeat", str(exc)) from None
        groups = spec.get("groups", 1)
        if axes["cols"] and (len(shape) < 2 or shape[0] % groups):
            raise self.fail(f"{field}.cols", f"input columns need a 2-D or 4-D tensor whose {groups} groups divide "
                                             f"its rows, {name!r} is {shape}")
        want = {"rows": shape[0] if shape else -1, "cols": shape[1] * groups if len(shape) > 1 else -1}
        per_group = {axis: _repeats_per_group(segments) for axis, segments in axes.items()}
        for t in range(n_tasks if self.layout is None else min(n_tasks, 1)):  # format 3: one layout, all tasks
            for axis, repeats in per_group.items():
                if not repeats:
                    continue
                sizes = {g: self.m["arch"]["input_shape"][0] if g == INPUT else self.mask_size(t, g, field)
                         for g in repeats}
                covered = sum(sizes[g] * r for g, r in repeats.items())
                if covered != want[axis]:
                    raise self.fail(f"{field}.{axis}", f"task {t}: node masks {sizes} × repeats cover {covered} "
                                                       f"{axis}, {name!r} {shape} needs {want[axis]}")

    def mask_size(self, t: int, group: str, field: str) -> int:
        """Length of task t's mask of `group`: its own 1-D bool blob (formats 1-2), or the layout's size (3)."""
        if self.layout is None:
            return self.need(t, f"{node_masks.PREFIX}{group}", None, bool, 1)[0]
        if group not in self.layout:
            raise self.fail("manifest.node_groups", f"no group {group!r}: {field} needs node mask "
                                                    f"'{node_masks.PREFIX}{group}'")
        return self.layout[group]

    def packed_node_masks(self, n_tasks: int) -> None:
        """Format 3: with any node groups, every task has one 1-D bool ``nodes`` blob, as long as the sizes sum to;
        without, none."""
        if self.layout is None:
            return
        total = sum(self.layout.values())
        for t in range(n_tasks):
            if not self.layout:
                if self.entry(t, node_masks.PACKED) is not None:
                    raise self.fail(f"blob {blob_key(t, node_masks.PACKED)!r}", "manifest.node_groups is empty")
                continue
            if self.need(t, node_masks.PACKED, None, bool, 1) != [total]:
                raise self.fail(f"blob {blob_key(t, node_masks.PACKED)!r}.shape",
                                f"is {self.entry(t, node_masks.PACKED)['shape']}, the sizes in manifest.node_groups "
                                f"sum to {total}")

    def blob_structure(self, key: str, e: dict[str, Any], params: dict[str, Any], shapes: dict[str, list]) -> None:
        scope, name, steps = e["scope"], e["name"], e["encoding"]
        stem, _, suffix = name.rpartition(":")
        kind = params.get(stem, {}).get("kind")
        if "support" in steps and (scope != "base" or params.get(name, {}).get("kind") != "lps"):
            raise self.fail(f"blob {key!r}", "support coding only applies to LPS base tensors")
        if scope == "base":
            return
        if "xor" in steps and not (kind == "lps" and suffix == "share" and scope > 0
                                   and self.entry(scope - 1, name) is not None):
            raise self.fail(f"blob {key!r}", "XOR coding needs an LPS sharing mask of the previous task")
        if kind == "lps" and suffix == "share":
            self.need(scope, name, None, bool, 1)
        elif kind == "lowrank" and suffix in ("r", "s", "u", "v"):
            self.lowrank(scope, stem, shapes[stem])

    def lowrank(self, t: int, name: str, shape: list[int]) -> None:
        if len(shape) < 2:
            raise self.fail(f"manifest.params[{name!r}]", "low-rank factors need a 2-D or 4-D base")
        for s, dim in (("r", 0), ("s", 1)):
            if self.entry(t, f"{name}:{s}") is not None:
                self.need(t, f"{name}:{s}", (shape[dim],))
        if self.entry(t, f"{name}:u") is not None and self.entry(t, f"{name}:v") is not None:
            u = self.need(t, f"{name}:u", None, None, 2)
            v = self.need(t, f"{name}:v", None, None, 2)
            if u[0] != shape[0] or v[0] != shape[1] or u[1] != v[1]:
                raise self.fail(f"blob {blob_key(t, name + ':u')!r}", f"factors {u} and {v} do not fit {shape}")

    def need(self, scope: str | int, name: str, shape: Iterable[int] | None, dtype=None,
             ndim: int | None = None) -> list[int]:
        """The declared shape of a required blob, checked against what the arch/spec implies."""
        e = self.entry(scope, name)
        field = f"blob {blob_key(scope, name)!r}"
        if e is None:
            raise self.fail(field, "missing")
        if shape is not None and e["shape"] != list(shape):
            raise self.fail(f"{field}.shape", f"is {e['shape']}, expected {list(shape)}")
        if ndim is not None and len(e["shape"]) != ndim:
            raise self.fail(f"{field}.shape", f"is {e['shape']}, expected {ndim} dimensions")
        if dtype is not None and np.dtype(e["dtype"]) != np.dtype(dtype):
            raise self.fail(f"{field}.dtype", f"is {e['dtype']}, expected {np.dtype(dtype).name}")
        if dtype is None and e["dtype"] not in ("float16", "float32", "float64") and e["scope"] != "base":
            raise self.fail(f"{field}.dtype", f"is {e['dtype']}, expected a float dtype")
        return e["shape"]


def _repeats_per_group(segments: list[tuple[str, int]]) -> dict[str, int]:
    """Group → total repeat over `segments`: an axis covers Σ size(group) × repeat, whatever the segment order."""
    out: dict[str, int] = {}
    for group, repeat in segments:
        out[group] = out.get(group, 0) + repeat
    return out
