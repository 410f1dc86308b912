"""tools/gpu_check.py — the one-command GPU check — runs here in its self-test mode: the whole script on the device
path's numpy twin (parity of every delta kind against the host runtime and `materialize`, the timing and memory
sections' code), so what a person runs on a GPU machine has run in CI. Without the `gpu` extra the GPU mode stops
with exit 2 and a JSON naming what is missing."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from tools_loader import load_tool

from edgecl.runtime.device_arrays import cupy_problem


def _gpu_check():
    return load_tool('gpu_check')


def test_self_test_runs_every_section_on_the_cpu_twin(tmp_path):
    out = tmp_path / "check.json"
    assert _gpu_check().main(["--self-test", "--switches", "20", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "error" not in report and report["self_test"]
    assert report["verdict"] == {"parity": True, "switch_vs_copy": None, "new_session_vs_switch": None,
                                 "infer_vs_dense": None, "memory": None}  # CPU timings are not judged as GPU ones
    kinds = {r["model"].split(" ", 1)[1] for r in report["parity"]}
    assert {"lps", "lowrank", "mixed", "node", "lps columns", "node groups"} <= kinds
    assert all(r["ok"] and r["max_abs_logits"] <= 1e-4 and not r["bits_mismatched"] for r in report["parity"])
    switch = report["switch"][0]
    assert switch["switch_ms"] > 0 and switch["copy_dense_ms"] > 0 and switch["new_session_ms"] > 0
    for mode in ("plain", "cuda_graph"):
        for batch in ("batch 1", "batch 64"):
            assert switch["inference"][mode][batch]["max_abs_logits"] <= 1e-4
    memory = report["memory"]["models"][0]
    assert memory["predicted"]["device base weights"] > 0 and memory["predicted_total"] > 0
    assert all(r["batch"] in (1, 4, 16) and r["seconds"]["device_infer"] > 0 for r in report["parity"])


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers() and cupy_problem() is None,
                    reason="the gpu extra is installed")
def test_gpu_mode_without_the_gpu_extra_exits_2_naming_it(tmp_path):
    out = tmp_path / "check.json"
    assert _gpu_check().main(["--out", str(out)]) == 2
    report = json.loads(out.read_text())
    assert "pip install 'edgecl[gpu]'" in report["error"] and report["verdict"] == {"error": False}


def test_a_broken_section_or_model_is_recorded_and_the_rest_still_runs(tmp_path):
    """A first run on a new GPU must not lose every figure to one failure: the broken section and the broken model
    are named with their traceback, the others are measured, the JSON exists, and the exit code is 2."""
    module = _gpu_check()
    module.check_memory = lambda *a: 1 / 0
    real_parity = module.check_parity
    planted = module.parity_models(True)[1][0]

    def parity(label, *args):
        if label == planted:
            raise RuntimeError("planted in one model")
        return real_parity(label, *args)

    module.check_parity = parity
    out = tmp_path / "check.json"
    assert module.main(["--self-test", "--switches", "5", "--repeats", "1", "--out", str(out)]) == 2
    report = json.loads(out.read_text())
    assert report["errors"]["memory"].startswith("ZeroDivisionError") and "gpu_check" in report["errors"]["memory"]
    broken = [r for r in report["parity"] if "error" in r]
    assert [r["model"] for r in broken] == [planted] and "planted in one model" in broken[0]["error"]
    assert sum(r["ok"] for r in report["parity"]) == len(report["parity"]) - 1
    assert report["switch"][0]["switch_ms"] > 0 and report["verdict"]["parity"] is False


def test_only_and_deadline_choose_what_runs(tmp_path):
    module = _gpu_check()
    out = tmp_path / "check.json"
    assert module.main(["--self-test", "--only", "memory", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "memory" in report and "parity" not in report and "switch" not in report
    assert module.main(["--self-test", "--deadline", "0", "--out", str(out)]) == 2  # nothing may start
    report = json.loads(out.read_text())
    assert set(report["errors"]) == {"memory", "parity", "switch"}
    with pytest.raises(SystemExit):
        module.main(["--self-test", "--only", "memroy"])


def test_parity_models_keep_a_standardised_conv_whose_switched_weight_is_compared_standardised():
    """The GPU run must meet a weight-standardised conv standardised on the device by a switch (`gpu_graphs.LAYERS`'
    stem): its bound weight is the standardised `materialize` (bit for bit on the twin), not the raw one."""
    from edgecl.arch.op_rules import is_standardized
    from edgecl.deltas import materialize

    module = _gpu_check()
    models = dict(module.parity_models(False))
    label = "layers lps"
    assert any(is_standardized(n) for n in models[label].arch["nodes"])
    kw = {"device": "cpu", "resident": "device"}
    report = module.check_parity(label, models[label], kw, 10, 0)
    assert report["ok"] and not report["bits_mismatched"] and report["standardized_max_rel_weight"] == 0.0
    runtime = module.TaskRuntime(models[label], cache_tasks=1, **kw)
    assert "stem" in runtime._strategy.std.written  # its graph reads no gain: a plain conv
    assert "stem.gain" not in {i.name for i in runtime._strategy._session.get_inputs()}
    raw = materialize(models[label], 0)["stem.weight"]
    assert not np.array_equal(runtime.bound_tensors(0)["stem.weight"], raw)


@pytest.mark.parametrize("label", ["norms lps", "norms lowrank", "layers node", "layers permute"])
def test_parity_models_carry_metaformer_v2s_bias_less_norms_and_square_and_the_twin_equals_the_host(label):
    """The GPU run meets MetaFormer v2's forms (`gpu_graphs`): a bias-less LayerNorm over the channels and square
    (NORMS), a bias-less GroupNorm1 (LAYERS), whose ONNX graphs read no bias for them; here on the numpy twin, with
    and without the CUDA-graph layout, against the host runtime and `materialize`."""
    module = _gpu_check()
    packed = dict(module.parity_models(False))[label]
    ops = {(n["op"], n.get("over"), n.get("bias", True)) for n in packed.arch["nodes"]}
    assert (("layer_norm", None, False) in ops and ("square", None, True) in ops) if label.startswith("norms") else \
        ("layer_norm", "map", False) in ops
    for kw in ({"device": "cpu", "resident": "device"}, {"device": "cpu", "resident": "device", "cuda_graph": True}):
        report = module.check_parity(label, packed, kw, 12, 1)
        assert report["ok"] and report["max_abs_logits"] <= 1e-4 and not report["bits_mismatched"], report
