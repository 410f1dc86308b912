"""The device path of `TaskRuntime` end to end, on the CPU with numpy standing in for the GPU
(``resident="device"``): task deltas resident in "device" memory, switches written there by the device programs,
tensors bound to ONNX Runtime by pointer, device inputs and outputs, the CUDA-graph bookkeeping, the device ledger
and the audit's device section — against the per-task reference sessions. And the clear errors of ``device="cuda"``
on a machine without onnxruntime-gpu, CuPy or a GPU."""
from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from edgecl.arch import preset, validate
from edgecl.errors import BudgetError, UsageError
from edgecl.graph.builder import build_onnx
from edgecl.runtime import TaskRuntime
from edgecl.runtime import plan as plan_module
from edgecl.runtime.audit import audit, budget_summary
from edgecl.runtime.device_arrays import CupyArrays, cupy_problem
from edgecl.runtime.providers import require_placement
from edgecl.synthetic import random_packed
from test_runtime import DEEP, references


@pytest.fixture(scope="module")
def mixed():
    return random_packed(validate(DEEP), n_tasks=5, shape="mixed", classes=(10, 3, 7))


class DLPackOnly:
    """An array handed over only through the DLPack protocol (as a torch or JAX array would be)."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


@pytest.mark.parametrize("cache,factor_min,cuda_graph", [(2, None, False), (5, 0, False), (2, None, True),
                                                         (1, 0, True)])
def test_random_switches_on_the_device_path_match_references(mixed, cache, factor_min, cuda_graph, monkeypatch):
    """300 seeded switches and inferences over every task (misses and hits, heads of 10/3/7 classes): the device
    path's logits equal the per-task references — folded and factored layers, with and without CUDA-graph layout."""
    if factor_min is not None:
        monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", factor_min)
    refs = references(mixed)
    runtime = TaskRuntime(mixed, resident="device", cache_tasks=cache, cuda_graph=cuda_graph)
    assert runtime.resident == "device" and runtime.memory_report(measure=False)["device"]["arrays"] == "numpy"
    rng = np.random.default_rng(11)
    worst = 0.0
    for _ in range(300):
        t = int(rng.integers(mixed.n_tasks))
        x = rng.standard_normal((int(rng.choice([1, 3, 8])), 1, 8, 8)).astype(np.float32)
        runtime.switch(t)
        y = runtime.infer(x)
        assert type(y) is np.ndarray and y.shape == (len(x), mixed.tasks[t].n_classes)
        worst = max(worst, float(np.abs(y - refs[t].run(None, {"x": x})[0]).max()))
    assert worst <= 1e-5
    info = runtime.cache_info()
    assert info["misses"] > 0 and info["hits"] > 0
    if cuda_graph:  # one graph per (slot, batch, head shape), each with its fixed buffers reserved
        graphs = runtime._strategy._store.graph_count()
        assert 0 < graphs <= cache * 3 * 3
        assert sum(k.startswith("device CUDA graph") for k in runtime.device_ledger.items) == graphs


def test_device_inputs_and_outputs(mixed):
    """An OrtValue, a DLPack array and a host array give the same logits; on_device leaves them where the model
    ran (numpy here); bad device inputs are refused like host ones."""
    refs = references(mixed)
    runtime = TaskRuntime(mixed, resident="device", cache_tasks=1)
    x = np.random.default_rng(3).standard_normal((4, 1, 8, 8)).astype(np.float32)
    want = refs[2].run(None, {"x": x})[0]
    for given in (x, ort.OrtValue.ortvalue_from_numpy(x), DLPackOnly(x), DLPackOnly(x.astype(np.float64))):
        np.testing.assert_allclose(runtime.infer(given, task=2), want, atol=1e-5)
    kept = runtime.infer(x, task=2, on_device=True)
    np.testing.assert_allclose(kept, want, atol=1e-5)
    bad = x.copy()
    bad[1, 0, 2, 3] = np.nan
    with pytest.raises(UsageError, match=r"1 NaN/inf values \(first at index \(1, 0, 2, 3\)\)"):
        runtime.infer(DLPackOnly(bad), task=2)
    with pytest.raises(UsageError, match=r"shape \(4, 64\); expected \(batch, 1, 8, 8\)"):
        runtime.infer(DLPackOnly(x.reshape(4, 64)), task=2)
    with pytest.raises(UsageError, match="dtype int32"):
        runtime.infer(DLPackOnly(x.astype(np.int32)), task=2)
    with pytest.raises(UsageError, match="logits of 4 of 4 inputs are not finite"):
        runtime.infer(DLPackOnly(np.full_like(x, 3e38)), task=2)
    # the host strategy takes OrtValues too
    host = TaskRuntime(mixed, cache_tasks=1)
    np.testing.assert_allclose(host.infer(ort.OrtValue.ortvalue_from_numpy(x), task=2), want, atol=1e-5)


