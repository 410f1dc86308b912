"""Exporter end to end on a real (short) LPS run on permuted digits saved as a real artifact: every task's ONNX passes
the full checker and matches the torch model, fp16 agrees on argmax, no switchable graph is written (the runtime
builds its own), task selection and bad input fail clearly, and the export path never imports torch."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from edgecl import artifact
from edgecl.arch import preset
from edgecl.cli import main as cli
from edgecl.deltas import materialize
from edgecl.errors import ArtifactError, UsageError
from edgecl.export import export_onnx, tensorrt_unavailable
from edgecl.export.onnx_export import run_onnx
from edgecl.synthetic import random_packed
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext

N_TASKS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three tasks of column-pruned LPS on permuted digits (one epoch per phase), saved as an artifact."""
    torch.manual_seed(0)
    stream = make_stream("permuted-digits", N_TASKS, seed=0)
    method = registry.create("lps", preset("mlp"), {"epochs": 1, "pruning": "column", "alpha": 0.3})
    packed = engine.run(method, stream, TrainContext(progress=False), log=lambda *_: None).packed
    path = tmp_path_factory.mktemp("artifact") / "model.edgecl"
    artifact.save(packed, path)
    return packed, stream, path


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, _, path = trained
    out = tmp_path_factory.mktemp("onnx")
    return export_onnx(path, out, progress=False), out


def _torch_logits(packed, t, x):
    with torch.no_grad():
        return forward(packed.arch, from_numpy(materialize(packed, t)), torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_every_task_checks_and_matches_torch(trained, exported):
    packed, stream, _ = trained
    index, out = exported
    assert [e["name"] for e in index["tasks"]] == [t.name for t in packed.tasks]
    assert index["opset"] == 17 and index["input"]["shape"] == ["batch", 1, 8, 8]
    assert json.loads((out / "index.json").read_text()) == index
    for entry in index["tasks"]:
        path = out / entry["file"]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert model.opset_import[0].version == 17
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        x = stream.tasks[entry["index"]].x_test
        err = np.abs(run_onnx(path, x) - _torch_logits(packed, entry["index"], x)).max()
        assert err <= 1e-4, f"task {entry['index']}: max |Δ| {err}"
        assert entry["params_compact"] <= entry["params_dense"]
    # column pruning leaves the first task (which shares nothing) physically smaller
    first = index["tasks"][0]
    assert first["params_compact"] < first["params_dense"] and first["compaction"]["compacted"]
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries


@pytest.mark.slow
def test_fp16_weights_agree_on_argmax(trained, exported, tmp_path):
    packed, stream, path = trained
    index16 = export_onnx(path, tmp_path, fp16=True, progress=False)
    index32, out32 = exported
    for e16, e32 in zip(index16["tasks"], index32["tasks"]):
        f16 = tmp_path / e16["file"]
        model = onnx.load(str(f16))
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
        assert e16["bytes"] < 0.6 * e32["bytes"]
        x = stream.tasks[e16["index"]].x_test
        agree = (run_onnx(f16, x).argmax(1) == run_onnx(out32 / e32["file"], x).argmax(1)).mean()
        assert agree >= 0.995, f"task {e16['index']}: argmax agreement {agree:.4f}"


def test_fp16_refuses_weights_it_would_store_as_inf(tmp_path):
    """A weight beyond ±65504 becomes inf in float16 and the graph answers NaN: the export names it and stops,
    as saving an fp16 artifact does, instead of writing that graph."""
    packed = random_packed(preset("mlp"), n_tasks=2, shape="finetune")
    packed.base["fc1.weight"][0, 0] = 70000.0
    export_onnx(packed, tmp_path / "fp32", tasks="1", progress=False)
    x = np.ones((1, *packed.arch["input_shape"]), np.float32)
    assert np.isfinite(run_onnx(tmp_path / "fp32" / "task_001.onnx", x)).all()
    with pytest.raises(UsageError, match=r"task_1: weight 'fc1.weight' holds values beyond the fp16 range "
                                         r"\(largest \|w\| = 7e\+04 > 65504\); export without --fp16"):
        export_onnx(packed, tmp_path / "fp16", tasks="1", fp16=True, progress=False)
    assert not (tmp_path / "fp16" / "task_001.onnx").exists()


def test_no_switchable_graph_is_written(tmp_path):
    """The runtime builds its switchable graph in memory from the artifact; the export writes none and names none."""
    packed = random_packed(preset("mlp"), n_tasks=2, shape="lps")
    index = export_onnx(packed, tmp_path, progress=False)
    assert not (tmp_path / "switchable.onnx").exists()
    assert "switchable" not in index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "task_000.onnx", "task_001.onnx"]


