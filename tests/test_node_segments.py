"""The ``node`` delta kind on graphs: rows/cols as segments of several channel groups (a concatenation), the conv
``groups`` field, the old one-group string form — in `materialize`, in the artifact's checks and in the runtime's
masked and factored plans."""
from __future__ import annotations

import json

import artifact_models as am
import numpy as np
import onnxruntime as ort
import pytest
from torch_nets import ResCat

from edgecl import artifact
from edgecl.arch import from_torch, param_shapes, validate
from edgecl.deltas import PackedModel, TaskInfo, check_consistent, materialize
from edgecl.errors import ArtifactError, UsageError
from edgecl.graph.builder import build_onnx
from edgecl.runtime import TaskRuntime
from edgecl.runtime import plan as plan_module
from edgecl.synthetic import random_head
from edgecl.train.methods.agscl_nodes import node_map

# two layers concatenated, read by a grouped conv (each conv group reads one of them) and, after a flatten, a linear
CAT = validate({"name": "cat", "input_shape": [1, 4, 4], "nodes": [
    {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 2, "k": 1},
    {"name": "b", "op": "conv", "inputs": ["input"], "in": 1, "out": 3, "k": 1},
    {"name": "bn", "op": "bn", "inputs": ["b"], "ch": 3},
    {"name": "ab", "op": "cat", "inputs": ["a", "bn"]}, {"name": "r", "op": "relu", "inputs": ["ab"]},
    {"name": "g", "op": "conv", "inputs": ["r"], "in": 5, "out": 2, "k": 1, "groups": 1},
    {"name": "p", "op": "maxpool", "inputs": ["r"], "k": 2}, {"name": "f", "op": "flatten", "inputs": ["p"]},
    {"name": "fc", "op": "linear", "inputs": ["f"], "in": 20, "out": 3}]})
GROUPED = validate({"name": "grouped", "input_shape": [1, 4, 4], "nodes": [
    {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 2, "k": 1},
    {"name": "b", "op": "conv", "inputs": ["input"], "in": 1, "out": 2, "k": 1},
    {"name": "ab", "op": "cat", "inputs": ["a", "b", "input"]},
    {"name": "g", "op": "conv", "inputs": ["ab"], "in": 5, "out": 10, "k": 3, "pad": 1, "groups": 5},
    {"name": "f", "op": "flatten", "inputs": ["g"]}]})


def _packed(arch: dict, n_tasks: int = 3, seed: int = 0) -> PackedModel:
    """Random weights and node masks under the delta specs AGS-CL writes for `arch` (per-task BatchNorm stats)."""
    rng = np.random.default_rng(seed)
    nodes = node_map(arch)
    params = {**nodes.specs, "head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}}
    shapes = param_shapes(arch)
    base = {k: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32) for k, s in shapes.items()
            if k not in nodes.stats}
    tts = []
    for t in range(n_tasks):
        tt = {f"nodes:{g}": rng.random(n) < 0.6 for g, n in nodes.groups.items()}
        tt.update({k: (rng.random(shapes[k]) + 0.5).astype(np.float32) for k in nodes.stats})
        tt.update(random_head(rng, 3, arch["feature_dim"]))
        tts.append(tt)
    return PackedModel(arch, "agscl", {}, params, base, [TaskInfo(f"t{t}", 3) for t in range(n_tasks)], tts)


def test_segments_mask_a_concatenation_row_by_row_and_column_by_column():
    packed = _packed(CAT)
    spec = packed.params["fc.weight"]
    assert spec["cols"] == [["a", 4], ["b", 4]] and packed.params["bn.weight"]["rows"] == "b"
    for t in range(packed.n_tasks):
        tt, w = packed.task_tensors[t], materialize(packed, t)
        a, b, fc = tt["nodes:a"], tt["nodes:b"], tt["nodes:fc"]
        cols = np.r_[np.repeat(a, 4), np.repeat(b, 4)]  # channel-major: each channel's 2×2 pooled positions
        np.testing.assert_array_equal(w["fc.weight"], packed.base["fc.weight"] * fc[:, None] * cols[None, :])
        np.testing.assert_array_equal(w["g.weight"][:, :, 0, 0],
                                      packed.base["g.weight"][:, :, 0, 0] * tt["nodes:g"][:, None] * np.r_[a, b])
        np.testing.assert_array_equal(w["bn.bias"], packed.base["bn.bias"] * b)
        np.testing.assert_array_equal(w["bn.running_var"], tt["bn.running_var"])  # per task, unmasked


