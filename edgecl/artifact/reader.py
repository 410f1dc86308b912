"""Reading an artifact lazily: `load` checks the container and the manifest; blobs are read, verified against their
BLAKE2b and decoded only when a tensor is asked for, so one task's weights cost the base plus that task's blobs.

`Artifact` implements `edgecl.source.ModelSource`; the delta arithmetic stays in `deltas.materialize_param`. Every
damage met here becomes `ArtifactError(path, field, problem)`. A few small read-only accessors (`header_bytes`,
`blob_range`, `read_blob`) let tools such as `inspect` look at stored blobs without touching private state.
"""
from __future__ import annotations

import math
import os
import stat
import threading
from typing import Any

import numpy as np

from edgecl.arch.spec import param_shapes
from edgecl.artifact import container, manifest, node_masks
from edgecl.artifact.encodings import UNCHECKED, decode, stored_dtype, support_mask, xor_ref
from edgecl.artifact.manifest import blob_key, owner_problem, param_of
from edgecl.deltas import (PackedModel, TaskInfo, check_consistent, expand_owner, materialize_param,
                           nonfinite_count, resolve_task)
from edgecl.errors import ArtifactError, UsageError

_MODEL_ERRORS = (UsageError, KeyError, ValueError, IndexError, TypeError)
"""What the delta arithmetic can raise on inconsistent input that slipped past the manifest checks."""


