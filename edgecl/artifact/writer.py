"""Writing an artifact: every tensor in its smallest encoding, the manifest, the container — then one crash-safe
write (`edgecl.io`: complete temp file, fsync, rename), so a kill leaves the old file or the new one, never a mix.

`append_task` replaces a file with a model that extends it, but only after checking, on the new bytes, that every
task already in the file materialises as before. The writer refuses (UsageError) anything a reader would refuse.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from edgecl import __version__
from edgecl.arch.later_fields import stored_form
from edgecl.arch.spec import validate as validate_arch
from edgecl.artifact import container, node_masks
from edgecl.artifact.encodings import candidates, encode, support_mask, xor_ref
from edgecl.artifact.limits import (MAX_CLASSES, MAX_HEADER_BYTES, MAX_JSON_CONTAINERS, MAX_NDIM, MAX_TASKS,
                                    budget_problem, dense_bytes)
from edgecl.artifact.manifest import (BLOB_FIELDS, FORMAT_NAME, FORMAT_VERSION, blob_key, name_problem, owner_problem,
                                      param_of, task_names_problem)
from edgecl.artifact.reader import load
from edgecl.deltas import PackedModel, check_consistent, expand_owner
from edgecl.errors import UsageError
from edgecl.io import commit, discard, write_atomic, write_temp

KEEPS = ("all", "heads")
"""What `append_task` keeps bit-identical for earlier tasks: every tensor, or only the heads (`Method.append_keeps`)."""

Blob = tuple[str, dict[str, Any], bytes]
"""(blob key, manifest entry, stored bytes)."""


def save(packed: PackedModel, path: str | os.PathLike, *, fp16: bool = False) -> None:
    """Write `packed` as one artifact, atomically. fp16 stores float32 base tensors as float16 (materialised as
    float32 again, so no longer bit-exact to training). UsageError for an inconsistent or unstorable model."""
    packed = _checked(packed)
    path = os.fspath(path)
    write_atomic(path, serialise(packed, fp16))


def _checked(packed: PackedModel) -> PackedModel:
    """`packed` with its architecture validated and normalised by `arch.spec.validate` — the function the reader
    checks it with and the graph builders build from, so a model saved is a model that loads and runs — and
    `check_consistent` passed; UsageError otherwise."""
    try:
        arch = validate_arch(packed.arch)
    except UsageError as exc:
        raise UsageError(f"cannot store this model: architecture: {exc}") from None
    packed = dataclasses.replace(packed, arch=arch)
    check_consistent(packed)
    return packed


def append_task(path: str | os.PathLike, packed: PackedModel, *, keeps: str = "all",
                out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Replace the artifact at `path` with `packed` (its tasks plus new ones), atomically — but only after every task
    already in the file materialises bit-identically from the new content: every tensor (`keeps="all"`), or only
    the heads (`"heads"`, for methods such as RGO whose shared trunk keeps learning by design). With `out`, the new
    artifact goes there instead (one rename, last) and `path` is left as it is. UsageError when `packed` is another
    method/arch, drops or renames tasks, or would change what must stay; ArtifactError when the file is damaged.
    Returns what was verified: ``{"tasks": earlier tasks checked, "keeps": keeps}``."""
    if keeps not in KEEPS:
        raise UsageError(f"append_task: keeps must be 'all' or 'heads', got {keeps!r}")
    path = os.fspath(path)
    target = path if out is None else os.fspath(out)
    with load(path) as old:
        if packed.method != old.method or validate_arch(packed.arch) != old.arch:
            raise UsageError(f"{path}: artifact holds method {old.method!r} on arch {old.arch.get('name')!r}; "
                             f"cannot append a {packed.method!r} model on arch {packed.arch.get('name')!r}")
        if packed.n_tasks < old.n_tasks or [t.to_json() for t in packed.tasks[:old.n_tasks]] != \
                [t.to_json() for t in old.tasks]:
            raise UsageError(f"{path}: the model must start with the artifact's {old.n_tasks} tasks "
                             f"{[t.name for t in old.tasks]}, got {[t.name for t in packed.tasks]}")
        packed = _checked(packed)
        tmp = write_temp(target, serialise(packed, old.fp16, old_names=old.n_tasks))
        try:
            with load(tmp) as new:
                for t in range(old.n_tasks):
                    _require_identical(path, t, old.materialize(t), new.materialize(t), keeps)
        except BaseException:
            discard(tmp)
            raise
    commit(tmp, target)
    return {"tasks": old.n_tasks, "keeps": keeps}


def _require_identical(path: str, t: int, before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                       keeps: str) -> None:
    for name, w in before.items():
        if keeps == "heads" and not name.startswith("head."):
            continue
        other = after.get(name)
        if other is None or other.shape != w.shape or other.tobytes() != w.tobytes():
            raise UsageError(f"{path}: appending would change task {t}'s tensor {name!r}; earlier tasks must stay "
                             "bit-identical")


