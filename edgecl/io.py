"""Crash-safe file writes for every edgecl output: artifacts, exported graphs and engines, results, training state.

A write goes to a complete, fsynced temporary file beside its target and is renamed over it, so a kill at any point
leaves either the old file or the new one, never a mix. Nothing here knows any file format; the stdlib only.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable

from edgecl.errors import UsageError

CHUNK = 1 << 20


def write_parts(f, parts: Iterable[bytes]) -> None:
    """Write in 1 MiB chunks (a test slows this down to kill a writer midway)."""
    for part in parts:
        view = memoryview(part)
        for i in range(0, len(view), CHUNK):
            f.write(view[i:i + CHUNK])


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | list[bytes]) -> None:
    """Replace `path` with `data` (bytes, or a list of byte strings written in order), atomically."""
    path = os.fspath(path)
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    commit(write_temp(path, parts), path)


def write_temp(path: str | os.PathLike, parts: Iterable[bytes]) -> str:
    """The new content, complete and fsynced, in a temp file beside `path` (same filesystem, so a rename is atomic).
    Returns the temp file's path; pass it to `commit` or `discard`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write_parts(f, parts)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc}") from None
        raise
    return tmp


def commit(tmp: str, path: str | os.PathLike) -> None:
    """Rename a temp file over its target, then fsync the folder so the rename itself survives a power cut."""
    path = os.fspath(path)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        discard(tmp)
        raise UsageError(f"cannot write {path}: {exc}") from None
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename itself is still atomic


def discard(tmp: str) -> None:
    """Remove a temp file that will not be committed (missing is fine)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
