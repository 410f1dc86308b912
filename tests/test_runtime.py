"""TaskRuntime against per-task reference sessions (folded ONNX from `materialize`), on every delta kind, plus input
checks, budgets and the `edgecl run` command."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest

from edgecl.arch import preset, validate
from edgecl.deltas import materialize
from edgecl.errors import BudgetError, UsageError
from edgecl.graph.builder import build_onnx
from edgecl.runtime import TaskRuntime, parse_budget
from edgecl.runtime import plan as plan_module
from edgecl.runtime.plan import build_plans
from edgecl.synthetic import random_packed

DEEP = validate({"name": "deep", "input_shape": [1, 8, 8], "layers": [
    {"op": "flatten"}, {"op": "linear", "name": "l1", "in": 64, "out": 48}, {"op": "relu"},
    {"op": "linear", "name": "l2", "in": 48, "out": 40}, {"op": "relu"},
    {"op": "linear", "name": "l3", "in": 40, "out": 40}, {"op": "relu"},
    {"op": "linear", "name": "l4", "in": 40, "out": 32}, {"op": "relu"},
    {"op": "linear", "name": "l5", "in": 32, "out": 24}, {"op": "relu"}]})


def references(packed):
    """The exporter's per-task reference: a folded ONNX Runtime session per task."""
    return [ort.InferenceSession(build_onnx(packed.arch, materialize(packed, t)).SerializeToString(),
                                 providers=["CPUExecutionProvider"]) for t in range(packed.n_tasks)]


@pytest.fixture(scope="module")
def mixed():
    return random_packed(DEEP, n_tasks=5, shape="mixed", classes=(10, 3, 7))


def test_plans_reproduce_materialize_bit_for_bit(mixed):
    plans = build_plans(mixed)
    assert {p.plan for p in plans} == {"static", "own", "masked", "generic", "permute"}
    for t in range(mixed.n_tasks):
        dense = materialize(mixed, t)
        for plan in plans:
            if plan.varies:
                out = np.full(plan.shape, np.nan, np.float32)
                plan.fill(t, out)
                assert np.array_equal(out.view(np.uint32), dense[plan.name].view(np.uint32)), (t, plan.name)


@pytest.mark.parametrize("strategy,cache,factor_min", [("inplace", 2, None), ("inplace", 5, None),
                                                      ("inplace", 2, 0), ("sessions", None, None)])
def test_random_switch_sequence_matches_references(mixed, strategy, cache, factor_min, monkeypatch):
    """1,000 seeded switches + inferences over all tasks (LRU misses and hits) equal the per-task references —
    with this small model's layers folded on a switch (default size rule) and factored (factor_min=0)."""
    if factor_min is not None:
        monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", factor_min)
        assert set(plan_module.factor_forms(mixed).values()) == {"node", "lowrank", "permute"}
    else:
        assert plan_module.factor_forms(mixed) == {}
    refs = references(mixed)
    runtime = TaskRuntime(mixed, strategy=strategy, cache_tasks=cache)
    rng = np.random.default_rng(7)
    worst = 0.0
    for _ in range(1000):
        t = int(rng.integers(mixed.n_tasks))
        x = rng.standard_normal((int(rng.integers(1, 9)), 1, 8, 8)).astype(np.float32)
        runtime.switch(t)
        y = runtime.infer(x)
        assert y.shape == (len(x), mixed.tasks[t].n_classes)
        worst = max(worst, float(np.abs(y - refs[t].run(None, {"x": x})[0]).max()))
    assert worst <= 1e-5
    if strategy == "inplace":
        info = runtime.cache_info()
        assert info["misses"] > 0 and info["hits"] > 0
        assert len(info["cached"]) == cache


def test_lenet_and_resnet_switch(tmp_path):
    for arch in (preset("lenet"), preset("resnet")):
        packed = random_packed(arch, n_tasks=3, shape="lps")
        refs = references(packed)
        runtime = TaskRuntime(packed, cache_tasks=1)
        x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
        for t in (2, 0, 1, 2):
            np.testing.assert_allclose(runtime.infer(x, task=t), refs[t].run(None, {"x": x})[0], atol=1e-5)


@pytest.mark.slow
def test_real_training_accuracy_survives_the_runtime():
    """A finetune model trained on real digits: the runtime's predictions equal the training engine's."""
    import torch
    from edgecl.train.data import make_stream
    from edgecl.train.engine import predict, run
    from edgecl.train.protocol import TrainContext
    from edgecl.train.registry import create

    torch.manual_seed(0)
    stream = make_stream("split-digits", 2, 0)
    method = create("finetune", preset("mlp"), {"epochs": 1})
    result = run(method, stream, TrainContext(progress=False), log=lambda *a: None)
    runtime = TaskRuntime(result.packed)
    for t, task in enumerate(stream.tasks):
        ours = runtime.infer(task.x_test, task=task.name).argmax(1)
        assert np.array_equal(ours, predict(result.packed, t, task.x_test))