def test_a_grouped_conv_row_reads_only_its_groups_channels_and_the_input_is_never_masked():
    packed = _packed(GROUPED)
    spec = packed.params["g.weight"]
    assert spec["groups"] == 5 and spec["cols"] == [["a", 1], ["b", 1], ["input", 1]]
    for t in range(packed.n_tasks):
        tt = packed.task_tensors[t]
        channels = np.r_[tt["nodes:a"], tt["nodes:b"], True]  # the network input's channel is always read
        rows = tt["nodes:g"]
        w = materialize(packed, t)["g.weight"]
        for j in range(10):  # 10 rows in 5 conv groups of 2, each group reading one input channel
            keep = rows[j] and channels[j // 2]
            np.testing.assert_array_equal(w[j], packed.base["g.weight"][j] * keep)


def test_bad_segments_are_refused_naming_the_tensor():
    packed = _packed(GROUPED)
    for edit, needle in ((dict(repeat=2), "repeat"), (dict(cols=[["a", 1], ["b", 1]]), r"cols \(groups=\d+\) cover 4"),
                         (dict(groups=3), "groups=3"), (dict(rows=[["g", 2]]), "rows cover 20")):
        packed.params["g.weight"] = {**node_map(GROUPED).specs["g.weight"], **edit}
        with pytest.raises(UsageError, match=needle):
            check_consistent(packed)


@pytest.mark.parametrize("arch", [CAT, GROUPED, from_torch(ResCat(), (3, 8, 8))],
                         ids=["cat", "grouped", "rescat"])
def test_files_and_runtimes_reproduce_materialize(arch, tmp_path, monkeypatch):
    packed = _packed(arch)
    path = tmp_path / "m.edgecl"
    artifact.save(packed, path)
    loaded = artifact.load(path).to_packed()
    assert loaded.params == packed.params
    x = np.random.default_rng(1).standard_normal((4, *arch["input_shape"])).astype(np.float32)
    for factor_min in (plan_module.FACTOR_MIN_ELEMENTS, 0):  # folded on a switch, then node vectors around W
        monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", factor_min)
        runtime = TaskRuntime(str(path))
        for t in (2, 0, 1):
            dense = materialize(packed, t)
            assert all(np.array_equal(dense[k], v) for k, v in loaded.materialize(t).items())
            ref = ort.InferenceSession(build_onnx(arch, dense).SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            assert np.abs(runtime.infer(x, task=t) - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    assert "node" in plan_module.factor_forms(loaded).values()


def _resealed(raw: bytes, edit) -> bytes:
    manifest, table, data = am.split_file(raw)
    manifest = json.loads(json.dumps(manifest))
    edit(manifest)
    return am.build_file(manifest, table, data)


def test_the_reader_refuses_node_specs_that_do_not_fit(tmp_path):
    path = tmp_path / "m.edgecl"
    artifact.save(_packed(CAT), path)
    raw = path.read_bytes()
    cases = {
        "not-a-segment": (lambda m: m["params"]["fc.weight"].update(cols=[["a", 0]]), "params['fc.weight'].cols"),
        "segment-types": (lambda m: m["params"]["fc.weight"].update(cols=[[4, "a"]]), "params['fc.weight'].cols"),
        "too-wide": (lambda m: m["params"]["fc.weight"]["cols"][0].__setitem__(1, 5), "params['fc.weight'].cols"),
        "no-such-group": (lambda m: m["params"]["fc.weight"].update(rows=[["zz", 1]]), "nodes:zz"),
        "repeat-with-list": (lambda m: m["params"]["fc.weight"].update(repeat=2), "params['fc.weight'].repeat"),
        "groups-not-dividing": (lambda m: m["params"]["g.weight"].update(groups=3), "params['g.weight'].cols"),
        "bad-groups": (lambda m: m["params"]["g.weight"].update(groups=0), "params['g.weight'].groups"),
        "rows-too-short": (lambda m: m["params"]["bn.weight"].update(rows=[["a", 1]]), "params['bn.weight'].rows"),
    }
    for name, (edit, field) in cases.items():
        bad = tmp_path / f"{name}.edgecl"
        bad.write_bytes(_resealed(raw, edit))
        with pytest.raises(ArtifactError) as info:
            artifact.load(bad)
        assert field in str(info.value), (name, str(info.value))
