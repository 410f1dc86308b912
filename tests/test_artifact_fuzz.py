"""Hostile artifacts (issue 10): thousands of mutated real artifact files, loaded and fully materialised.

Two families. Damage (bit flips, truncation, overwritten/inserted bytes, bad length prefixes) is not resealed: such a
file must raise ArtifactError, or — when the bytes changed nothing that matters — load to exactly the original
weights. Forgery rewrites the manifest or tensor table and reseals the digest (and blob checksums), so it reaches
the deeper validation: it must raise ArtifactError or load into a consistent model (float32 tensors of the arch's
shapes). Any other exception fails. Hypothesis runs derandomised, so CI sees the same cases every time.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import artifact_models as am
from edgecl import artifact
from edgecl.deltas import materialize

COUNTS: dict[str, int] = {}  # cases tried per mutation family
TOTALS: dict[str, int] = {}  # per test
LOADED: dict[str, int] = {}  # cases that loaded (harmless damage, or a forgery that is a consistent model)
_DIR = tempfile.mkdtemp(prefix="edgecl-fuzz-")


def _original(kind: str, seed: int, n_tasks: int):
    packed = (am.lps_packed(np.random.default_rng(seed), n_tasks, correlated=True) if kind == "lps-xor"
              else am.make(kind, seed, n_tasks))
    path = os.path.join(_DIR, f"orig-{kind}.ecl")
    artifact.save(packed, path)
    with open(path, "rb") as f:
        raw = f.read()
    return raw, [t.to_json() for t in packed.tasks], [materialize(packed, t) for t in range(packed.n_tasks)]


ORIGINALS = [_original(kind, i, 3) for i, kind in enumerate(["lps-xor", "lps-row", "node", "lowrank", "permute",
                                                             "task"])]
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def _load_all(raw: bytes):
    return am.load_everything(raw, os.path.join(_DIR, "case.ecl"))


def _check_damaged(which: int, raw: bytes, family: str) -> None:
    COUNTS[family] = COUNTS.get(family, 0) + 1
    got = _load_all(raw)
    if got is None:
        return
    LOADED[family] = LOADED.get(family, 0) + 1
    _, tasks, weights = ORIGINALS[which]
    assert got[0] == tasks, "damaged file loaded with different tasks"
    assert all(am.same_weights(a, b) for a, b in zip(got[1], weights)), "damaged file loaded different weights"


def _check_forged(raw: bytes, family: str) -> None:
    COUNTS[family] = COUNTS.get(family, 0) + 1
    got = _load_all(raw)
    if got is None:
        return
    LOADED[family] = LOADED.get(family, 0) + 1
    tasks, weights, arch = got
    assert am.runnable(tasks, weights, arch), "a forged file loaded into tensors its arch cannot run"


which_file = st.integers(0, len(ORIGINALS) - 1)


@given(which_file, st.data())
def _bit_flips(which, data):
    raw = bytearray(ORIGINALS[which][0])
    header_end = 8 + int.from_bytes(raw[:8], "little")
    region = data.draw(st.sampled_from(["anywhere", "header", "data"]))
    lo, hi = {"anywhere": (0, len(raw)), "header": (0, header_end), "data": (header_end, len(raw))}[region]
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(lo, hi - 1))] ^= 1 << data.draw(st.integers(0, 7))
    _check_damaged(which, bytes(raw), "bit flips")


@given(which_file, st.data())
def _byte_edits(which, data):
    raw = ORIGINALS[which][0]
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
    _check_damaged(which, out, f"byte edits ({edit})")


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
                     "nodes:fc1"]))
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


@given(which_file, st.data())
def _forged_manifests(which, data):
    manifest, table, blob_data = am.split_file(ORIGINALS[which][0])
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
    _check_forged(raw, f"forged {target}")


@given(which_file, st.data())
def _forged_blobs(which, data):
    import zstandard

    manifest, table, _ = am.split_file(ORIGINALS[which][0])
    key = data.draw(st.sampled_from(sorted(table)))
    payload = data.draw(st.binary(max_size=256))
    if data.draw(st.booleans()):  # a well-formed zstd frame with arbitrary (possibly bomb-sized) content
        payload = zstandard.ZstdCompressor().compress(payload * data.draw(st.sampled_from([1, 7, 4096])))
    raw = am.replace_blob(ORIGINALS[which][0], key, payload, fix_checksum=data.draw(st.booleans()))
    _check_forged(raw, "forged blobs")


CASES = {"bit flips": (_bit_flips, 3500), "byte edits": (_byte_edits, 2500),
         "forged manifests": (_forged_manifests, 3000), "forged blobs": (_forged_blobs, 1200)}


@pytest.mark.parametrize("name", list(CASES))
def test_mutated_artifacts_raise_only_artifact_error(name):
    fn, n = CASES[name]
    n = max(1, int(n * float(os.environ.get("EDGECL_FUZZ_SCALE", "1"))))  # >1 for longer local runs
    before = sum(COUNTS.values())
    settings(FUZZ, max_examples=n)(fn)()
    TOTALS[name] = sum(COUNTS.values()) - before
    print(f"{name}: {TOTALS[name]} mutated artifacts; by family so far {COUNTS}")
    assert TOTALS[name] >= 0.9 * n


def test_fuzz_total_is_at_least_ten_thousand():
    if len(TOTALS) < len(CASES):
        pytest.skip("counts the fuzz cases above; run the whole file")
    total = sum(TOTALS.values())
    print(f"fuzz total: {total} mutated artifacts {json.dumps(COUNTS)}; loaded {json.dumps(LOADED)}")
    assert total >= 10_000 * min(1.0, float(os.environ.get("EDGECL_FUZZ_SCALE", "1"))) * 0.9