def test_device_path_from_many_threads(mixed):
    refs = references(mixed)
    runtime = TaskRuntime(mixed, resident="device", cache_tasks=2)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(100):
                t = int(rng.integers(mixed.n_tasks))
                x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
                np.testing.assert_allclose(runtime.infer(x, task=t), refs[t].run(None, {"x": x})[0], atol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


def test_device_ledger_holds_the_model_and_refuses_beyond_its_budget():
    packed = random_packed(preset("mlp"), n_tasks=4)
    runtime = TaskRuntime(packed, resident="device", cache_tasks=2)
    device = runtime.memory_report(measure=False)["device"]
    assert {"device base weights", "device task deltas", "device cache slot 0", "device cache slot 1"} \
        <= set(device["predicted"])
    assert "task masks" not in runtime.ledger.items  # the keep bits went to the device
    slot = device["predicted"]["device cache slot 0"]
    assert slot == runtime.slot_bytes > 0
    fixed = device["predicted_total"] - 2 * slot
    with pytest.raises(BudgetError, match=r"device cache slot 1"):
        TaskRuntime(packed, resident="device", cache_tasks=2, device_budget=fixed + slot + slot // 2)
    fitted = TaskRuntime(packed, resident="device", device_budget=fixed + 3 * slot + 10)
    assert fitted.n_slots == 3  # as many slots as the device budget holds
    with pytest.raises(BudgetError, match="device memory budget .* refused before reading any tensor"):
        TaskRuntime(packed, resident="device", device_budget="10kB")


def test_audit_reports_the_device_section():
    packed = random_packed(preset("lenet"), n_tasks=3)
    report = audit(packed, "1GiB", batch=4, resident="device", device_budget="64MiB")
    device = report["resident"]["device"]
    assert device["arrays"] == "numpy" and device["measured_increase"] is None  # no separate device memory here
    assert report["device_fits"] and report["device_needed"] == device["predicted_peak"] > 0
    assert device["bytes_per_task"] > 0
    # slots and added tasks are the device's: counted against the device budget
    room = (64 << 20) - report["device_needed"]
    assert report["more_tasks_fit"] == int(room // report["resident"]["resident_bytes_per_task"])
    assert report["tasks_cacheable"] == min(3, room // report["resident"]["slot_bytes"] + 1)
    assert "device (numpy): needs" in budget_summary(report)
    tight = audit(packed, "1GiB", batch=4, resident="device", device_budget=report["device_needed"] - 1)
    assert not tight["fits"] and not tight["device_fits"]


def test_residence_options_are_checked(mixed):
    with pytest.raises(UsageError, match="resident 'gpu' unknown"):
        TaskRuntime(mixed, resident="gpu")
    with pytest.raises(UsageError, match="strategy 'sessions' runs on the CPU only"):
        TaskRuntime(mixed, resident="device", strategy="sessions")
    with pytest.raises(UsageError, match="cuda_graph needs the device path"):
        TaskRuntime(mixed, cuda_graph=True)
    with pytest.raises(UsageError, match="budget 'lots' is not a size"):
        TaskRuntime(mixed, resident="device", device_budget="lots")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers() and cupy_problem() is None,
                    reason="onnxruntime-gpu and CuPy are installed: nothing is missing")
def test_cuda_without_the_gpu_extra_names_every_missing_piece_and_the_fix(mixed):
    with pytest.raises(UsageError) as err:
        TaskRuntime(mixed, device="cuda")
    message = str(err.value)
    assert "pip install 'edgecl[gpu]'" in message
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "onnxruntime-gpu (CUDAExecutionProvider" in message
    if cupy_problem() is not None:
        assert "CuPy (not installed" in message
    with pytest.raises(UsageError, match="needs"):
        audit(mixed, "1GiB", device="cuda")


@pytest.mark.skipif(cupy_problem() is None, reason="CuPy is installed")
def test_cupy_arrays_without_cupy_name_the_fix():
    with pytest.raises(UsageError, match=r"needs CuPy, which cannot be imported .*pip install 'edgecl\[gpu\]'"):
        CupyArrays()


def _tiny_model() -> bytes:
    return build_onnx(preset("mlp"), {k: np.zeros(v, np.float32) for k, v in
                                      {"fc1.weight": (256, 64), "fc1.bias": (256,), "fc2.weight": (256, 256),
                                       "fc2.bias": (256,), "head.weight": (10, 256), "head.bias": (10,)}.items()}
                      ).SerializeToString()


def test_a_session_left_on_the_cpu_is_refused_for_cuda():
    """ONNX Runtime falls back to the CPU silently when its CUDA EP finds no GPU: a real CPU session stands for
    that outcome here, and the device path refuses it rather than run the model on the host."""
    session = ort.InferenceSession(_tiny_model(), providers=["CPUExecutionProvider"])
    require_placement(session, "cpu")
    with pytest.raises(UsageError, match=r"placed the session on \['CPUExecutionProvider'\], not on a GPU"):
        require_placement(session, "cuda")


def test_preloading_the_cuda_libraries_is_tried_once_and_its_words_reach_the_placement_error():
    """The CUDA EP links the pip-installed CUDA libraries by name: they are preloaded once before the first CUDA
    session, and what onnxruntime said while trying is part of the error when the session still lands on the CPU."""
    from edgecl.runtime import providers

    said = providers.preload_cuda_libraries()
    assert providers.preload_cuda_libraries() is said and providers._PRELOADED == [said]
    providers._PRELOADED[:] = ["Failed to load libcublas.so.13: cannot open shared object file"]
    try:
        session = ort.InferenceSession(_tiny_model(), providers=["CPUExecutionProvider"])
        with pytest.raises(UsageError, match=r"preloading the CUDA libraries said: Failed to load libcublas\.so\.13"):
            require_placement(session, "cuda")
    finally:
        providers._PRELOADED[:] = [said]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers() and cupy_problem() is None,
                    reason="the gpu extra is installed")
def test_cli_on_cuda_without_the_gpu_extra_exits_2(tmp_path, capsys):
    from edgecl import artifact
    from edgecl.cli import main as cli

    path = tmp_path / "m.edgecl"
    artifact.save(random_packed(preset("mlp"), n_tasks=2), path)
    assert cli(["audit", str(path), "--budget", "1GiB", "--device", "cuda", "--device-budget", "2GiB"]) == 2
    assert cli(["run", str(path), "--task", "0", "--benchmark", "2", "--device", "cuda", "--cuda-graph"]) == 2
    assert "pip install 'edgecl[gpu]'" in capsys.readouterr().err


def test_cuda_sessions_are_made_without_tf32_and_with_a_tight_arena():
    """On an H200 the CUDA EP's TF32 default put the device runtime's logits up to 1.8e-3 from the CPU runtime's
    (tools/results/gpu_check_nvidia_h200_run1_tf32.json); every CUDA session is made with it off. The arena grows
    by what is asked, so device memory stays near the audit's prediction."""
    from edgecl.runtime.providers import session_providers

    for cuda_graph in (False, True):
        chosen = session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], cuda_graph)
        assert chosen[1] == "CPUExecutionProvider"
        name, options = chosen[0]
        assert name == "CUDAExecutionProvider" and options["use_tf32"] == "0"
        assert options["arena_extend_strategy"] == "kSameAsRequested"
        assert options["enable_cuda_graph"] == ("1" if cuda_graph else "0")


