"""Artifacts written by edgecl 0.1 (format 1: layer-list architectures) load, materialise bit-identically and run in
today's runtime with the logits they gave then (files and reference made by the 0.1 code, tests/data/)."""
import hashlib
import json
import os

import numpy as np
import pytest

from edgecl import artifact
from edgecl.runtime import TaskRuntime

DATA = os.path.join(os.path.dirname(__file__), "data")
REFERENCE = json.load(open(os.path.join(DATA, "v1-reference.json")))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_format_1_files_load_and_run_as_before(name):
    path = os.path.join(DATA, name)
    ref = REFERENCE[name]
    with artifact.load(path) as art:
        assert art.manifest["format_version"] == 1
        art.verify()
        for t, hashes in ref["weights_sha256"].items():
            weights = art.materialize(int(t))
            assert {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in weights.items()} == hashes
        shape = art.arch["input_shape"]
    x = np.random.default_rng(ref["x_seed"]).standard_normal((5, *shape)).astype(np.float32)
    with TaskRuntime(path) as rt:
        for t, logits in enumerate(ref["logits"]):
            np.testing.assert_allclose(rt.infer(x, task=t), np.asarray(logits, np.float32), rtol=1e-5, atol=1e-5)


def test_appending_to_a_format_1_file_writes_format_2(tmp_path):
    from edgecl.source import open_model

    src = os.path.join(DATA, "v1-mlp-mixed.edgecl")
    path = tmp_path / "m.edgecl"
    path.write_bytes(open(src, "rb").read())
    packed = artifact.load(path).to_packed()
    artifact.append_task(path, packed)  # same tasks: every earlier tensor must stay bit-identical
    with artifact.load(path) as art:
        assert art.manifest["format_version"] == artifact.FORMAT_VERSION == 2
        assert "nodes" in art.manifest["arch"] and open_model(src).materialize(2).keys() == art.materialize(2).keys()
