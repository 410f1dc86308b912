"""The device path (``resident="device"``, here on its numpy twin) standardises weight-standardised convs when a switch
writes a slot, as the host path does (`edgecl.runtime.device_standardize`): its session's graph holds plain convs
(before, it recomputed every filter's mean and variance on every call), its logits equal the host runtime's over
random switches, with and without the CUDA-graph layout, and what the standardisation adds on the device is charged
to the device ledger."""
from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
from layer_nets_nf import nf_spec, std_spec
from test_runtime import references

from edgecl.arch import validate
from edgecl.deltas import materialize
from edgecl.errors import BudgetError, UsageError
from edgecl.graph.standardize import scratch_bytes, standardized
from edgecl.runtime import TaskRuntime
from edgecl.synthetic import random_packed

STD_OPS = {"ReduceMean", "Sqrt", "Div"}  # the in-graph standardisation (`graph.standardize.standardized_onnx`)


@pytest.fixture(scope="module")
def nets():
    return {"nf": validate(nf_spec()), "std": validate(std_spec())}


@pytest.mark.parametrize("net,shape,cuda_graph,factor", [
    ("nf", "lps", False, True), ("nf", "lps", True, True), ("nf", "mixed", False, False), ("nf", "mixed", True, True),
    ("nf", "lowrank", True, False), ("nf", "permute", False, True), ("nf", "node", True, True),
    ("std", "lps", False, True), ("std", "mixed", True, False)])
def test_device_path_standardises_on_the_switch_and_equals_the_host_runtime(nets, net, shape, cuda_graph, factor):
    """NF-ResNet's gained convs and BiT's gainless StdConv2d, their weights masked (LPS, node), low-rank, permuted or
    owned per task (mixed), gains shared (constants of the session when factored): 60 random switches over 3 tasks
    with 2 slots (misses and hits), logits against the host runtime (which standardises on write) and against the
    exporter's per-task sessions (which standardise in the graph)."""
    packed = random_packed(nets[net], n_tasks=3, shape=shape, classes=(5, 3))
    refs = references(packed)
    host = TaskRuntime(packed, cache_tasks=2, factor=factor)
    device = TaskRuntime(packed, resident="device", cache_tasks=2, cuda_graph=cuda_graph, factor=factor)
    strategy = device._strategy
    assert strategy.std.written  # some convs' weights are written by a switch, and standardised there
    assert not strategy.graph_ops & STD_OPS
    assert not any(i.name.endswith(".gain") for i in strategy._session.get_inputs())
    rng = np.random.default_rng(7)
    worst_host = worst_ref = 0.0
    for _ in range(60):
        t = int(rng.integers(3))
        x = rng.standard_normal((int(rng.choice([1, 3])), 1, 8, 8)).astype(np.float32)
        device.switch(t)
        got = device.infer(x)
        worst_host = max(worst_host, float(np.abs(got - host.infer(x, task=t)).max()))
        worst_ref = max(worst_ref, float(np.abs(got - refs[t].run(None, {"x": x})[0]).max()))
    assert worst_host <= 1e-5 and worst_ref <= 1e-5
    info = device.cache_info()
    assert info["misses"] > 3 and info["hits"] > 0
    if cuda_graph:  # the slots were rewritten in place: the graphs' bound addresses still read the new weights
        assert strategy._store.graph_count() > 0
    device.close()
    host.close()


def test_bound_weights_are_the_standardised_ones_and_the_device_ledger_charges_the_standardisation(nets):
    """The session reads each written conv's weight standardised (not `materialize`'s raw one), and no gain; the
    device ledger holds the float64 scratch of the largest chunk and the gains that are the session's constants."""
    packed = random_packed(nets["nf"], n_tasks=3, shape="lps", classes=(5, 3))
    device = TaskRuntime(packed, resident="device", cache_tasks=1)
    std = device._strategy.std
    raw = materialize(packed, 1)
    bound = device.bound_tensors(1)
    assert not any(name.endswith(".gain") for name in bound)
    want = std.fold(raw)
    for name in std.written:
        weight = f"{name}.weight"
        assert not np.array_equal(bound[weight], raw[weight])
        assert np.array_equal(bound[weight].view(np.uint32), want[weight].view(np.uint32))
        rows = bound[weight].reshape(len(bound[weight]), -1).astype(np.float64)  # each filter: mean 0, σ ≈ |gain|
        var = raw[weight].reshape(len(rows), -1).astype(np.float64).var(axis=1)
        eps, scale = std.convs[name]
        np.testing.assert_allclose(rows.mean(axis=1), 0, atol=1e-6)
        np.testing.assert_allclose(rows.std(axis=1), np.abs(raw[f"{name}.gain"] * scale) * np.sqrt(var / (var + eps)),
                                   rtol=1e-5, atol=1e-7)
    items = dict(device.device_ledger.items)
    shapes = [raw[f"{name}.weight"].shape for name in std.written]
    assert items["device standardisation scratch"] == scratch_bytes(shapes) > 0
    assert items["device standardised-conv gains"] == sum(raw[f"{name}.gain"].nbytes for name in std.written)
    device.close()
    order = list(items)  # a budget one byte short of the scratch, charged before anything of it is allocated
    budget = sum(items[k] for k in order[:order.index("device standardisation scratch") + 1]) - 1
    with pytest.raises(BudgetError, match="standardisation scratch"):
        TaskRuntime(packed, resident="device", cache_tasks=1, device_budget=budget)


