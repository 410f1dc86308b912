"""The edgecl artifact: one safe, compact, versioned file holding a `PackedModel` (spec: docs/ARTIFACT.md).

The container is safetensors (8-byte header length, JSON header, raw tensor bytes), so any safetensors tool can list
it and nothing on the load path can execute code. The header's ``__metadata__`` carries the JSON manifest (format
version, arch, method and config, tasks, delta specs, and per blob its decoded dtype/shape, encoding and checksum) plus
one digest over the manifest and the tensor table. Blobs are stored raw or encoded (bit-packing, XOR against the
previous task's mask, support-only values, byte shuffle, zstd): the writer keeps whichever candidate is smallest.

Reading is lazy: `load` validates header and manifest only; `Artifact.materialize(t)` reads, verifies and decodes
just the base blobs and task t's blobs, then runs `deltas.materialize_param` — the delta arithmetic lives there only.
Every damage the reader can meet becomes `ArtifactError(path, field, problem)`; decoded sizes are bounded by the
manifest's shapes, and those by the file size, before anything is allocated. Depends on numpy and zstandard only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from typing import Any, Iterable

import numpy as np
import zstandard

from edgecl import __version__
from edgecl.arch import dense_params, gemm_shape, param_shapes
from edgecl.arch import validate as validate_arch
from edgecl.deltas import KINDS, PackedModel, TaskInfo, check_consistent, materialize_param
from edgecl.errors import ArtifactError, UsageError
from edgecl.io import commit, discard, write_atomic, write_temp

FORMAT_NAME = "edgecl-artifact"
FORMAT_VERSION = 2  # 2: the architecture is a graph of nodes (edgecl.arch.spec); 1: a list of layers
READABLE_VERSIONS = (1, 2)
META_MANIFEST, META_DIGEST = "edgecl.manifest", "edgecl.digest"
MAX_HEADER_BYTES = 64 << 20
# Everything a file can make the reader allocate (all decoded blobs plus one dense task) stays under this bound.
DECODE_FLOOR, DECODE_RATIO = 64 << 20, 1024
MAX_NDIM, MAX_TASKS, MAX_CLASSES = 8, 1 << 16, 1 << 20

_ST_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
              "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "F32": "float32", "F64": "float64"}
_ST_CODE = {v: k for k, v in _ST_DTYPES.items()}
# Encoding steps in the order the writer applies them (the reader undoes them in reverse).
STEPS = ("xor", "support", "fp16", "bits", "narrow8", "narrow16", "narrow32", "shuffle", "zstd")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}")
_KEY = re.compile(r"(base|task(0|[1-9][0-9]{0,5}))::(.+)")
_CHECKSUM = re.compile(r"[0-9a-f]{32}")
BLOB_FIELDS = ("dtype", "shape", "encoding", "blake2b")


# ---------------------------------------------------------------------------------------------------------- encoding

def _rep_dtype(dtype: np.dtype, steps: list[str]) -> np.dtype | None:
    """Validate an encoding for a decoded dtype; the stored element dtype (None: bit-packed). Raises ValueError."""
    if not isinstance(steps, list) or not all(isinstance(s, str) and s in STEPS for s in steps):
        raise ValueError(f"unknown encoding {steps!r} (steps: {', '.join(STEPS)})")
    order = [STEPS.index(s) for s in steps]
    if order != sorted(set(order)):
        raise ValueError(f"encoding steps {steps} repeated or out of order")
    if dtype == np.bool_ and "bits" not in steps:
        raise ValueError("bool tensors must be bit-packed")
    rep: np.dtype | None = dtype
    for s in steps:
        ok = {"xor": dtype == np.bool_, "bits": dtype == np.bool_, "support": dtype.kind == "f",
              "fp16": dtype == np.float32, "shuffle": rep is not None and rep.itemsize > 1, "zstd": True}.get(s)
        if s.startswith("narrow"):
            ok = dtype.kind in "iu" and rep == dtype and dtype.itemsize * 8 > int(s[6:])
            rep = np.dtype(f"uint{s[6:]}")
        if not ok:
            raise ValueError(f"encoding step {s!r} does not apply to {dtype.name} here")
        rep = {"fp16": np.dtype(np.float16), "bits": None}.get(s, rep)
    return rep


def _encode(arr: np.ndarray, steps: list[str], support: np.ndarray | None, ref: np.ndarray | None) -> bytes:
    a = arr.reshape(-1)
    for s in steps:
        if s == "xor":
            a = a ^ ref
        elif s == "support":
            a = a[support]
        elif s == "fp16":
            a = a.astype("<f2")
        elif s == "bits":
            a = np.packbits(a, bitorder="little")
        elif s.startswith("narrow"):
            a = a.astype(f"<u{int(s[6:]) // 8}")
        elif s == "shuffle":
            a = np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T)
        elif s == "zstd":
            data = np.ascontiguousarray(a).tobytes()
            level = 19 if len(data) <= 1 << 20 else 9 if len(data) <= 16 << 20 else 3
            return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    return np.ascontiguousarray(a).tobytes()


def _unzstd(data: bytes, size: int) -> bytes:
    """Exactly one zstd frame that declares exactly `size` bytes; never allocates more than that."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise ValueError("not a zstd frame") from None
    if declared != size:
        raise ValueError(f"zstd frame declares {declared} bytes, the manifest {size}")
    obj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = obj.decompress(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd: {exc}") from None
    if not obj.eof or obj.unused_data or len(out) != size:
        raise ValueError(f"zstd frame incomplete or followed by extra bytes ({len(out)} of {size} bytes)")
    return out


def _decode(stored: bytes, dtype: np.dtype, shape: tuple[int, ...], steps: list[str],
            support: np.ndarray | None, ref: np.ndarray | None) -> np.ndarray:
    rep = _rep_dtype(dtype, steps)
    n = math.prod(shape)
    n_rep = int(support.sum()) if "support" in steps else n
    nbytes = (n_rep + 7) // 8 if rep is None else n_rep * rep.itemsize
    buf = _unzstd(stored, nbytes) if "zstd" in steps else stored
    if len(buf) != nbytes:
        raise ValueError(f"{len(buf)} bytes stored, {nbytes} expected")
    raw = np.frombuffer(buf, np.uint8)
    if "shuffle" in steps:
        raw = np.ascontiguousarray(raw.reshape(rep.itemsize, n_rep).T).reshape(-1)
    if rep is None:
        a = np.unpackbits(raw, count=n_rep, bitorder="little").astype(bool)
    else:
        a = raw.view(rep.newbyteorder("<")).astype(dtype)
    if "support" in steps:
        full = np.zeros(n, dtype)
        full[support] = a
        a = full
    if "xor" in steps:
        a = a ^ ref
    return a.reshape(shape)


def _candidates(arr: np.ndarray, fp16: bool, support: np.ndarray | None, ref: np.ndarray | None) -> list[list[str]]:
    """Encodings worth trying for one tensor; the writer keeps the smallest."""
    dt = arr.dtype
    if dt == np.bool_:
        heads = [["bits"]] + ([["xor", "bits"]] if ref is not None else [])
        return [h + z for h in heads for z in ([], ["zstd"])]
    if dt.kind in "iu":
        narrow = []
        if arr.size and arr.min() >= 0:
            narrow = [[f"narrow{b}"] for b in (8, 16, 32) if arr.max() < 1 << b and dt.itemsize * 8 > b][:1]
        heads = [[]] + narrow
    elif dt.kind == "f":
        heads = [["support"]] if support is not None else [[]]
        if support is not None:
            heads.append([])
        if fp16 and dt == np.float32:
            heads = [h + ["fp16"] for h in heads]
    else:
        raise UsageError(f"tensor dtype {dt} cannot be stored (bool, integers and floats only)")
    out = []
    for h in heads:
        rep = _rep_dtype(dt, h) if h else dt
        out += [h, h + ["zstd"]] + ([h + ["shuffle", "zstd"]] if rep.itemsize > 1 else [])
    return out


# ---------------------------------------------------------------------------------------------------------- helpers

def _key(scope: str | int, name: str) -> str:
    return f"base::{name}" if scope == "base" else f"task{scope}::{name}"


def _param_of(name: str, suffix: str) -> str | None:
    return name[:-len(suffix)] if name.endswith(suffix) else None


def _owner_units_shape(shape: tuple[int, ...], unit: str) -> tuple[int, ...]:
    p, q = gemm_shape(shape) if len(shape) >= 1 else (1, 1)
    return {"element": shape, "row": (p,), "column": (q,)}[unit]


def _owner_elements(owner: np.ndarray, shape: tuple[int, ...], unit: str) -> np.ndarray:
    """Owner of every element, flat in C order (the same expansion as deltas.lps_owner_elements)."""
    if unit == "element":
        return owner.reshape(-1)
    p, q = gemm_shape(shape)
    return np.broadcast_to(owner.reshape((p, 1) if unit == "row" else (1, q)), (p, q)).reshape(-1)


def _xor_ref(owner_el: np.ndarray, t: int, prev_share: np.ndarray) -> np.ndarray:
    """Task t-1's sharing mask laid over task t's domain (elements owned by tasks < t), zero on task t-1's own."""
    dom = owner_el[(owner_el >= 1) & (owner_el <= t)]
    common = dom <= t - 1
    if int(common.sum()) != prev_share.size:
        raise ValueError(f"previous task's sharing mask has {prev_share.size} bits, its domain {int(common.sum())}")
    ref = np.zeros(dom.size, bool)
    ref[common] = prev_share.reshape(-1)
    return ref


def _support_mask(owner_el: np.ndarray) -> np.ndarray:
    return owner_el != 0


def _owner_problem(owner: np.ndarray, n_tasks: int) -> str | None:
    if owner.dtype.kind not in "iu":
        return f"owner map has dtype {owner.dtype}, needs an integer dtype"
    if owner.size and (owner.min() < 0 or owner.max() > n_tasks):
        return f"owner values span {owner.min()}..{owner.max()}, allowed 0..{n_tasks} (0 free, i+1 task i)"
    return None


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _TENSOR_NAME.fullmatch(name) or ".." in name:
        return f"tensor name {name!r} is not allowed (letters, digits, _ . : -; no '..'; ≤ 200 chars)"
    return None


def _task_name_problem(name: object) -> str | None:
    if (not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable() or name.startswith(".")
            or any(c in name for c in "/\\")):
        return f"task name {name!r} is not allowed (1-128 printable characters, no '/' or '\\', no leading '.')"
    return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _checksum(data: bytes) -> str:
    """128-bit BLAKE2b of a blob's stored bytes: catches damage, costs 32 hex characters per blob."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _digest(manifest_text: str, entries: dict[str, Any]) -> str:
    """sha256 over the manifest and the tensor table, so every header byte that matters is covered."""
    table = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(manifest_text.encode() + b"\0" + table.encode()).hexdigest()


def _with_head(trunk: dict[str, tuple[int, ...]], arch: dict, n_classes: int) -> dict[str, tuple[int, ...]]:
    """`param_shapes(arch, n_classes)` from an already computed trunk (arch.py's head naming)."""
    return {**trunk, "head.weight": (n_classes, arch["feature_dim"]), "head.bias": (n_classes,)}


def _dense_bytes(arch: dict, n_classes: list[int]) -> int:
    """fp32 bytes of one task's dense weights (the largest head): what `materialize` allocates."""
    return 4 * dense_params(arch, max(n_classes, default=0))


def _budget_problem(decoded: int, size: int) -> str | None:
    bound = DECODE_FLOOR + DECODE_RATIO * size
    if decoded > bound:
        return f"declares {decoded} decoded bytes, beyond the bound {bound} for {size} stored bytes"
    return None


def _is_int(x: object, lo: int = 0, hi: int = 1 << 62) -> bool:
    return type(x) is int and lo <= x <= hi


# ------------------------------------------------------------------------------------------------------------ write

def _encode_blobs(packed: PackedModel, fp16: bool, reuse: dict[str, dict] | None = None):
    """(key, manifest entry, stored bytes) for every tensor; each with its smallest encoding."""
    owners: dict[str, np.ndarray] = {}
    for name, spec in packed.params.items():
        if spec.get("kind") == "lps":
            owner = np.asarray(packed.base[f"{name}:owner"])
            problem = _owner_problem(owner, packed.n_tasks)
            if problem:
                raise UsageError(f"tensor {name!r}: {problem}")
            owners[name] = _owner_elements(owner, packed.base[name].shape, spec.get("unit", "element"))
    items: list[tuple[str | int, str, np.ndarray]] = [("base", n, a) for n, a in packed.base.items()]
    items += [(t, n, a) for t, tt in enumerate(packed.task_tensors) for n, a in tt.items()]
    out = []
    for scope, name, arr in items:
        problem = _name_problem(name)
        if problem:
            raise UsageError(problem)
        arr = np.asarray(arr)
        if arr.dtype.name not in _ST_CODE or arr.ndim > MAX_NDIM:
            raise UsageError(f"tensor {name!r}: dtype {arr.dtype} / {arr.ndim} dims cannot be stored")
        arr = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
        support = ref = None
        if scope == "base" and name in owners and arr.dtype.kind == "f":
            free = ~_support_mask(owners[name])
            if not np.any(arr.reshape(-1)[free].view(f"u{arr.dtype.itemsize}")):  # free entries are exactly +0.0
                support = _support_mask(owners[name])
        lps = _param_of(name, ":share")
        if scope != "base" and scope >= 1 and lps in owners and arr.dtype == np.bool_:
            prev = packed.task_tensors[scope - 1].get(name)
            if prev is not None:
                try:
                    ref = _xor_ref(owners[lps], scope, np.asarray(prev, bool))
                except ValueError:
                    ref = None
                if ref is not None and ref.shape != (arr.size,):
                    ref = None
        if fp16 and scope == "base" and arr.dtype == np.float32 and np.any(np.abs(arr) > 65504):
            raise UsageError(f"tensor {name!r}: values beyond the fp16 range; save without fp16")
        best = None
        for steps in _candidates(arr, fp16 and scope == "base", support, ref):
            data = _encode(arr, steps, support, ref)
            if best is None or len(data) < len(best[1]):
                best = (steps, data)
        steps, data = best
        entry = {"scope": scope, "name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                 "encoding": steps, "blake2b": _checksum(data)}
        out.append((_key(scope, name), entry, data))
    return out


def _container_layout(blobs) -> tuple[dict[str, Any], list[bytes]]:
    entries, parts, offset = {}, [], 0
    for key, entry, data in blobs:
        steps = entry["encoding"]
        if not steps:
            dtype, shape = _ST_CODE[entry["dtype"]], entry["shape"]
        elif steps == ["fp16"]:
            dtype, shape = "F16", entry["shape"]
        else:
            dtype, shape = "U8", [len(data)]
        entries[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        parts.append(data)
        offset += len(data)
    return entries, parts


def _serialise(packed: PackedModel, fp16: bool) -> list[bytes]:
    """The whole file as a list of byte strings."""
    blobs = _encode_blobs(packed, fp16)
    decoded = _dense_bytes(packed.arch, [info.n_classes for info in packed.tasks])
    decoded += sum(math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize for _, e, _ in blobs)
    problem = _budget_problem(decoded, sum(len(d) for _, _, d in blobs))
    if problem:
        raise UsageError(f"cannot store this model: {problem} (docs/ARTIFACT.md, limits)")
    arch = packed.arch
    tasks = [{**info.to_json(), "input_shape": list(arch["input_shape"]), "input_dtype": "float32"}
             for info in packed.tasks]
    for info in packed.tasks:
        problem = _task_name_problem(info.name)
        if problem:
            raise UsageError(problem)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "edgecl_version": __version__,
                "method": packed.method, "config": packed.config, "arch": arch, "fp16": bool(fp16), "tasks": tasks,
                "params": packed.params, "extra": packed.extra,
                "blobs": {k: {f: e[f] for f in BLOB_FIELDS} for k, e, _ in blobs}}
    try:
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model metadata (config/extra/params) is not JSON-serialisable: {exc}") from None
    entries, parts = _container_layout(blobs)
    header = {"__metadata__": {META_MANIFEST: text, META_DIGEST: _digest(text, entries)}, **entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [len(raw).to_bytes(8, "little"), raw] + parts


def save(packed: PackedModel, path: str | os.PathLike, *, fp16: bool = False) -> None:
    """Write `packed` as one artifact, atomically. fp16 stores float32 base tensors as float16 (materialised as
    float32 again, so no longer bit-exact to training). UsageError for an inconsistent or unstorable model."""
    check_consistent(packed)
    path = os.fspath(path)
    write_atomic(path, _serialise(packed, fp16))


# ------------------------------------------------------------------------------------------------------------- read

class Artifact:
    """An opened artifact: manifest in memory, tensors read (and verified) on demand. Thread-safe reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.reads: list[str] = []  # blob keys read from disk, in order (tests use it to prove laziness)
        self._cache: dict[str, np.ndarray] = {}  # decoded base blobs, shared by every task
        self._lock = threading.Lock()
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise ArtifactError(self.path, "file", f"cannot open: {exc.strerror or exc}") from None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._parse()
        except BaseException:
            self._file.close()
            raise

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

    # -- header and manifest
    def _parse(self) -> None:
        if self.size < 8:
            raise self._fail("header", f"file is {self.size} bytes, too short for an artifact")
        n = int.from_bytes(self._pread(8, 0, "header length"), "little")
        if n > min(self.size - 8, MAX_HEADER_BYTES) or n < 2:
            raise self._fail("header length", f"declares {n} bytes; the file has {self.size} "
                                              f"(limit {MAX_HEADER_BYTES})")
        header = self._json(self._pread(n, 8, "header"), "header")
        if not isinstance(header, dict):
            raise self._fail("header", "not a JSON object")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not isinstance(meta.get(META_MANIFEST), str):
            raise self._fail("header.__metadata__", f"no {META_MANIFEST!r} entry: not an edgecl artifact")
        self._data_start = 8 + n
        self._entries = self._check_table(header)
        if meta.get(META_DIGEST) != _digest(meta[META_MANIFEST], header):
            raise self._fail(META_DIGEST, "manifest/tensor table checksum mismatch (header damaged)")
        manifest = self._json(meta[META_MANIFEST].encode(), "manifest")
        self._check_manifest(manifest)
        self.manifest: dict[str, Any] = manifest
        self.arch = manifest["arch"]
        self.method: str = manifest["method"]
        self.config: dict[str, Any] = manifest["config"]
        self.extra: dict[str, Any] = manifest["extra"]
        self.params: dict[str, dict[str, Any]] = manifest["params"]
        self.fp16: bool = manifest["fp16"]
        self.tasks = [TaskInfo(t["name"], t["n_classes"], t.get("seed")) for t in manifest["tasks"]]
        self.blobs: dict[str, dict[str, Any]] = manifest["blobs"]
        self._check_structure()

    def _json(self, raw: bytes, field: str) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._fail(field, f"not valid JSON ({str(exc)[:120]})") from None

    def _check_table(self, header: dict[str, Any]) -> dict[str, tuple[str, list[int], int, int]]:
        """safetensors tensor table: known dtypes, sane shapes, offsets tiling the data area exactly."""
        table = {}
        for key, e in header.items():
            field = f"tensor table[{key!r}]"
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                raise self._fail(field, "entry must have exactly dtype, shape, data_offsets")
            shape, offs = e["shape"], e["data_offsets"]
            if not isinstance(e["dtype"], str) or e["dtype"] not in _ST_DTYPES:
                raise self._fail(field, f"unknown dtype {e['dtype']!r}")
            if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) for d in shape):
                raise self._fail(field, f"bad shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                    and offs[0] <= offs[1]):
                raise self._fail(field, f"bad data_offsets {offs!r}")
            nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[e["dtype"]]).itemsize
            if offs[1] - offs[0] != nbytes:
                raise self._fail(field, f"data_offsets span {offs[1] - offs[0]} bytes, shape×dtype needs {nbytes}")
            table[key] = (e["dtype"], shape, offs[0], offs[1])
        end = 0
        for key, (_, _, start, stop) in sorted(table.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if start != end:
                raise self._fail(f"tensor table[{key!r}]", f"data starts at {start}, expected {end} (gap/overlap)")
            end = stop
        if self._data_start + end != self.size:
            raise self._fail("file size", f"{self.size} bytes, the header accounts for {self._data_start + end} "
                                          "(truncated or extended)")
        return table

    def _check_manifest(self, m: Any) -> None:
        if not isinstance(m, dict):
            raise self._fail("manifest", "not a JSON object")
        if m.get("format") != FORMAT_NAME:
            raise self._fail("manifest.format", f"is {m.get('format')!r}, expected {FORMAT_NAME!r}")
        version = m.get("format_version")
        if not _is_int(version, 1):
            raise self._fail("manifest.format_version", f"invalid value {version!r}")
        if version not in READABLE_VERSIONS:
            raise self._fail("manifest.format_version", f"version {version} is not readable by this edgecl "
                                                        f"{__version__} (reads versions {READABLE_VERSIONS})")
        for key, typ in (("edgecl_version", str), ("method", str), ("config", dict), ("arch", dict),
                         ("fp16", bool), ("tasks", list), ("params", dict), ("extra", dict), ("blobs", dict)):
            if not isinstance(m.get(key), typ):
                raise self._fail(f"manifest.{key}", f"missing or not a {typ.__name__}")
        try:
            m["arch"] = validate_arch(m["arch"])
            trunk = param_shapes(m["arch"])
        except (UsageError, TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
                RecursionError) as exc:
            raise self._fail("manifest.arch", f"invalid architecture ({str(exc)[:200]})") from None
        if len(m["tasks"]) > MAX_TASKS:
            raise self._fail("manifest.tasks", f"{len(m['tasks'])} tasks (limit {MAX_TASKS})")
        for i, t in enumerate(m["tasks"]):
            field = f"manifest.tasks[{i}]"
            if not isinstance(t, dict):
                raise self._fail(field, "not an object")
            problem = _task_name_problem(t.get("name"))
            if problem:
                raise self._fail(f"{field}.name", problem)
            if not _is_int(t.get("n_classes"), 1, MAX_CLASSES):
                raise self._fail(f"{field}.n_classes", f"invalid value {t.get('n_classes')!r}")
            if t.get("seed") is not None and not _is_int(t.get("seed"), -(1 << 63), (1 << 64) - 1):
                raise self._fail(f"{field}.seed", f"invalid value {t.get('seed')!r}")
            if t.get("input_shape") != m["arch"]["input_shape"] or t.get("input_dtype") != "float32":
                raise self._fail(f"{field}.input_shape", "disagrees with the architecture (float32 inputs)")
        for name, spec in m["params"].items():
            self._check_spec(name, spec)
        missing = set(trunk) - set(m["params"])
        if missing:
            raise self._fail("manifest.params", f"no delta spec for trunk tensors {sorted(missing)}")
        if set(m["blobs"]) != set(self._entries):
            raise self._fail("manifest.blobs", f"blob list and tensor table differ: "
                                               f"{sorted(set(m['blobs']) ^ set(self._entries))[:5]}")
        decoded = _dense_bytes(m["arch"], [t["n_classes"] for t in m["tasks"]])
        for key, e in m["blobs"].items():
            decoded += self._check_blob_entry(key, e, len(m["tasks"]))
        problem = _budget_problem(decoded, self.size)
        if problem:
            raise self._fail("manifest.blobs", problem)

    def _check_spec(self, name: str, spec: Any) -> None:
        field = f"manifest.params[{name!r}]"
        problem = _name_problem(name)
        if problem:
            raise self._fail(field, problem)
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            raise self._fail(field, f"kind must be one of {KINDS}")
        checks = {"unit": lambda v: v in ("element", "row", "column"),
                  "rows": lambda v: v is None or isinstance(v, str), "cols": lambda v: v is None or isinstance(v, str),
                  "repeat": lambda v: _is_int(v, 1), "group": lambda v: isinstance(v, str)}
        for key, ok in checks.items():
            if key in spec and not ok(spec[key]):
                raise self._fail(f"{field}.{key}", f"invalid value {spec[key]!r}")
        if spec["kind"] == "permute" and "group" not in spec:
            raise self._fail(f"{field}.group", "permute tensors need a group")

    def _check_blob_entry(self, key: str, e: Any, n_tasks: int) -> int:
        """Validate one manifest blob entry against the tensor table; returns its decoded byte count."""
        field = f"blob {key!r}"
        match = _KEY.fullmatch(key)
        if not isinstance(e, dict) or match is None or set(e) != set(BLOB_FIELDS):
            raise self._fail(field, f"malformed key, or entry without exactly the fields {BLOB_FIELDS}")
        scope = "base" if match.group(1) == "base" else int(match.group(2))
        if scope != "base" and scope >= n_tasks:
            raise self._fail(field, f"task {scope} out of range ({n_tasks} tasks)")
        problem = _name_problem(match.group(3))
        if problem:
            raise self._fail(field, problem)
        e["scope"], e["name"] = scope, match.group(3)  # in memory only: the key carries both
        if not isinstance(e["dtype"], str) or e["dtype"] not in _ST_CODE:
            raise self._fail(f"{field}.dtype", f"unsupported dtype {e.get('dtype')!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) for d in shape):
            raise self._fail(f"{field}.shape", f"bad shape {shape!r}")
        dtype = np.dtype(e["dtype"])
        try:
            _rep_dtype(dtype, e.get("encoding"))
        except ValueError as exc:
            raise self._fail(f"{field}.encoding", str(exc)) from None
        if not isinstance(e["blake2b"], str) or not _CHECKSUM.fullmatch(e["blake2b"]):
            raise self._fail(f"{field}.blake2b", "malformed checksum")
        st_dtype, st_shape, _, _ = self._entries[key]
        steps = e["encoding"]
        want = ((_ST_CODE[e["dtype"]], shape) if not steps else ("F16", shape) if steps == ["fp16"]
                else ("U8", [st_shape[0]] if len(st_shape) == 1 else None))
        if (st_dtype, st_shape) != want:
            raise self._fail(field, f"stored as {st_dtype}{st_shape}, the encoding {steps} implies {want}")
        return math.prod(shape) * dtype.itemsize

    def _blob_entry(self, scope: str | int, name: str) -> dict[str, Any] | None:
        return self.blobs.get(_key(scope, name))

    def _check_structure(self) -> None:
        """Declared shapes agree with the arch and the delta specs, for every task — from the manifest alone. Loops
        over tasks only where a blob is required, so a hostile manifest cannot make this slower than its size."""
        trunk = param_shapes(self.arch)
        shapes = {}
        for name, spec in self.params.items():
            kind = spec["kind"]
            if kind == "task":
                for t, info in enumerate(self.tasks):
                    self._need(t, name, _with_head(trunk, self.arch, info.n_classes).get(name))
                continue
            shape = shapes[name] = self._need("base", name, trunk.get(name))
            if kind in ("lps", "permute") and len(shape) < 1:
                raise self._fail(f"manifest.params[{name!r}]", f"{kind} tensors need at least one dimension")
            if kind == "lps":
                self._need("base", f"{name}:owner", _owner_units_shape(tuple(shape), spec.get("unit", "element")))
                if np.dtype(self._blob_entry("base", f"{name}:owner")["dtype"]).kind not in "iu":
                    raise self._fail(f"blob {_key('base', name + ':owner')!r}", "owner maps need an integer dtype")
            if kind == "node":
                for t in range(self.n_tasks):
                    if spec.get("rows"):
                        self._need(t, f"nodes:{spec['rows']}", (shape[0] if shape else -1,), bool)
                    if spec.get("cols"):
                        cols = self._need(t, f"nodes:{spec['cols']}", None, bool, 1)
                        if len(shape) < 2 or cols[0] * spec.get("repeat", 1) != shape[1]:
                            raise self._fail(f"blob {_key(t, 'nodes:' + spec['cols'])!r}",
                                             f"{cols[0]} nodes × repeat {spec.get('repeat', 1)} ≠ input width of "
                                             f"{name!r} {shape}")
        for key, e in self.blobs.items():
            scope, name, steps = e["scope"], e["name"], e["encoding"]
            stem, _, suffix = name.rpartition(":")
            kind = self.params.get(stem, {}).get("kind")
            if "support" in steps and (scope != "base" or self.params.get(name, {}).get("kind") != "lps"):
                raise self._fail(f"blob {key!r}", "support coding only applies to LPS base tensors")
            if scope == "base":
                continue
            if "xor" in steps and not (kind == "lps" and suffix == "share" and scope > 0
                                       and self._blob_entry(scope - 1, name) is not None):
                raise self._fail(f"blob {key!r}", "XOR coding needs an LPS sharing mask of the previous task")
            if kind == "lps" and suffix == "share":
                self._need(scope, name, None, bool, 1)
            elif kind == "lowrank" and suffix in ("r", "s", "u", "v"):
                self._check_lowrank(scope, stem, shapes[stem])

    def _check_lowrank(self, t: int, name: str, shape: list[int]) -> None:
        if len(shape) < 2:
            raise self._fail(f"manifest.params[{name!r}]", "low-rank factors need a 2-D or 4-D base")
        for s, dim in (("r", 0), ("s", 1)):
            if self._blob_entry(t, f"{name}:{s}") is not None:
                self._need(t, f"{name}:{s}", (shape[dim],))
        if self._blob_entry(t, f"{name}:u") is not None and self._blob_entry(t, f"{name}:v") is not None:
            u = self._need(t, f"{name}:u", None, None, 2)
            v = self._need(t, f"{name}:v", None, None, 2)
            if u[0] != shape[0] or v[0] != shape[1] or u[1] != v[1]:
                raise self._fail(f"blob {_key(t, name + ':u')!r}", f"factors {u} and {v} do not fit {shape}")

    def _need(self, scope: str | int, name: str, shape: Iterable[int] | None, dtype=None,
              ndim: int | None = None) -> list[int]:
        """The declared shape of a required blob, checked against what the arch/spec implies."""
        e = self._blob_entry(scope, name)
        field = f"blob {_key(scope, name)!r}"
        if e is None:
            raise self._fail(field, "missing")
        if shape is not None and e["shape"] != list(shape):
            raise self._fail(f"{field}.shape", f"is {e['shape']}, expected {list(shape)}")
        if ndim is not None and len(e["shape"]) != ndim:
            raise self._fail(f"{field}.shape", f"is {e['shape']}, expected {ndim} dimensions")
        if dtype is not None and np.dtype(e["dtype"]) != np.dtype(dtype):
            raise self._fail(f"{field}.dtype", f"is {e['dtype']}, expected {np.dtype(dtype).name}")
        if dtype is None and e["dtype"] not in ("float16", "float32", "float64") and e["scope"] != "base":
            raise self._fail(f"{field}.dtype", f"is {e['dtype']}, expected a float dtype")
        return e["shape"]

    # -- blobs
    def _read_blob(self, key: str, support: np.ndarray | None = None, ref: np.ndarray | None = None) -> np.ndarray:
        e = self.blobs[key]
        _, _, start, stop = self._entries[key]
        data = self._pread(stop - start, self._data_start + start, f"blob {key!r}")
        self.reads.append(key)
        if _checksum(data) != e["blake2b"]:
            raise self._fail(f"blob {key!r}", "checksum mismatch: stored bytes are damaged")
        try:
            return _decode(data, np.dtype(e["dtype"]), tuple(e["shape"]), e["encoding"], support, ref)
        except (ValueError, IndexError) as exc:
            raise self._fail(f"blob {key!r}", f"cannot decode: {exc}") from None

    def _owner_el(self, name: str) -> np.ndarray:
        owner = self._base(f"{name}:owner")
        return _owner_elements(owner, tuple(self.blobs[_key("base", name)]["shape"]),
                               self.params[name].get("unit", "element"))

    def _base(self, name: str) -> np.ndarray:
        key = _key("base", name)
        if key not in self._cache:
            support = None
            if "support" in self.blobs[key]["encoding"]:
                support = _support_mask(self._owner_el(name))
            arr = self._read_blob(key, support)
            lps = _param_of(name, ":owner")
            if lps is not None and self.params.get(lps, {}).get("kind") == "lps":
                problem = _owner_problem(arr, self.n_tasks)
                if problem:
                    raise self._fail(f"blob {key!r}", problem)
            arr.flags.writeable = False
            self._cache[key] = arr
        return self._cache[key]

    def _task_blob(self, t: int, name: str) -> np.ndarray:
        key = _key(t, name)
        if "xor" not in self.blobs[key]["encoding"]:
            return self._read_blob(key)
        lps = _param_of(name, ":share")
        owner_el = self._owner_el(lps)
        first = t
        while "xor" in self.blobs[_key(first, name)]["encoding"]:
            first -= 1  # the structure check guarantees a chain ending in a directly coded mask
        mask = self._read_blob(_key(first, name))
        for u in range(first + 1, t + 1):
            try:
                ref = _xor_ref(owner_el, u, mask)
            except ValueError as exc:
                raise self._fail(f"blob {_key(u, name)!r}", str(exc)) from None
            if ref.size != math.prod(self.blobs[_key(u, name)]["shape"]):
                raise self._fail(f"blob {_key(u, name)!r}", f"has {self.blobs[_key(u, name)]['shape']} bits, "
                                                           f"task {u}'s earlier support {ref.size}")
            mask = self._read_blob(_key(u, name), None, ref)
        return mask

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
        if _key("base", name) not in self.blobs:
            raise UsageError(f"{self.path}: no shared tensor {name!r}")
        return self._base(name)

    def read_task(self, t: int) -> dict[str, np.ndarray]:
        """Task t's own tensors, read, verified and decoded now (not cached: the caller decides what to keep)."""
        t = self.task_index(t)
        return {e["name"]: self._task_blob(t, e["name"]) for e in self.blobs.values() if e["scope"] == t}

    def task_index(self, task: int | str) -> int:
        """Index of a task given by index or name; UsageError naming the task otherwise."""
        return self._view({}).task_index(task)

    def _view(self, task_tensors: dict[int, dict[str, np.ndarray]]) -> PackedModel:
        """A PackedModel over the blobs decoded so far (other tasks' tensors left empty)."""
        base = {}
        for name, spec in self.params.items():
            if spec["kind"] != "task":
                base[name] = self._base(name) if task_tensors else None
                if spec["kind"] == "lps" and task_tensors:
                    base[f"{name}:owner"] = self._base(f"{name}:owner")
        tt = [task_tensors.get(t, {}) for t in range(self.n_tasks)]
        return PackedModel(self.arch, self.method, self.config, self.params, base, list(self.tasks), tt, self.extra)

    def materialize(self, task: int | str) -> dict[str, np.ndarray]:
        """Dense float32 weights of one task (trunk + its head), reading only the base and that task's blobs.
        Bit-exact to `deltas.materialize` of the saved model (fp32 files)."""
        t = self.task_index(task)
        names = [e["name"] for e in self.blobs.values() if e["scope"] == t]
        view = self._view({t: {name: self._task_blob(t, name) for name in names}})
        return self._materialize_view(view, t)

    def _materialize_view(self, view: PackedModel, t: int) -> dict[str, np.ndarray]:
        expect = param_shapes(self.arch, self.tasks[t].n_classes)
        out = {}
        for name in self.params:
            field = f"tensor {name!r}, task {t} ({self.tasks[t].name})"
            try:
                w = materialize_param(view, t, name)
            except (UsageError, KeyError, ValueError, IndexError, TypeError) as exc:
                raise self._fail(field, f"inconsistent delta ({str(exc)[:200]})") from None
            want = expect.get(name, w.shape)
            if w.shape != tuple(want) or w.dtype != np.float32:
                raise self._fail(field, f"materialises to {w.dtype}{w.shape}, expected float32{tuple(want)}")
            out[name] = w.copy() if w is view.base.get(name) else w  # never hand out the shared cache
        return out

    def to_packed(self) -> PackedModel:
        """Everything, decoded and verified (every checksum, `deltas.check_consistent`)."""
        base = {e["name"]: self._base(e["name"]) for e in self.blobs.values() if e["scope"] == "base"}
        tt: list[dict[str, np.ndarray]] = [{} for _ in self.tasks]
        for e in self.blobs.values():
            if e["scope"] != "base":
                tt[e["scope"]][e["name"]] = self._task_blob(e["scope"], e["name"])
        packed = PackedModel(self.arch, self.method, self.config, self.params, base, list(self.tasks), tt,
                             self.extra)
        try:
            check_consistent(packed)
        except (UsageError, KeyError, ValueError, IndexError, TypeError) as exc:
            raise self._fail("model", f"inconsistent ({str(exc)[:200]})") from None
        return packed

    def verify(self) -> None:
        """Read and check every blob; ArtifactError on the first problem."""
        self.to_packed()


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact lazily: header and manifest are read and validated, tensors wait for `materialize`."""
    return Artifact(path)


# ----------------------------------------------------------------------------------------------------------- append

def as_packed(source: Any) -> PackedModel:
    """A verified `PackedModel` from an artifact path, an open `Artifact`, or a `PackedModel` (checked for
    consistency): the one entry the runtime and tools use, whatever the caller holds."""
    if isinstance(source, PackedModel):
        try:
            check_consistent(source)
        except UsageError as exc:
            raise UsageError(f"inconsistent model: {exc}") from None
        return source
    if isinstance(source, (str, os.PathLike)):
        with load(source) as opened:
            return opened.to_packed()  # decodes, verifies every checksum and runs check_consistent
    if isinstance(source, Artifact):
        return source.to_packed()
    raise UsageError(f"expected an artifact path, Artifact or PackedModel, got {type(source).__name__}")


def append_task(path: str | os.PathLike, packed: PackedModel, *, unchanged: str = "all") -> None:
    """Replace the artifact at `path` with `packed` (its tasks plus new ones), atomically — but only after every task
    already in the file materialises bit-identically from the new content: every tensor (`unchanged="all"`), or only
    the heads (`"heads"`, for methods such as RGO whose shared trunk keeps learning by design). UsageError when
    `packed` is another method/arch, drops or renames tasks, or would change what must stay; ArtifactError when the
    file is damaged."""
    if unchanged not in ("all", "heads"):
        raise UsageError(f"append_task: unchanged must be 'all' or 'heads', got {unchanged!r}")
    path = os.fspath(path)
    with load(path) as old:
        if packed.method != old.method or validate_arch(packed.arch) != old.arch:
            raise UsageError(f"{path}: artifact holds method {old.method!r} on arch {old.arch.get('name')!r}; "
                             f"cannot append a {packed.method!r} model on arch {packed.arch.get('name')!r}")
        if packed.n_tasks < old.n_tasks or [t.to_json() for t in packed.tasks[:old.n_tasks]] != \
                [t.to_json() for t in old.tasks]:
            raise UsageError(f"{path}: the model must start with the artifact's {old.n_tasks} tasks "
                             f"{[t.name for t in old.tasks]}, got {[t.name for t in packed.tasks]}")
        check_consistent(packed)
        tmp = write_temp(path, _serialise(packed, old.fp16))
        try:
            with load(tmp) as new:
                for t in range(old.n_tasks):
                    _require_identical(path, t, old.materialize(t), new.materialize(t), unchanged)
        except BaseException:
            discard(tmp)
            raise
    commit(tmp, path)


def _require_identical(path: str, t: int, before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                       unchanged: str = "all") -> None:
    for name, w in before.items():
        if unchanged == "heads" and not name.startswith("head."):
            continue
        other = after.get(name)
        if other is None or other.shape != w.shape or other.tobytes() != w.tobytes():
            raise UsageError(f"{path}: appending would change task {t}'s tensor {name!r}; earlier tasks must stay "
                             "bit-identical")


# ---------------------------------------------------------------------------------------------------------- inspect

COMPONENTS = ("base weights", "owner maps", "sharing masks", "node masks", "low-rank factors", "heads",
              "per-task tensors", "manifest")
MASK_COMPONENTS = ("owner maps", "sharing masks")


def component_of(scope: str | int, name: str, params: dict[str, dict[str, Any]]) -> str:
    if scope == "base":
        return "owner maps" if name.endswith(":owner") else "base weights"
    if name.endswith(":share"):
        return "sharing masks"
    if name.startswith("nodes:"):
        return "node masks"
    stem, _, factor = name.rpartition(":")
    if factor in ("r", "s", "u", "v") and params.get(stem, {}).get("kind") == "lowrank":
        return "low-rank factors"
    return "heads" if name.startswith("head.") else "per-task tensors"


def _entropy_bits(arr: np.ndarray) -> float:
    """Order-0 (memoryless) entropy of an array's symbols, in bits for the whole array."""
    if arr.size == 0:
        return 0.0
    _, counts = np.unique(arr, return_counts=True)
    p = counts / arr.size
    return float(-(counts * np.log2(p)).sum())


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Bytes, parameters and bits per parameter per component and per task, plus order-0 entropy of the masks.
    Reads (and so verifies) every mask blob; weights are counted from the manifest."""
    with load(path) as art:
        rows = []
        for key, e in art.blobs.items():
            _, _, start, stop = art._entries[key]
            comp = component_of(e["scope"], e["name"], art.params)
            row = {"key": key, "component": comp, "task": None if e["scope"] == "base" else e["scope"],
                   "dtype": e["dtype"], "shape": e["shape"], "encoding": e["encoding"], "bytes": stop - start,
                   "params": math.prod(e["shape"])}
            if comp in MASK_COMPONENTS + ("node masks",):
                arr = art._base(e["name"]) if e["scope"] == "base" else art._task_blob(e["scope"], e["name"])
                row["entropy_bits"] = _entropy_bits(arr)
            rows.append(row)
        header_bytes = art._data_start
        dense = dense_params(art.arch, art.tasks[0].n_classes if art.tasks else 1)
        lps_weights = sum(math.prod(art.blobs[_key("base", n)]["shape"]) for n, s in art.params.items()
                          if s["kind"] == "lps")
        n_tasks, file_bytes, names = art.n_tasks, art.size, [info.name for info in art.tasks]
        meta = {"method": art.method, "arch": art.arch.get("name"), "format_version": FORMAT_VERSION,
                "edgecl_version": art.manifest["edgecl_version"], "fp16": art.fp16}
    comps = []
    for comp in COMPONENTS:
        sel = [r for r in rows if r["component"] == comp]
        nbytes = header_bytes if comp == "manifest" else sum(r["bytes"] for r in sel)
        params = sum(r["params"] for r in sel)
        if not nbytes:
            continue
        c = {"component": comp, "bytes": nbytes, "params": params,
             "bits_per_param": 8 * nbytes / params if params else None}
        if sel and all("entropy_bits" in r for r in sel):
            c["entropy_bytes"] = sum(r["entropy_bits"] for r in sel) / 8
            c["stored_over_entropy"] = nbytes / c["entropy_bytes"] if c["entropy_bytes"] else None
        comps.append(c)
    owner_bytes = sum(r["bytes"] for r in rows if r["component"] == "owner maps")
    tasks = []
    for t in range(n_tasks):
        sel = [r for r in rows if r["task"] == t]
        nbytes, params = sum(r["bytes"] for r in sel), sum(r["params"] for r in sel)
        share = sum(r["bytes"] for r in sel if r["component"] == "sharing masks")
        row = {"task": t, "name": names[t], "bytes": nbytes, "params": params, "bits_per_param": 8 * nbytes / params if params else None}
        if lps_weights:
            row["mask_bits_per_weight"] = 8 * (share + owner_bytes / n_tasks) / lps_weights
        tasks.append(row)
    mask_rows = [r for r in rows if r["component"] in MASK_COMPONENTS]
    masks = None
    if mask_rows:
        stored = sum(r["bytes"] for r in mask_rows)
        entropy = sum(r["entropy_bits"] for r in mask_rows) / 8
        masks = {"stored_bytes": stored, "entropy_bytes": entropy,
                 "stored_over_entropy": stored / entropy if entropy else None,
                 "bits_per_weight_per_task": 8 * stored / (lps_weights * n_tasks) if lps_weights and n_tasks else None}
    return {"path": os.fspath(path), **meta, "n_tasks": n_tasks, "file_bytes": file_bytes,
            "dense_params": dense, "dense_fp32_bytes": 4 * dense,
            "ratio_to_dense": file_bytes / (4 * dense) if dense else None,
            "separate_models_bytes": 4 * dense * n_tasks, "components": comps, "tasks": tasks, "masks": masks,
            "blobs": rows}
