"""Hostile artifacts (issues 10 and 17): thousands of mutated real artifact files, loaded and fully materialised.

Four families here, four more in `fuzz_families` (issue 17: non-finite and extreme values under masks, long and
index-like names, hostile architecture specs, size bombs), whose files that load must also give, in the runtime,
the outputs `materialize` defines. Here: damage (bit flips, truncation, overwritten/inserted bytes, bad length
prefixes) is not resealed: such a file must raise ArtifactError, or — when the bytes changed nothing that matters —
load to exactly the original weights. Forgery rewrites the manifest or tensor table and reseals the digest (and blob checksums), so it reaches
the deeper validation: it must raise ArtifactError or load into a consistent model (float32 tensors of the arch's
shapes). Any other exception fails. Hypothesis runs derandomised, so CI sees the same cases every time.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import artifact_models as am
from edgecl.artifact import encodings

COUNTS: dict[str, int] = {}  # cases tried per mutation family
LOADED: dict[str, int] = {}  # cases that loaded (harmless damage, or a forgery that is a consistent model)
KINDS = am.FUZZ_KINDS  # one original artifact each
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


class Corpus(NamedTuple):
    folder: str
    originals: list[tuple[bytes, list[dict], list[dict]]]  # (file bytes, task infos, each task's weights)

    def load_all(self, raw: bytes):
        return am.load_everything(raw, os.path.join(self.folder, "case.edgecl"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    folder = str(tmp_path_factory.mktemp("fuzz"))
    return Corpus(folder, [am.saved_original(kind, i, 3, folder) for i, kind in enumerate(KINDS)])


def _check_damaged(corpus: Corpus, which: int, raw: bytes, family: str) -> None:
    COUNTS[family] = COUNTS.get(family, 0) + 1
    got = corpus.load_all(raw)
    if got is None:
        return
    LOADED[family] = LOADED.get(family, 0) + 1
    _, tasks, weights = corpus.originals[which]
    assert got[0] == tasks, "damaged file loaded with different tasks"
    assert all(am.same_weights(a, b) for a, b in zip(got[1], weights)), "damaged file loaded different weights"


def _check_forged(corpus: Corpus, raw: bytes, family: str) -> None:
    COUNTS[family] = COUNTS.get(family, 0) + 1
    got = corpus.load_all(raw)
    if got is None:
        return
    LOADED[family] = LOADED.get(family, 0) + 1
    tasks, weights, arch = got
    assert am.runnable(tasks, weights, arch), "a forged file loaded into tensors its arch cannot run"


which_file = st.integers(0, len(KINDS) - 1)


def _bit_flips(corpus, which, data):
    raw = bytearray(corpus.originals[which][0])
    header_end = 8 + int.from_bytes(raw[:8], "little")
    region = data.draw(st.sampled_from(["anywhere", "header", "data"]))
    lo, hi = {"anywhere": (0, len(raw)), "header": (0, header_end), "data": (header_end, len(raw))}[region]
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(lo, hi - 1))] ^= 1 << data.draw(st.integers(0, 7))
    _check_damaged(corpus, which, bytes(raw), "bit flips")


def _byte_edits(corpus, which, data):
    raw = corpus.originals[which][0]
    pos = data.draw(st.integers(0, len(raw)))
    edit = data.draw(st.sampled_from(["truncate", "overwrite", "insert", "delete", "length"]))
    if edit == "truncate":
        out = raw[:pos]
    elif edit == "overwrite":
        junk = data.draw(st.binary(min_size=1, max_size=32))
        out = raw[:pos] + junk + raw[pos + len(junk):]
    elif edit == "insert":
        out = raw[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + raw[pos:]
    elif edit == "delete":
        out = raw[:pos] + raw[pos + data.draw(st.integers(1, 64)):]
    else:  # oversized, tiny, off-by-a-little or "negative" (two's complement) header lengths
        n = int.from_bytes(raw[:8], "little")
        length = data.draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(n - 16, n + 16).filter(
            lambda v: v >= 0), st.integers(1, 64).map(lambda v: 2 ** 64 - v)))
        out = length.to_bytes(8, "little") + raw[8:]
    _check_damaged(corpus, which, out, f"byte edits ({edit})")


def _paths(node, prefix=()):
    """Every (path to a value) in a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
    st.sampled_from([0, -1, 1, 2, 255, 256, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 - 1]),
    st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["../../etc/passwd", "/abs", "a/b", "..", "C:\\x", "float64", "int64", "bool", "U8", "F64", "zstd",
                     "bits", "xor", "lps", "task", "node", "element", "row", "column", "head.weight", "fc1.weight",
                     "nodes:fc1", "nodes"]))
hostile_values = st.one_of(_scalars, st.lists(_scalars, max_size=4),
                           st.lists(st.lists(_scalars, max_size=3), max_size=3),
                           st.dictionaries(st.text(max_size=8), _scalars, max_size=3))


def _set(tree, path, value):
    node = tree
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


def _forged_manifests(corpus, which, data):
    manifest, table, blob_data = am.split_file(corpus.originals[which][0])
    target = data.draw(st.sampled_from(["manifest", "table"]))
    tree = manifest if target == "manifest" else table
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(tree) if p]
        path = data.draw(st.sampled_from(paths))
        value = data.draw(st.one_of(hostile_values, st.just(_DELETE)))
        _set(tree, path, value)
    try:
        raw = am.build_file(manifest, table, blob_data)
    except (TypeError, ValueError):  # not even JSON-serialisable (e.g. NaN keys): nothing to test
        return
    _check_forged(corpus, raw, f"forged {target}")


