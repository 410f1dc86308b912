"""How one tensor becomes stored bytes and back: the encoding steps (bit-packing, XOR against the previous task's
mask, support-only values, fp16, narrowing, byte shuffle, zstd), as pure functions of arrays and bytes.

No file access and no manifest knowledge: the writer picks the smallest of `candidates`, the reader validates a
declared encoding with `stored_dtype` and undoes it with `decode`, and a fuzzer can drive all three directly. Every
problem with a step list or stored bytes is a ValueError; the reader turns it into an ArtifactError naming the blob.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import zstandard

from edgecl.errors import UsageError

STEPS = ("xor", "support", "fp16", "bits", "narrow8", "narrow16", "narrow32", "shuffle", "zstd")
"""Encoding steps in the order the writer applies them (the reader undoes them in reverse)."""


def stored_dtype(dtype: np.dtype, steps: list[str]) -> np.dtype | None:
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


def encode(arr: np.ndarray, steps: list[str], support: np.ndarray | None, ref: np.ndarray | None) -> bytes:
    """The stored bytes of `arr` under `steps` (valid for its dtype); `support` / `ref` feed the support / xor steps."""
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


_LOCAL = threading.local()
REUSE_MAX = 1 << 16  # frames up to this many bytes decoded by a kept decompressor


def _decompressor(size: int) -> zstandard.ZstdDecompressor:
    """For a small frame, this thread's kept decompressor: making one costs ~16 µs, more than decoding a small head
    (the runtime reads heads on a cache miss). A large frame gets its own: a decompressor keeps a window buffer as
    large as the largest frame it decoded (~350 KB more peak RSS for the demo-shaped model's sessions), and making
    one is nothing beside decoding that much. One per thread: a decompressor is not thread-safe."""
    if size > REUSE_MAX:
        return zstandard.ZstdDecompressor()
    d = getattr(_LOCAL, "zstd", None)
    if d is None:
        d = _LOCAL.zstd = zstandard.ZstdDecompressor()
    return d


def unzstd(data: bytes, size: int) -> bytes:
    """Exactly one zstd frame that declares exactly `size` bytes; never allocates more than that."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise ValueError("not a zstd frame") from None
    if declared != size:
        raise ValueError(f"zstd frame declares {declared} bytes, the manifest {size}")
    obj = _decompressor(size).decompressobj()
    try:
        out = obj.decompress(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd: {exc}") from None
    if not obj.eof or obj.unused_data or len(out) != size:
        raise ValueError(f"zstd frame incomplete or followed by extra bytes ({len(out)} of {size} bytes)")
    return out


UNCHECKED = object()  # `decode`'s rep when the caller has not validated (dtype, steps)


def decode(stored: bytes, dtype: np.dtype, shape: tuple[int, ...], steps: list[str],
           support: np.ndarray | None, ref: np.ndarray | None, rep: object = UNCHECKED) -> np.ndarray:
    """Undo `encode`: exact byte counts are checked at every step, so damaged bytes raise ValueError (or IndexError
    for a support mask that does not fit), never decode to a different tensor. `rep`: what `stored_dtype` gave for
    these (dtype, steps) earlier, to skip validating them again (a reader decoding one blob many times)."""
    rep = stored_dtype(dtype, steps) if rep is UNCHECKED else rep
    n = math.prod(shape)
    n_rep = int(support.sum()) if "support" in steps else n
    nbytes = (n_rep + 7) // 8 if rep is None else n_rep * rep.itemsize
    buf = unzstd(stored, nbytes) if "zstd" in steps else stored
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


def candidates(arr: np.ndarray, fp16: bool, support: np.ndarray | None, ref: np.ndarray | None) -> list[list[str]]:
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
        rep = stored_dtype(dt, h) if h else dt
        out += [h, h + ["zstd"]] + ([h + ["shuffle", "zstd"]] if rep.itemsize > 1 else [])
    return out


def support_mask(owner_el: np.ndarray) -> np.ndarray:
    """The side input of the support step: which of W̄'s elements are owned (and so stored) — flat, C order."""
    return owner_el != 0


def xor_ref(owner_el: np.ndarray, t: int, prev_share: np.ndarray) -> np.ndarray:
    """The side input of the xor step: task t-1's sharing mask laid over task t's domain (elements owned by tasks
    < t), zero on task t-1's own. `owner_el` is the owner of every element, flat in C order."""
    dom = owner_el[(owner_el >= 1) & (owner_el <= t)]
    common = dom <= t - 1
    if int(common.sum()) != prev_share.size:
        raise ValueError(f"previous task's sharing mask has {prev_share.size} bits, its domain {int(common.sum())}")
    ref = np.zeros(dom.size, bool)
    ref[common] = prev_share.reshape(-1)
    return ref