def serialise(packed: PackedModel, fp16: bool, old_names: int = 0) -> list[bytes]:
    """The whole file as a list of byte strings (header first, then every blob). Task names must select their task
    (`deltas.task_name_conflicts`), except the first `old_names`, which an appended-to file already has."""
    if packed.n_tasks > MAX_TASKS or any(not 1 <= info.n_classes <= MAX_CLASSES for info in packed.tasks):
        raise UsageError(f"cannot store this model: at most {MAX_TASKS} tasks of 1-{MAX_CLASSES} classes each "
                         "(docs/ARTIFACT.md, limits)")
    problem = task_names_problem([info.name for info in packed.tasks], old_names)
    if problem:
        raise UsageError(f"{problem} (rename it)")
    layout = node_masks.layout_of(packed.task_tensors)
    blobs = encode_blobs(packed, fp16, layout)
    decoded = dense_bytes(packed.arch, [info.n_classes for info in packed.tasks])
    decoded += sum(math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize for _, e, _ in blobs)
    decoded += node_masks.view_bytes(len(layout), packed.n_tasks)
    problem = budget_problem(decoded, sum(len(d) for _, _, d in blobs))
    if problem:
        raise UsageError(f"cannot store this model: {problem} (docs/ARTIFACT.md, limits)")
    arch = packed.arch
    tasks = [{**info.to_json(), "input_shape": list(arch["input_shape"]), "input_dtype": "float32"}
             for info in packed.tasks]
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "edgecl_version": __version__,
                "method": packed.method, "config": packed.config, "arch": stored_form(arch), "fp16": bool(fp16), "tasks": tasks,
                "params": packed.params, "extra": packed.extra, "node_groups": layout,
                "blobs": {k: {f: e[f] for f in BLOB_FIELDS} for k, e, _ in blobs}}
    try:
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model metadata (config/extra/params) is not JSON-serialisable: {exc}") from None
    table, parts = container.layout(blobs)
    header = container.encode_header(text, table)
    if len(header) - 8 > MAX_HEADER_BYTES or header.count(b"{") + header.count(b"[") > MAX_JSON_CONTAINERS:
        raise UsageError(f"cannot store this model: its header would be {len(header) - 8} bytes (limit "
                         f"{MAX_HEADER_BYTES}) or hold too many JSON containers (docs/ARTIFACT.md, limits)")
    return [header] + parts


def encode_blobs(packed: PackedModel, fp16: bool, layout: node_masks.Layout) -> list[Blob]:
    """Every tensor of `packed` (base first, then task by task), each in its smallest candidate encoding; a task's
    node masks as one blob, in `layout` (`node_masks.layout_of`)."""
    owners: dict[str, np.ndarray] = {}  # LPS tensor → owner of every element, flat
    for name, spec in packed.params.items():
        if spec.get("kind") == "lps":
            owner = np.asarray(packed.base[f"{name}:owner"])
            problem = owner_problem(owner, packed.n_tasks)
            if problem:
                raise UsageError(f"tensor {name!r}: {problem}")
            owners[name] = expand_owner(owner, packed.base[name].shape, spec.get("unit", "element")).reshape(-1)
    items: list[tuple[str | int, str, np.ndarray]] = [("base", n, a) for n, a in packed.base.items()]
    for t, tt in enumerate(packed.task_tensors):
        if node_masks.PACKED in tt:
            raise UsageError(f"task {t} tensor name {node_masks.PACKED!r} is reserved (the blob of packed node masks)")
        items += [(t, n, a) for n, a in tt.items() if not node_masks.is_mask(n)]
        if layout:
            items.append((t, node_masks.PACKED, node_masks.join(tt, layout)))
    return [_encode_blob(packed, owners, scope, name, arr, fp16) for scope, name, arr in items]


def _encode_blob(packed: PackedModel, owners: dict[str, np.ndarray], scope: str | int, name: str, arr: Any,
                 fp16: bool) -> Blob:
    problem = name_problem(name)
    if problem:
        raise UsageError(problem)
    arr = np.asarray(arr)
    if arr.dtype.name not in container.ST_CODE or arr.ndim > MAX_NDIM:
        raise UsageError(f"tensor {name!r}: dtype {arr.dtype} / {arr.ndim} dims cannot be stored")
    arr = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
    support = ref = None
    if scope == "base" and name in owners and arr.dtype.kind == "f":
        free = ~support_mask(owners[name])
        if not np.any(arr.reshape(-1)[free].view(f"u{arr.dtype.itemsize}")):  # free entries are exactly +0.0
            support = support_mask(owners[name])
    lps = param_of(name, ":share")
    if scope != "base" and scope >= 1 and lps in owners and arr.dtype == np.bool_:
        ref = _previous_mask_ref(packed, owners[lps], scope, name, arr.size)
    if fp16 and scope == "base" and arr.dtype == np.float32 and np.any(np.abs(arr) > 65504):
        raise UsageError(f"tensor {name!r}: values beyond the fp16 range; save without fp16")
    best = None
    for steps in candidates(arr, fp16 and scope == "base", support, ref):
        data = encode(arr, steps, support, ref)
        if best is None or len(data) < len(best[1]):
            best = (steps, data)
    steps, data = best
    entry = {"scope": scope, "name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "encoding": steps,
             "blake2b": container.checksum(data)}
    return blob_key(scope, name), entry, data


def _previous_mask_ref(packed: PackedModel, owner_el: np.ndarray, t: int, name: str, size: int) -> np.ndarray | None:
    """Task t-1's sharing mask laid over task t's domain, when it fits (then XOR against it is a candidate)."""
    prev = packed.task_tensors[t - 1].get(name)
    if prev is None:
        return None
    try:
        ref = xor_ref(owner_el, t, np.asarray(prev, bool))
    except ValueError:
        return None
    return ref if ref.shape == (size,) else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")
