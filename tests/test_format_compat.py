"""Artifacts written by older edgecl load, materialise bit-identically and run in today's runtime with the logits they
gave then: format 1 (layer-list architectures, made by the 0.1 code) and format 2 (one blob per node group per task,
made by commit 72eb278: tests/data/make_v2_files.py); appending to either writes the current format."""
import hashlib
import json
import os

import numpy as np
import pytest

from edgecl import artifact
from edgecl.deltas import TaskInfo
from edgecl.runtime import TaskRuntime

DATA = os.path.join(os.path.dirname(__file__), "data")
REFERENCE = json.load(open(os.path.join(DATA, "v1-reference.json")))
REFERENCE_2 = json.load(open(os.path.join(DATA, "v2-reference.json")))


@pytest.mark.parametrize("name", sorted(REFERENCE) + sorted(REFERENCE_2))
def test_older_files_load_and_run_as_before(name):
    path = os.path.join(DATA, name)
    ref = {**REFERENCE, **REFERENCE_2}[name]
    with artifact.load(path) as art:
        assert art.manifest["format_version"] == (1 if name in REFERENCE else 2)
        art.verify()
        for t, hashes in ref["weights_sha256"].items():
            weights = art.materialize(int(t))
            assert {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in weights.items()} == hashes
        shape = art.arch["input_shape"]
    x = np.random.default_rng(ref["x_seed"]).standard_normal((5, *shape)).astype(np.float32)
    with TaskRuntime(path) as rt:
        for t, logits in enumerate(ref["logits"]):
            np.testing.assert_allclose(rt.infer(x, task=t), np.asarray(logits, np.float32), rtol=1e-5, atol=1e-5)


def test_appending_to_a_format_1_file_writes_the_current_format(tmp_path):
    from edgecl.source import open_model

    src = os.path.join(DATA, "v1-mlp-mixed.edgecl")
    path = tmp_path / "m.edgecl"
    path.write_bytes(open(src, "rb").read())
    packed = artifact.load(path).to_packed()
    artifact.append_task(path, packed)  # same tasks: every earlier tensor must stay bit-identical
    with artifact.load(path) as art:
        assert art.manifest["format_version"] == artifact.FORMAT_VERSION == 3
        assert "nodes" in art.manifest["arch"] and open_model(src).materialize(2).keys() == art.materialize(2).keys()


@pytest.mark.parametrize("name", sorted(n for n in REFERENCE_2 if "node" in n) + ["v1-res-node.edgecl"])
def test_appending_to_an_older_node_file_packs_its_masks(tmp_path, name):
    """A format 1/2 file's per-group node masks become one blob per task; every task materialises as before, also
    the one appended (a copy of the last task's tensors under a new name)."""
    src = os.path.join(DATA, name)
    path = tmp_path / "m.edgecl"
    path.write_bytes(open(src, "rb").read())
    with artifact.load(src) as old:
        packed, before = old.to_packed(), [old.materialize(t) for t in range(old.n_tasks)]
        old_blobs = len(old.blobs)
    n = packed.n_tasks
    packed.tasks.append(TaskInfo("appended", packed.tasks[-1].n_classes, packed.tasks[-1].seed))
    packed.task_tensors.append({k: v.copy() for k, v in packed.task_tensors[-1].items()})
    assert artifact.append_task(path, packed) == {"tasks": n, "keeps": "all"}
    groups = sum(k.startswith("nodes:") for k in packed.task_tensors[0])
    with artifact.load(path) as art:
        assert art.manifest["format_version"] == 3
        assert [g for g, _ in art.node_groups] == [k[6:] for k in packed.task_tensors[0] if k.startswith("nodes:")]
        assert not any(e["name"].startswith("nodes:") for e in art.blobs.values())
        assert len(art.blobs) == len(packed.base) + sum(len(tt) - groups + 1 for tt in packed.task_tensors)
        assert len(art.blobs) < old_blobs + len(packed.task_tensors[-1])  # one more task, fewer blobs
        for t in range(n):
            assert _same(art.materialize(t), before[t])
        assert _same(art.materialize(n), before[n - 1])
        assert _same(art.read_task(0), packed.task_tensors[0])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