@pytest.mark.slow
def test_task_selection_by_index_range_and_name(trained, tmp_path):
    packed, _, path = trained
    index = export_onnx(path, tmp_path, tasks="2,0", progress=False)
    assert [e["index"] for e in index["tasks"]] == [2, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "task_000.onnx", "task_002.onnx"]
    assert [e["index"] for e in export_onnx(packed, tmp_path / "b", tasks="1-2", progress=False)["tasks"]] == [1, 2]
    assert [e["index"] for e in export_onnx(packed, tmp_path / "c", tasks=[packed.tasks[1].name], progress=False)
            ["tasks"]] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["0,,1", "7", "-1", "2-1", "nosuchtask", ""])
def test_bad_task_lists_are_usage_errors(trained, tmp_path, spec):
    packed, _, path = trained
    with pytest.raises(UsageError):
        export_onnx(packed, tmp_path, tasks=spec, progress=False)
    assert cli(["export", str(path), "--tasks", spec, "--out", str(tmp_path), "--quiet"]) == 2
    assert not (tmp_path / "index.json").exists()


def test_unreadable_artifacts_fail_clearly(tmp_path, capsys):
    garbage = tmp_path / "garbage.edgecl"
    garbage.write_bytes(b"\x00not an artifact" * 7)
    for path in (garbage, tmp_path / "missing.edgecl"):
        with pytest.raises(ArtifactError):
            export_onnx(path, tmp_path / "out", progress=False)
        assert cli(["export", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
        assert path.name in capsys.readouterr().err


@pytest.mark.slow
def test_cli_exports_and_prints_a_table(trained, tmp_path, capsys):
    _, _, path = trained
    assert cli(["export", str(path), "--format", "onnx", "--tasks", "0", "--fp16", "--out", str(tmp_path),
                "--quiet"]) == 0
    assert "task_000.onnx" in capsys.readouterr().out
    assert json.loads((tmp_path / "index.json").read_text())["fp16"] is True


@pytest.mark.slow
def test_export_never_imports_torch(trained, tmp_path):
    """The exporter is part of the torch-free side: run it where importing torch fails."""
    _, _, path = trained
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgecl.export import export_onnx\n"
            f"export_onnx({str(path)!r}, {str(tmp_path)!r}, fp16=True, progress=False)\n"
            "assert not any(m.startswith(('torch', 'edgecl.train')) for m in sys.modules if sys.modules[m])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "index.json").exists()


@pytest.mark.slow
def test_rejected_compaction_falls_back_to_dense(trained, tmp_path, monkeypatch):
    """The export-time ONNX Runtime check catches a wrong compacted graph and keeps the dense one."""
    from edgecl.export import onnx_export
    from edgecl.graph.compact import compact_task

    def broken(arch, params):
        c_arch, c_params, report = compact_task(arch, params)
        c_params["head.bias"] = c_params["head.bias"] + 1.0
        return c_arch, c_params, report

    monkeypatch.setattr(onnx_export, "compact_task", broken)
    packed, _, _ = trained
    entry = export_onnx(packed, tmp_path, tasks="0", progress=False)["tasks"][0]
    assert entry["params_compact"] == entry["params_dense"]
    assert entry["compaction"]["reason"].startswith("rejected")


@pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT is usable here")
@pytest.mark.slow
def test_tensorrt_absent_says_so_and_exits_nonzero(trained, tmp_path, capsys):
    _, _, path = trained
    assert cli(["export", str(path), "--format", "tensorrt", "--out", str(tmp_path), "--quiet"]) == 1
    assert "TensorRT" in capsys.readouterr().err
    assert not (tmp_path / "index.json").exists()


@pytest.mark.slow
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engines_per_task(trained, tmp_path):
    import tensorrt as trt

    from edgecl.export import build_engines

    _, _, path = trained
    index = build_engines(path, tmp_path, tasks="0,1", fp16=True, max_batch=64, progress=False)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for entry in index["tasks"]:
        engine = runtime.deserialize_cuda_engine((tmp_path / entry["engine"]).read_bytes())
        assert engine is not None and engine.num_io_tensors == 2
        assert tuple(engine.get_tensor_profile_shape("x", 0)[2]) == (64, 1, 8, 8)
    again = build_engines(path, tmp_path / "again", tasks="0", progress=False)
    assert os.path.exists(tmp_path / "again" / again["tasks"][0]["engine"])


def test_latency_before_and_after_compaction_is_reported_per_task(tmp_path, capsys):
    from edgecl.synthetic import structured_lps_model

    packed = structured_lps_model(preset("mlp", width=2), keep_fraction=0.3, n_tasks=2, unit="column")
    path = tmp_path / "m.edgecl"
    artifact.save(packed, path)
    for extra in ([], ["--fp16"]):  # with fp16, against the dense graph stored in fp16 too
        out = tmp_path / f"onnx{len(extra)}"
        assert cli(["export", str(path), "--latency", "--quiet", "--out", str(out), *extra]) == 0
        index = json.loads((out / "index.json").read_text())
        for entry in index["tasks"]:
            assert entry["params_compact"] < entry["params_dense"]
            timing = entry["latency_ms"]
            assert set(timing) == {"dense", "compact", "speedup"} and set(timing["speedup"]) == {"1", "64"}
            assert all(v > 0 for part in timing.values() for v in part.values())
        assert "faster b1/b64" in capsys.readouterr().out


def test_exported_files_name_their_task_in_plain_onnxruntime(tmp_path):
    """A deployer opens task_NNN.onnx in plain ONNX Runtime, away from index.json: the graph's metadata names its
    task, classes and model (they held none), the input and output are the ones index.json gives, and the logits
    are the runtime's."""
    import onnxruntime as ort
    from edgecl.runtime import TaskRuntime
    packed = random_packed(preset("lenet"), n_tasks=3, classes=(4, 2, 3))
    path = tmp_path / "m.edgecl"
    artifact.save(packed, path)
    done = subprocess.run([sys.executable, "-m", "edgecl", "export", str(path), "--out", str(tmp_path / "onnx"),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "onnx" / "index.json").read_text())
    x = np.random.default_rng(0).random((2, *packed.arch["input_shape"]), dtype=np.float32)
    runtime = TaskRuntime(str(path))
    for entry in index["tasks"]:
        session = ort.InferenceSession(str(tmp_path / "onnx" / entry["file"]), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert meta == {"edgecl.task_index": str(entry["index"]), "edgecl.task_name": entry["name"],
                        "edgecl.n_classes": str(entry["n_classes"]), "edgecl.method": index["method"],
                        "edgecl.arch": index["arch"], "edgecl.n_tasks": "3", "edgecl.version": index["edgecl_version"]}
        assert [i.name for i in session.get_inputs()] == [index["input"]["name"]]
        assert [o.name for o in session.get_outputs()] == [index["output"]["name"]]
        logits = session.run(None, {index["input"]["name"]: x})[0]
        np.testing.assert_allclose(logits, runtime.infer(x, task=entry["index"]), atol=1e-4, rtol=1e-4)