def test_runtime_keeps_only_what_a_switch_reads(tmp_path):
    """From an LPS artifact the in-place runtime keeps the base weights, the heads (with ``task_tensors="resident"``;
    "auto" may read them on a miss instead: tests/test_task_tensors.py) and 1 bit per weight per task, not the decoded sharing masks
    or the owner maps, and its ledger charges exactly that; per-task sessions keep none of the model. Both still
    equal the references."""
    from edgecl import artifact

    packed = random_packed(preset("mlp"), n_tasks=6, shape="lps")
    path = tmp_path / "lps.edgecl"
    artifact.save(packed, path)
    refs = references(packed)
    x = np.random.default_rng(4).standard_normal((3, 1, 8, 8)).astype(np.float32)
    runtime = TaskRuntime(path, strategy="inplace", cache_tasks=2, task_tensors="resident")
    held = [a for p in runtime.plans for a in [*([p.base] if p.base is not None else []), *p.task_arrays()]]
    assert not any(a.dtype == np.bool_ for a in held)
    weights = sum(a.nbytes for name, a in packed.base.items() if not name.endswith(":owner"))
    heads = sum(tt[name].nbytes for tt in packed.task_tensors for name in ("head.weight", "head.bias"))
    assert runtime.ledger.items["model tensors"] == weights + heads
    masked = [packed.base[name].size for name, spec in packed.params.items() if spec["kind"] == "lps"]
    assert runtime.ledger.items["task masks"] == packed.n_tasks * sum(-(-n // 8) for n in masked)
    sessions = TaskRuntime(path, strategy="sessions")
    assert "model tensors" not in sessions.ledger.items and sessions.plans == []
    for t in (5, 0, 3):
        for rt in (runtime, sessions):
            np.testing.assert_allclose(rt.infer(x, task=t), refs[t].run(None, {"x": x})[0], atol=1e-5)


def test_heads_follow_the_task_by_name(mixed):
    runtime = TaskRuntime(mixed, cache_tasks=1)
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert runtime.switch("task1") == 1
    assert runtime.infer(x).shape == (2, 3)
    assert runtime.infer(x, task="task2").shape == (2, 7)
    assert runtime.tasks == [f"task{t}" for t in range(5)]


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 64), np.float32), r"shape \(2, 64\); expected \(batch, 1, 8, 8\)"),
    (np.zeros((1, 8, 8), np.float32), r"x\[None\]"),
    (np.zeros((0, 1, 8, 8), np.float32), "empty batch"),
    (np.zeros((2, 1, 8, 8), np.uint8), "dtype uint8"),
    (np.array([[[["a"]]]]), "dtype <U1"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), "128 NaN/inf"),
    (np.full((1, 1, 8, 8), 1e300), "NaN/inf"),  # float64 beyond float32 range
])
def test_bad_inputs_are_usage_errors(mixed, bad, match):
    runtime = TaskRuntime(mixed, cache_tasks=1)
    with pytest.raises(UsageError, match=match):
        runtime.infer(bad, task=0)