def _open_regular(path: str) -> Any:
    """`path` opened for reading, refused unless it is a regular file. A FIFO or a device would block a read
    forever (or never end), so the path is checked first and opened non-blocking, then checked again on the open
    descriptor (the path may have been swapped between the two)."""
    if not path:
        raise ArtifactError(path, "file", "no path given (empty string)")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ArtifactError(path, "file", "not a regular file (a folder, pipe or device); give the .edgecl file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ArtifactError(path, "file", f"cannot open: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactError(path, "file", "not a regular file (a folder, pipe or device); give the .edgecl file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file never blocks; plain reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class Artifact:
    """An opened artifact: manifest in memory, tensors read (and verified) on demand. Thread-safe reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.reads: list[str] = []  # blob keys read from disk, in order (tests use it to prove laziness)
        self._cache: dict[str, np.ndarray] = {}  # decoded base blobs, shared by every task
        self._lock = threading.Lock()
        self._file = _open_regular(self.path)
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            header = container.read_header(self.path, self._pread, self.size)
            self._table, self._data_start = header.table, header.data_start
            self.digest: str = header.seal  # SHA-256 over manifest and tensor table: names this exact content
            self.manifest: dict[str, Any] = manifest.validate(self.path, header.manifest_text, self._table, self.size)
        except BaseException:
            self._file.close()
            raise
        m = self.manifest
        self.arch = m["arch"]
        self.method: str = m["method"]
        self.config: dict[str, Any] = m["config"]
        self.extra: dict[str, Any] = m["extra"]
        self.params: dict[str, dict[str, Any]] = m["params"]
        self.fp16: bool = m["fp16"]
        self.tasks = [TaskInfo(t["name"], t["n_classes"], t.get("seed")) for t in m["tasks"]]
        self.blobs: dict[str, dict[str, Any]] = m["blobs"]  # key → dtype, shape, encoding, blake2b, scope, name
        # format 3: every task's node masks in one blob, this layout (checked: the sizes sum to each blob's length)
        self.node_groups: node_masks.Layout | None = m.get("node_groups")

    # -- plumbing
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Artifact":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()

    def _fail(self, field: str, problem: str) -> ArtifactError:
        return ArtifactError(self.path, field, problem)

    def _pread(self, n: int, offset: int, field: str) -> bytes:
        try:
            with self._lock:
                self._file.seek(offset)
                data = self._file.read(n)
        except (OSError, ValueError) as exc:
            raise self._fail(field, f"read failed: {exc}") from None
        if len(data) != n:
            raise self._fail(field, f"file ends early: wanted {n} bytes at offset {offset}, got {len(data)}")
        return data

    # -- blobs
    def _read_blob(self, key: str, support: np.ndarray | None = None, ref: np.ndarray | None = None) -> np.ndarray:
        start, stop = self.blob_range(key)
        data = self._pread(stop - start, start, f"blob {key!r}")
        self.reads.append(key)
        return _verified(self.path, key, self.blobs[key], data, support, ref)

    def _owner_el(self, name: str) -> np.ndarray:
        """The owner of every element of LPS tensor `name`, flat in C order."""
        owner = self._base(f"{name}:owner")
        shape = tuple(self.blobs[blob_key("base", name)]["shape"])
        return expand_owner(owner, shape, self.params[name].get("unit", "element")).reshape(-1)

    def _base(self, name: str) -> np.ndarray:
        key = blob_key("base", name)
        if key not in self._cache:
            support = None
            if "support" in self.blobs[key]["encoding"]:
                support = support_mask(self._owner_el(name))
            arr = self._read_blob(key, support)
            lps = param_of(name, ":owner")
            if lps is not None and self.params.get(lps, {}).get("kind") == "lps":
                problem = owner_problem(arr, self.n_tasks)
                if problem:
                    raise self._fail(f"blob {key!r}", problem)
            arr.flags.writeable = False
            self._cache[key] = arr
        return self._cache[key]

    def _task_blob(self, t: int, name: str) -> np.ndarray:
        key = blob_key(t, name)
        if "xor" not in self.blobs[key]["encoding"]:
            return self._read_blob(key)
        owner_el = self._owner_el(param_of(name, ":share"))
        first = t
        while "xor" in self.blobs[blob_key(first, name)]["encoding"]:
            first -= 1  # the structure check guarantees a chain ending in a directly coded mask
        mask = self._read_blob(blob_key(first, name))
        for u in range(first + 1, t + 1):
            try:
                ref = xor_ref(owner_el, u, mask)
            except ValueError as exc:
                raise self._fail(f"blob {blob_key(u, name)!r}", str(exc)) from None
            if ref.size != math.prod(self.blobs[blob_key(u, name)]["shape"]):
                raise self._fail(f"blob {blob_key(u, name)!r}", f"has {self.blobs[blob_key(u, name)]['shape']} "
                                                                f"bits, task {u}'s earlier support {ref.size}")
            mask = self._read_blob(blob_key(u, name), None, ref)
        return mask

    # -- stored blobs, read-only (for tools such as `inspect`)
    @property
    def header_bytes(self) -> int:
        """Bytes before the data area: the length prefix and the JSON header (manifest and tensor table)."""
        return self._data_start

    def blob_range(self, key: str) -> tuple[int, int]:
        """[start, stop) of a blob's stored bytes in the file (stop − start is what it costs on disk)."""
        if key not in self._table:
            raise UsageError(f"{self.path}: no blob {key!r}")
        entry = self._table[key]
        return self._data_start + entry.start, self._data_start + entry.stop

    def read_blob(self, key: str) -> np.ndarray:
        """One blob by key, read, verified and decoded (base blobs cached and read-only, task blobs fresh)."""
        if key not in self.blobs:
            raise UsageError(f"{self.path}: no blob {key!r}")
        e = self.blobs[key]
        return self._base(e["name"]) if e["scope"] == "base" else self._task_blob(e["scope"], e["name"])

    # -- public API (`edgecl.source.ModelSource`)
    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def origin(self) -> str:
        return self.path

    def base_names(self) -> list[str]:
        return [e["name"] for e in self.blobs.values() if e["scope"] == "base"]

    def read_base(self, name: str) -> np.ndarray:
        """One shared tensor, read, verified and decoded once, then cached (read-only)."""
        if blob_key("base", name) not in self.blobs:
            raise UsageError(f"{self.path}: no shared tensor {name!r}")
        return self._base(name)

    def read_task(self, t: int) -> dict[str, np.ndarray]:
        """Task t's own tensors, read, verified and decoded now (not cached: the caller decides what to keep).
        Packed node masks (format 3) come as their `nodes:GROUP` views, as in memory."""
        t = self.task_index(t)
        out: dict[str, np.ndarray] = {}
        for e in self.blobs.values():
            if e["scope"] == t:
                out.update(self._task_tensors(t, e["name"]))
        return out

    def _task_tensors(self, t: int, name: str) -> dict[str, np.ndarray]:
        """The in-memory tensors stored in task t's blob `name`: itself, or one view per node group."""
        if self.node_groups is not None and name == node_masks.PACKED:
            return node_masks.split(self._task_blob(t, name), self.node_groups)
        return {name: self._task_blob(t, name)}

    def task_index(self, task: int | str) -> int:
        """Index of a task given by index or name; UsageError naming the task otherwise."""
        return resolve_task(self.tasks, task)

    def materialize(self, task: int | str) -> dict[str, np.ndarray]:
        """Dense float32 weights of one task (trunk + its head), reading only the base and that task's blobs.
        Bit-exact to `deltas.materialize` of the saved model (fp32 files)."""
        t = self.task_index(task)
        own = [self.read_task(t) if u == t else {} for u in range(self.n_tasks)]  # other tasks' tensors stay unread
        base = {}
        for name, spec in self.params.items():
            if spec["kind"] != "task":
                base[name] = self._base(name)
                if spec["kind"] == "lps":
                    base[f"{name}:owner"] = self._base(f"{name}:owner")
        view = PackedModel(self.arch, self.method, self.config, self.params, base, list(self.tasks), own, self.extra)
        expect = param_shapes(self.arch, self.tasks[t].n_classes)
        out = {}
        for name in self.params:
            field = f"tensor {name!r}, task {t} ({self.tasks[t].name})"
            try:
                w = materialize_param(view, t, name)
            except _MODEL_ERRORS as exc:
                raise self._fail(field, f"inconsistent delta ({str(exc)[:200]})") from None
            want = expect.get(name, w.shape)
            if w.shape != tuple(want) or w.dtype != np.float32:
                raise self._fail(field, f"materialises to {w.dtype}{w.shape}, expected float32{tuple(want)}")
            out[name] = w.copy() if w is view.base.get(name) else w  # never hand out the shared cache
        return out

    def to_packed(self) -> PackedModel:
        """Everything, decoded and verified (every checksum, `deltas.check_consistent`)."""
        base = {name: self._base(name) for name in self.base_names()}
        own: list[dict[str, np.ndarray]] = [{} for _ in self.tasks]
        for e in self.blobs.values():  # in file order
            if e["scope"] != "base":
                own[e["scope"]].update(self._task_tensors(e["scope"], e["name"]))
        packed = PackedModel(self.arch, self.method, self.config, self.params, base, list(self.tasks), own,
                             self.extra)
        try:
            check_consistent(packed)
        except _MODEL_ERRORS as exc:
            raise self._fail("model", f"inconsistent ({str(exc)[:200]})") from None
        return packed

    def verify(self) -> None:
        """Read and check every blob; ArtifactError on the first problem."""
        self.to_packed()

    def task_blobs(self, names: set[str]) -> "TaskBlobs":
        """Every task's blobs of the tensors `names` (stored as themselves: heads, per-task biases, STL trunks), to
        read again later, also after this `Artifact` is closed."""
        entries = {}
        for key, e in self.blobs.items():
            if e["scope"] != "base" and e["name"] in names:
                if "xor" in e["encoding"] or "support" in e["encoding"]:
                    raise UsageError(f"{self.path}: blob {key!r} is coded against other blobs; it cannot be read alone")
                entries[(e["scope"], e["name"])] = (key, *self.blob_range(key), e)
        return TaskBlobs(self.path, os.dup(self._file.fileno()), entries, checked=set(self.reads))


class TaskBlobs:
    """Chosen task blobs of an artifact, readable after the `Artifact` that made them is closed: a duplicate of its
    file handle and those blobs' entries, nothing else. The runtime keeps one to read a task's heads into a cache
    slot on a switch miss instead of holding every task's. The handle reads the file as it was opened: `save` and
    `append_task` replace a file by renaming a new one over it, which leaves this handle's bytes as they were."""

    def __init__(self, path: str, fd: int, entries: dict[tuple[int, str], tuple[str, int, int, dict[str, Any]]],
                 checked: set[str] | None = None):
        self.path, self._fd, self._entries = path, fd, entries
        # each blob's stored element type, validated once (the manifest's checks already passed)
        self._reps = {key: stored_dtype(np.dtype(e["dtype"]), e["encoding"]) for key, _, _, e in entries.values()}
        # blobs already decoded and found finite (by the Artifact, or a first read here): bytes that match their
        # BLAKE2b again decode to the same finite values, so the scan for NaN/inf is not repeated on every miss
        self._finite = set(checked or ())

    def shape(self, t: int, name: str) -> tuple[int, ...]:
        """The decoded shape of task t's tensor `name` (from the manifest: nothing is read)."""
        return tuple(self._entries[(t, name)][3]["shape"])

    def read(self, t: int, name: str) -> np.ndarray:
        """Task t's tensor `name`, read, verified against its BLAKE2b and decoded now; ArtifactError if the bytes on
        disk are damaged or gone."""
        key, start, stop, e = self._entries[(t, name)]
        if self._fd < 0:
            raise UsageError(f"{self.path}: its task blobs were closed")
        try:
            data = _pread(self._fd, stop - start, start)
        except OSError as exc:
            raise ArtifactError(self.path, f"blob {key!r}", f"read failed: {exc}") from None
        if len(data) != stop - start:
            raise ArtifactError(self.path, f"blob {key!r}", f"file ends early: wanted {stop - start} bytes at offset "
                                                            f"{start}, got {len(data)}")
        arr = _verified(self.path, key, e, data, finite=key not in self._finite, rep=self._reps[key])
        self._finite.add(key)
        return arr

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


_SEEK_LOCK = threading.Lock()


def _pread(fd: int, n: int, offset: int) -> bytes:
    """`os.pread` (no shared file position: threads may read at once); a locked seek + read where it is missing
    (Windows)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


def _verified(path: str, key: str, e: dict[str, Any], data: bytes, support: np.ndarray | None = None,
              ref: np.ndarray | None = None, finite: bool = True, rep: object = UNCHECKED) -> np.ndarray:
    """A blob's stored bytes checked against its BLAKE2b, decoded, and (`finite`) refused if they hold NaN or inf.
    `rep`: the blob's validated stored dtype (`encodings.decode`), where the caller has it."""
    if container.checksum(data) != e["blake2b"]:
        raise ArtifactError(path, f"blob {key!r}", "checksum mismatch: stored bytes are damaged")
    try:
        arr = decode(data, np.dtype(e["dtype"]), tuple(e["shape"]), e["encoding"], support, ref, rep)
    except (ValueError, IndexError) as exc:
        raise ArtifactError(path, f"blob {key!r}", f"cannot decode: {exc}") from None
    bad = nonfinite_count(arr) if finite else 0
    if bad:  # never stored by `save`: a forged file, refused before anything computes on it
        raise ArtifactError(path, f"blob {key!r}", f"{bad} NaN/inf values; artifacts hold only finite numbers")
    return arr


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact lazily: header and manifest are read and validated, tensors wait for `materialize`."""
    return Artifact(path)
