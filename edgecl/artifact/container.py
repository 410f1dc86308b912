"""The safetensors container around an artifact: header layout, the tensor table, and the two checksums.

Layout: 8-byte little-endian header length N, N bytes of JSON header (padded with spaces to a multiple of 8), then
the data area with every blob's stored bytes back to back. The header maps each blob key to its safetensors
``{"dtype", "shape", "data_offsets"}`` and holds ``__metadata__`` with the manifest text and one sha256 digest over
manifest and table; each blob's stored bytes carry a BLAKE2b checksum in the manifest. Any safetensors tool can list
the file; nothing here knows what the manifest says beyond where it is.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, NamedTuple

import numpy as np

from edgecl.artifact.limits import MAX_HEADER_BYTES, MAX_JSON_CONTAINERS, MAX_NDIM, is_int
from edgecl.errors import ArtifactError

META_MANIFEST, META_DIGEST = "edgecl.manifest", "edgecl.digest"
ST_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
             "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "F32": "float32", "F64": "float64"}
"""safetensors dtype code → numpy dtype name (the ones an artifact may use)."""
ST_CODE = {v: k for k, v in ST_DTYPES.items()}

Read = Callable[[int, int, str], bytes]
"""`read(n, offset, field)`: exactly n bytes of the file at offset, or an ArtifactError naming `field`."""


class TableEntry(NamedTuple):
    """One tensor table row: safetensors dtype and shape, and the blob's byte range within the data area."""

    dtype: str
    shape: list[int]
    start: int
    stop: int


class Header(NamedTuple):
    """What the container holds around the blobs: the manifest text, the checked table, where the data starts, and
    the digest sealing them."""

    manifest_text: str
    table: dict[str, TableEntry]
    data_start: int
    seal: str


def checksum(data: bytes) -> str:
    """128-bit BLAKE2b of a blob's stored bytes: catches damage, costs 32 hex characters per blob."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digest(manifest_text: str, table: dict[str, Any]) -> str:
    """sha256 over the manifest and the tensor table, so every header byte that matters is covered."""
    canonical = json.dumps(table, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(manifest_text.encode() + b"\0" + canonical.encode()).hexdigest()


def stored_form(dtype: str, shape: list[int], steps: list[str], n_stored: int) -> tuple[str, list[int]]:
    """The safetensors dtype and shape a blob of decoded `dtype`/`shape` is stored as under `steps`: raw blobs as
    themselves, fp16-only blobs as F16 of the decoded shape, anything else as a 1-D U8 string of `n_stored` bytes."""
    if not steps:
        return ST_CODE[dtype], shape
    if steps == ["fp16"]:
        return "F16", shape
    return "U8", [n_stored]


def layout(blobs: list[tuple[str, dict[str, Any], bytes]]) -> tuple[dict[str, Any], list[bytes]]:
    """The tensor table and the data area's parts for (key, manifest entry, stored bytes) blobs, in that order."""
    table, parts, offset = {}, [], 0
    for key, entry, data in blobs:
        dtype, shape = stored_form(entry["dtype"], entry["shape"], entry["encoding"], len(data))
        table[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        parts.append(data)
        offset += len(data)
    return table, parts


def encode_header(manifest_text: str, table: dict[str, Any], sealed_with: str | None = None) -> bytes:
    """Length prefix and padded JSON header; the digest is computed unless `sealed_with` gives one (tests forge)."""
    seal = digest(manifest_text, table) if sealed_with is None else sealed_with
    header = {"__metadata__": {META_MANIFEST: manifest_text, META_DIGEST: seal}, **table}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def parse_json(path: str, raw: bytes, field: str) -> Any:
    """JSON from untrusted bytes; ArtifactError naming `field` for anything that is not valid UTF-8 JSON, or that
    would parse into more than `MAX_JSON_CONTAINERS` objects and arrays (counted before parsing)."""
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise ArtifactError(path, field, f"{containers} JSON objects/arrays, more than {MAX_JSON_CONTAINERS}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(path, field, f"not valid JSON ({str(exc)[:120]})") from None


def read_header(path: str, read: Read, size: int) -> Header:
    """Read and check everything around the blobs: header length, JSON, the tensor table (tiling the data area up to
    the end of the file) and the digest. The manifest comes back as text, unparsed."""
    if size < 8:
        raise ArtifactError(path, "header", f"file is {size} bytes, too short for an artifact")
    n = int.from_bytes(read(8, 0, "header length"), "little")
    if size == 8 or read(1, 8, "header") != b"{":
        raise ArtifactError(path, "header", "not an edgecl artifact (no safetensors header: a JSON object after the "
                                            "8-byte length)")
    if n > min(size - 8, MAX_HEADER_BYTES) or n < 2:
        raise ArtifactError(path, "header length", f"declares {n} bytes; the file has {size} "
                                                   f"(limit {MAX_HEADER_BYTES})")
    header = parse_json(path, read(n, 8, "header"), "header")
    if not isinstance(header, dict):
        raise ArtifactError(path, "header", "not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(META_MANIFEST), str):
        raise ArtifactError(path, "header.__metadata__", f"no {META_MANIFEST!r} entry: not an edgecl artifact")
    table = check_table(path, header, 8 + n, size)
    if meta.get(META_DIGEST) != digest(meta[META_MANIFEST], header):
        raise ArtifactError(path, META_DIGEST, "manifest/tensor table checksum mismatch (header damaged)")
    return Header(meta[META_MANIFEST], table, 8 + n, meta[META_DIGEST])


def check_table(path: str, header: dict[str, Any], data_start: int, size: int) -> dict[str, TableEntry]:
    """safetensors tensor table: known dtypes, sane shapes, offsets tiling the data area exactly."""
    table = {}
    for key, e in header.items():
        field = f"tensor table[{key!r}]"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactError(path, field, "entry must have exactly dtype, shape, data_offsets")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(e["dtype"], str) or e["dtype"] not in ST_DTYPES:
            raise ArtifactError(path, field, f"unknown dtype {e['dtype']!r}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(is_int(d) for d in shape):
            raise ArtifactError(path, field, f"bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(is_int(o) for o in offs) and offs[0] <= offs[1]):
            raise ArtifactError(path, field, f"bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * np.dtype(ST_DTYPES[e["dtype"]]).itemsize
        if offs[1] - offs[0] != nbytes:
            raise ArtifactError(path, field, f"data_offsets span {offs[1] - offs[0]} bytes, shape×dtype needs {nbytes}")
        table[key] = TableEntry(e["dtype"], shape, offs[0], offs[1])
    end = 0
    for key, entry in sorted(table.items(), key=lambda kv: (kv[1].start, kv[1].stop)):
        if entry.start != end:
            raise ArtifactError(path, f"tensor table[{key!r}]", f"data starts at {entry.start}, expected {end} "
                                                                 "(gap/overlap)")
        end = entry.stop
    if data_start + end != size:
        raise ArtifactError(path, "file size", f"{size} bytes, the header accounts for {data_start + end} "
                                               "(truncated or extended)")
    return table