def test_a_refused_device_batch_is_refused_before_it_runs(mixed):
    """A device batch with NaN/inf is refused as a host batch is: before the run, with the same UsageError, so it
    neither fills a cache slot, captures a CUDA graph, reserves device bytes, nor meets the activations budget first
    (a BudgetError would hide what is wrong with it). (c634fd2 checked it after the run, with the logits.)"""
    x = np.random.default_rng(5).standard_normal((4, 1, 8, 8)).astype(np.float32)
    bad = np.random.default_rng(6).standard_normal((6, 1, 8, 8)).astype(np.float32)
    bad[1, 0, 2, 3] = np.inf
    runtime = TaskRuntime(mixed, resident="device", cache_tasks=2, cuda_graph=True)
    runtime.infer(x, task=0)
    before = runtime.cache_info(), dict(runtime.device_ledger.items), dict(runtime.ledger.items)
    overflow = bad.astype(np.float64)
    overflow[1, 0, 2, 3] = 1e39  # finite in float64, inf once cast to float32
    for given in (bad, ort.OrtValue.ortvalue_from_numpy(bad), DLPackOnly(bad), DLPackOnly(bad.astype(np.float16)),
                  DLPackOnly(np.asfortranarray(bad)), DLPackOnly(overflow)):
        with pytest.raises(UsageError, match=r"1 NaN/inf values \(first at index \(1, 0, 2, 3\)\)"):
            runtime.infer(given, task=3)
    assert (runtime.cache_info(), runtime.device_ledger.items, runtime.ledger.items) == before
    huge = np.zeros((200_000, 1, 8, 8), np.float32)
    huge[7, 0, 0, 0] = np.nan
    tight = TaskRuntime(mixed, resident="device", cache_tasks=1, budget="48MiB")
    for given in (huge, DLPackOnly(huge)):  # the batch is over the budget too: its NaN is what is named
        with pytest.raises(UsageError, match=r"1 NaN/inf values \(first at index \(7, 0, 0, 0\)\)") as caught:
            tight.infer(given, task=1)
        assert not isinstance(caught.value, BudgetError)