def test_float64_is_cast_and_task_errors(mixed):
    runtime = TaskRuntime(mixed, cache_tasks=1)
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8))
    np.testing.assert_array_equal(runtime.infer(x, task=0), runtime.infer(x.astype(np.float32), task=0))
    with pytest.raises(UsageError, match="no task selected"):
        runtime.infer(x)
    with pytest.raises(UsageError, match="task 9 out of range"):
        runtime.switch(9)
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        runtime.infer(x, task="nope")
    with pytest.raises(UsageError, match="device 'tpu' unknown"):
        TaskRuntime(mixed, device="tpu")
    with pytest.raises(UsageError, match="CUDAExecutionProvider"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            raise UsageError("CUDAExecutionProvider present: nothing to refuse")
        TaskRuntime(mixed, device="cuda")


@pytest.mark.parametrize("text,value", [("32MiB", 32 << 20), ("1.5GB", 1_500_000_000), ("800kB", 800_000),
                                        (4096, 4096), ("1e6", 1_000_000), (" 2 gib ", 2 << 30)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["", "-5MB", "12 parsecs", "0", True, "nan"])
def test_parse_budget_rejects(text):
    with pytest.raises(UsageError, match="budget"):
        parse_budget(text)


def test_budget_refuses_cache_and_batch_beyond_it():
    packed = random_packed(preset("mlp"), n_tasks=4)
    free = TaskRuntime(packed, strategy="inplace", cache_tasks=1)
    # the process-wide environment is charged to the first runtime of the process only
    fixed = free.ledger.used - free.ledger.items["cache slot 0"] - free.ledger.items.get("onnxruntime environment", 0)
    slot = free.ledger.items["cache slot 0"]
    budget = fixed + 2 * slot + slot // 2  # room for two slots, not three
    with pytest.raises(BudgetError, match=rf"budget .*\({budget} B\).*cache slot 2") as err:
        TaskRuntime(packed, strategy="inplace", budget=budget, cache_tasks=3)
    assert "asked for" in str(err.value)
    runtime = TaskRuntime(packed, strategy="inplace", budget=budget)
    assert runtime.n_slots == 2  # as many as fit
    with pytest.raises(BudgetError, match="batch 100000"):
        runtime.infer(np.zeros((100_000, 1, 8, 8), np.float32), task=0)
    assert runtime.infer(np.zeros((4, 1, 8, 8), np.float32), task=0).shape == (4, 10)
    with pytest.raises(BudgetError, match="base weights .*refused before reading any tensor"):
        TaskRuntime(packed, budget="100kB")
    auto = TaskRuntime(packed, budget="1GiB")
    assert auto.strategy == "sessions"  # every task's folded session fits: the faster choice
    assert TaskRuntime(packed, budget=budget).strategy == "inplace"


def test_sessions_strategy_compacts_structured_masks():
    """Column-structured LPS: each task's session is physically smaller and still equals the dense reference."""
    from edgecl.synthetic import structured_lps_model

    packed = structured_lps_model(preset("mlp"), keep_fraction=0.4, n_tasks=2)
    refs = references(packed)
    runtime = TaskRuntime(packed, strategy="sessions")
    dense = sum(a.size for a in materialize(packed, 0).values())
    assert all(n < dense for n in runtime.session_params), (runtime.session_params, dense)
    x = np.random.default_rng(2).standard_normal((16, 1, 8, 8)).astype(np.float32)
    for t in range(packed.n_tasks):
        np.testing.assert_allclose(runtime.infer(x, task=t), refs[t].run(None, {"x": x})[0], atol=1e-5)


def test_close_releases_and_refuses():
    packed = random_packed(preset("mlp"), n_tasks=2)
    with TaskRuntime(packed, cache_tasks=1) as runtime:
        runtime.infer(np.zeros((1, 1, 8, 8), np.float32), task=1)
    assert runtime.ledger.used == 0
    with pytest.raises(UsageError, match="closed"):
        runtime.switch(0)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers()
                    or importlib.util.find_spec("cupy") is None, reason="needs the gpu extra (onnxruntime-gpu, CuPy)")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_device_resident_switching_matches_references(mixed, cuda_graph):
    """Tasks resident in GPU memory, switched there (ONNX Runtime CUDA EP + CuPy): 300 switches within 1e-4 of the
    CPU references; device inputs and outputs. Unverified until run on a GPU (README)."""
    import cupy

    refs = references(mixed)
    runtime = TaskRuntime(mixed, device="cuda", cache_tasks=2, cuda_graph=cuda_graph)
    rng = np.random.default_rng(5)
    for _ in range(300):
        t = int(rng.integers(mixed.n_tasks))
        x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
        runtime.switch(t)
        on_device = runtime.infer(cupy.asarray(x), on_device=True)
        np.testing.assert_allclose(cupy.asnumpy(on_device), refs[t].run(None, {"x": x})[0], atol=1e-4)


LENET = ("conv1", "conv2", "fc1")


@pytest.mark.slow
@pytest.mark.parametrize("method,config,arch,forms", [
    ("agscl", {"epochs": 2}, "mlp", {"fc1": "node", "fc2": "node"}),
    ("rgo", {"epochs": 1}, "mlp", {"fc1": "permute+bias", "fc2": "permute+bias"}),
    ("halrp", {"epochs": 3, "alpha": 0.99}, "mlp", {"fc1": "lowrank", "fc2": "lowrank"}),
    ("agscl", {"epochs": 2}, "lenet", dict.fromkeys(LENET, "node")),
    ("rgo", {"epochs": 1}, "lenet", dict.fromkeys(LENET, "permute+bias")),
    ("halrp", {"epochs": 3, "alpha": 0.99, "min_rank": 1}, "lenet", dict.fromkeys(LENET, "lowrank")),
])
def test_factored_layers_of_trained_models_match_references(method, config, arch, forms, monkeypatch):
    """Node masks, permutations and low-rank factors of real trained models are applied to activations around a
    constant, pre-packed base weight (every layer factored here, whatever its size); every task still equals its
    folded reference, and a switch copies nothing but masked biases."""
    import torch
    from edgecl.train.data import make_stream
    from edgecl.train.engine import run
    from edgecl.train.protocol import TrainContext
    from edgecl.train.registry import create

    monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    stream = make_stream("permuted-digits", 3, 0)
    result = run(create(method, preset(arch), config), stream, TrainContext(progress=False), log=lambda *a: None)
    packed = result.packed
    assert plan_module.factor_forms(packed) == forms
    runtime = TaskRuntime(packed, strategy="inplace")
    assert runtime.varying == [p for p in runtime.plans if p.name.endswith(".bias") and p.varies]
    refs = references(packed)
    for t, task in enumerate(stream.tasks):
        x = task.x_test[:64]
        assert np.abs(runtime.infer(x, task=t) - refs[t].run(None, {"x": x})[0]).max() <= 1e-5


def test_parallel_masked_fill_is_bit_identical():
    """A large masked tensor written by several threads in chunk-aligned ranges equals `materialize` bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    from edgecl.runtime.plan import CHUNK

    arch = validate({"name": "wide", "input_shape": [1, 8, 8], "layers": [
        {"op": "flatten"}, {"op": "linear", "name": "fc1", "in": 64, "out": 1000}, {"op": "relu"},
        {"op": "linear", "name": "fc2", "in": 1000, "out": 613}, {"op": "relu"}]})
    packed = random_packed(arch, n_tasks=3, shape="lps")
    (plan,) = [p for p in build_plans(packed) if p.name == "fc2.weight"]
    assert plan.plan == "masked" and int(np.prod(plan.shape)) > 2 * CHUNK
    with ThreadPoolExecutor(3) as pool:
        for t in range(packed.n_tasks):
            out = np.full(plan.shape, np.nan, np.float32)
            plan.fill(t, out, pool, 3)
            assert np.array_equal(out.view(np.uint32), materialize(packed, t)["fc2.weight"].view(np.uint32))


def test_returned_logits_are_the_callers_own(mixed):
    """Logits come out of a buffer bound once per batch size; what infer returns must not change on the next call."""
    runtime = TaskRuntime(mixed, strategy="inplace", cache_tasks=1)
    rng = np.random.default_rng(3)
    x1, x2 = (rng.standard_normal((4, 1, 8, 8)).astype(np.float32) for _ in range(2))
    y1 = runtime.infer(x1, task=0)
    kept = y1.copy()
    runtime.infer(x2, task=0)
    runtime.infer(x2, task=1)
    assert np.array_equal(y1, kept)


class _DLPackOnly:
    """A host array handed over only through the DLPack protocol, as a CPU torch or JAX tensor is."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_host_path_takes_ortvalue_and_dlpack_inputs(mixed):
    """On the host path an OrtValue and a DLPack-only CPU array give the numpy batch's logits (a DLPack carrier used
    to become a 0-d object array, refused as "dtype object"); a DLPack batch of the wrong shape is refused by shape."""
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    with TaskRuntime(mixed, cache_tasks=1) as runtime:
        want = runtime.infer(x, task=2)
        for given in (ort.OrtValue.ortvalue_from_numpy(x), _DLPackOnly(x), _DLPackOnly(x.astype(np.float64))):
            np.testing.assert_array_equal(runtime.infer(given, task=2), want)
        with pytest.raises(UsageError, match=r"shape \(3, 64\)"):
            runtime.infer(_DLPackOnly(x.reshape(3, 64)), task=2)


def _documented_report_keys():
    """The keys of the `memory_report()` table in docs/RUNTIME.md."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "RUNTIME.md").read_text()
    table = text.split("Every key of `memory_report()`", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))


@pytest.mark.parametrize("strategy", ["inplace", "sessions"])
def test_memory_report_describe_and_close_are_as_documented(tmp_path, strategy):
    """A deployer reads memory_report() by docs/RUNTIME.md's table: every key it returns is documented there (and
    every documented key but the device path's is returned); describe() is a method naming the strategy; after
    close() every call is refused instead of reporting a stale cache."""
    from edgecl import artifact
    path = tmp_path / "m.edgecl"
    artifact.save(random_packed(preset("lenet"), n_tasks=2), path)
    runtime = TaskRuntime(str(path), strategy=strategy, budget="64MiB")
    runtime.infer(np.zeros((2, 1, 8, 8), np.float32), task=1)
    report = runtime.memory_report()
    documented = _documented_report_keys()
    assert set(report) == documented - {"device"}
    assert report["strategy"] == strategy and report["budget"] == 64 * 2**20
    assert report["predicted_total"] == sum(report["predicted"].values())
    assert runtime.describe().startswith(f"{strategy} on CPUExecutionProvider, 2 tasks")
    runtime.close()
    for call in (runtime.memory_report, runtime.cache_info, runtime.describe, lambda: runtime.infer(
            np.zeros((1, 1, 8, 8), np.float32), task=0)):
        with pytest.raises(UsageError, match="closed"):
            call()