def test_a_switch_whose_standardised_weight_overflows_names_the_conv_on_the_device_path():
    spec = validate({"name": "s", "input_shape": [4, 6, 6], "nodes": [
        {"name": "c", "op": "conv", "inputs": ["input"], "in": 4, "out": 6, "k": 3, "standardize": 1e-5,
         "gain_scale": 1.0}, {"name": "g", "op": "gap", "inputs": ["c"]},
        {"name": "f", "op": "flatten", "inputs": ["g"]}]})
    packed = random_packed(spec, n_tasks=2, shape="lps", classes=(3,))
    packed.base["c.gain"] = np.full(6, 3e38, np.float32)
    device = TaskRuntime(packed, resident="device", cache_tasks=1)
    with pytest.raises(UsageError, match=r"architecture node 'c': its standardised weight overflows float32"):
        device.infer(np.ones((1, 4, 6, 6), np.float32), task=0)


BIG_STD = {"name": "big", "input_shape": [64, 4, 4], "nodes": [  # one standardised conv of ~18 scratch chunks
    {"name": "c", "op": "conv", "inputs": ["input"], "in": 64, "out": 2048, "k": 3, "pad": 1, "standardize": 1e-5},
    {"name": "g", "op": "gap", "inputs": ["c"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]}


def test_concurrent_misses_standardise_one_slot_at_a_time_as_the_scratch_is_charged():
    """The device ledger charges the float64 scratch of one standardisation, but the slot cache fills slots outside
    its lock: four threads missing on four slots at once must take turns standardising (else the device holds up to
    four scratches, CuPy's pool keeping them, against one charged). Observed on the real calls through a profiler
    hook on `graph.standardize.standardized`; the logits still equal the per-task sessions'."""
    packed = random_packed(validate(BIG_STD), n_tasks=4, shape="permute", classes=(3,))
    refs = references(packed)
    device = TaskRuntime(packed, resident="device", cache_tasks=4)
    x = np.random.default_rng(0).standard_normal((1, 64, 4, 4)).astype(np.float32)
    live, most, count, lock = [0], [0], [0], threading.Lock()

    def profile(frame, event, arg):
        if frame.f_code is standardized.__code__ and event in ("call", "return"):
            with lock:
                live[0] += 1 if event == "call" else -1
                most[0], count[0] = max(most[0], live[0]), count[0] + (event == "call")

    barrier, got = threading.Barrier(4), {}

    def work(t: int) -> None:
        barrier.wait()
        got[t] = device.infer(x, task=t)

    threading.setprofile(profile)
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        threading.setprofile(None)
    assert count[0] == 4 and device.cache_info()["misses"] == 4  # one standardisation per miss, all concurrent
    assert most[0] == 1, f"{most[0]} standardisations ran at once against one scratch charged"
    for t in range(4):
        np.testing.assert_allclose(got[t], refs[t].run(None, {"x": x})[0], atol=1e-5)
    device.close()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 1), (65536, 1, 1, 1), (100000, 2, 1, 1), (50000, 3, 1, 1),
                                   (2048, 64, 3, 3), (2, 200000, 1, 1), (7, 65537, 1, 1)])
def test_the_scratch_charged_covers_what_standardising_allocates(shape):
    """`scratch_bytes` is what the device ledger charges for standardising a slot: at least what `standardized`
    allocates at its peak (measured with tracemalloc on numpy), for huge single filters and for filters of 1-3
    numbers too, whose per-filter float64 statistics are as large as the chunk itself."""
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    gain = np.ones(shape[0], np.float32)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        standardized(weight, gain, 1e-5, 1.0, out=weight)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert peak <= scratch_bytes([shape]), (peak, scratch_bytes([shape]))


@pytest.mark.parametrize("shape,options", [("finetune", {"factor": False}), ("lps", {"factor": True}),
                                           ("mixed", {"factor": False, "cuda_graph": True})])
def test_a_device_budget_of_exactly_what_is_charged_runs_and_a_byte_less_is_refused(nets, shape, options):
    """The device ledger after every task has run (slots, scratch, gains, CUDA graphs) is what the device path needs:
    that budget runs every task (the manifest's floor does not refuse it), one byte less is a BudgetError."""
    packed = random_packed(nets["nf"], n_tasks=3, shape=shape, classes=(5, 3))
    x = np.ones((1, 1, 8, 8), np.float32)

    def run_all(budget: int | None) -> int:
        with TaskRuntime(packed, resident="device", cache_tasks=2, device_budget=budget, **options) as device:
            for t in range(3):
                device.infer(x, task=t)
            return device.device_ledger.used

    need = run_all(None)
    assert run_all(need) == need
    with pytest.raises(BudgetError):
        run_all(need - 1)