def _forged_blobs(corpus, which, data):
    import zstandard

    manifest, table, _ = am.split_file(corpus.originals[which][0])
    key = data.draw(st.sampled_from(sorted(table)))
    payload = data.draw(st.binary(max_size=256))
    if data.draw(st.booleans()):  # a well-formed zstd frame with arbitrary (possibly bomb-sized) content
        payload = zstandard.ZstdCompressor().compress(payload * data.draw(st.sampled_from([1, 7, 4096])))
    raw = am.replace_blob(corpus.originals[which][0], key, payload, fix_checksum=data.draw(st.booleans()))
    _check_forged(corpus, raw, "forged blobs")


from fuzz_families import hostile_specs, long_names, masked_values, size_bombs  # noqa: E402 (issue 17's families)

CASES = {"bit flips": (_bit_flips, 3500), "byte edits": (_byte_edits, 2500),
         "forged manifests": (_forged_manifests, 3000), "forged blobs": (_forged_blobs, 1200),
         "masked values": (masked_values, 400), "long names": (long_names, 600), "hostile specs": (hostile_specs, 300),
         "size bombs": (size_bombs, 150)}
QUICK_SAMPLE = 40  # cases per family in the quick run (`-m "not slow"`)
QUICK = {"hostile specs": 12, "size bombs": 10, "masked values": 20}  # families whose cases run the runtime


def _fuzz(corpus: Corpus, name: str, n: int) -> int:
    """Run family `name` (a function of the corpus, the original's index and hypothesis data) for n cases; how many
    mutated files it tried."""
    fn, _ = CASES[name]
    before = sum(COUNTS.values())

    def case(which, data):
        loaded = fn(corpus, which, data)
        if loaded is not None:  # the `fuzz_families` report whether the file loaded; the others count themselves
            COUNTS[name] = COUNTS.get(name, 0) + 1
            LOADED[name] = LOADED.get(name, 0) + int(loaded)

    settings(FUZZ, max_examples=n)(given(which=which_file, data=st.data())(case))()
    return sum(COUNTS.values()) - before


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_mutated_artifacts_raise_only_artifact_error(corpus, name):
    n = max(1, int(CASES[name][1] * float(os.environ.get("EDGECL_FUZZ_SCALE", "1"))))  # >1 for longer local runs
    tried = _fuzz(corpus, name, n)
    print(f"{name}: {tried} mutated artifacts; by family so far {COUNTS}; loaded {LOADED}")
    assert tried >= 0.9 * n  # each family checks its own count: no test depends on which others ran


@pytest.mark.parametrize("name", list(CASES))
def test_quick_fuzz_sample_raises_only_artifact_error(corpus, name):
    """A few cases of every family, so the quick run still meets damaged and forged files."""
    n = QUICK.get(name, QUICK_SAMPLE)
    assert _fuzz(corpus, name, n) >= 0.9 * n


def test_fuzz_budget_is_at_least_ten_thousand():
    """The families together mutate ≥ 10,000 artifacts; each family's test checks it ran ≥ 90 % of its share."""
    assert sum(n for _, n in CASES.values()) >= 10_000


# ------------------------------------------------------------------------------ encodings, as pure functions

_DTYPES = ["bool", "uint8", "int16", "int32", "int64", "uint32", "float16", "float32", "float64"]


@st.composite
def _tensors(draw):
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    n = int(np.prod(shape))
    if dtype == np.bool_:
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        top = draw(st.sampled_from([1, 255, 65535, int(info.max)]))
        values = draw(st.lists(st.integers(max(int(info.min), -top), min(int(info.max), top)), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.floats(width=16 if dtype == np.float16 else 32, allow_nan=False), min_size=n,
                               max_size=n))
    return np.array(values, dtype).reshape(shape)


@settings(FUZZ, max_examples=300)
@given(arr=_tensors(), data=st.data())
def test_every_candidate_encoding_decodes_bit_exactly(arr, data):
    flat = arr.reshape(-1)
    support = ref = None
    if arr.dtype.kind == "f" and data.draw(st.booleans()):
        support = np.array(data.draw(st.lists(st.booleans(), min_size=flat.size, max_size=flat.size)), bool)
        arr = np.where(support.reshape(arr.shape), arr, arr.dtype.type(0))  # free entries are +0.0
    if arr.dtype == np.bool_:
        ref = np.array(data.draw(st.lists(st.booleans(), min_size=flat.size, max_size=flat.size)), bool)
    fp16 = arr.dtype == np.float32 and not np.any(np.abs(arr) > 65504) and data.draw(st.booleans())  # as save
    for steps in encodings.candidates(arr, fp16, support, ref):
        stored = encodings.encode(arr, steps, support, ref)
        back = encodings.decode(stored, arr.dtype, arr.shape, steps, support, ref)
        want = arr.astype(np.float16).astype(np.float32) if "fp16" in steps else arr
        assert back.dtype == arr.dtype and back.tobytes() == want.tobytes(), steps


@settings(FUZZ, max_examples=300)
@given(dtype=st.sampled_from(_DTYPES), shape=st.lists(st.integers(0, 64), max_size=2),
       steps=st.lists(st.sampled_from(encodings.STEPS + ("pickle",)), max_size=4), stored=st.binary(max_size=300))
def test_decoding_arbitrary_bytes_raises_only_value_error(dtype, shape, steps, stored):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    support = np.ones(n, bool) if "support" in steps else None
    ref = np.zeros(n, bool) if "xor" in steps else None
    try:
        out = encodings.decode(stored, dtype, tuple(shape), steps, support, ref)
    except ValueError:
        return
    assert out.dtype == dtype and out.shape == tuple(shape)
