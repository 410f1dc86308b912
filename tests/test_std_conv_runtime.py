"""The in-place runtime standardises NF-ResNet's weight-standardised convs when a task's weights are written (a
slot's fill, or once for weights a task owns), not in every call's graph (`edgecl.runtime.switch_standardize`):
before, each call recomputed every filter's statistics (nf_resnet26, 64×64, one thread: 55.9 ms a call against 12.5
folded) and ONNX Runtime held ~100 MB the budget did not count (tools/bench_std_conv.py). Across switches the
runtime still computes what torch trains, for weights masked (LPS), owned per task (STL) and read on a miss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets_nf import nf_spec, shared_model, std_spec

from edgecl import artifact
from edgecl.arch import param_shapes, validate
from edgecl.deltas import materialize
from edgecl.graph.standardize import CHUNK_ELEMENTS, standardized
from edgecl.runtime import TaskRuntime
from edgecl.runtime.plan import TensorPlan
from edgecl.runtime.switch_standardize import SwitchStandardized
from edgecl.train import registry
from edgecl.train.data import make_stream
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext


@pytest.fixture(scope="module")
def stream():
    return make_stream("split-digits", 2, seed=0)


@pytest.mark.parametrize("method_name,task_tensors,net", [("lps", "auto", nf_spec), ("stl", "resident", nf_spec),
                                                        ("stl", "cached", nf_spec), ("lps", "auto", std_spec),
                                                        ("stl", "resident", std_spec)])
def test_runtime_standardises_on_the_switch_and_equals_torch_across_switches(method_name, task_tensors, net, stream,
                                                                               tmp_path):
    """NF-ResNet's gained convs, and BiT's StdConv2d without gain next to NFNet's skipinit gain (`std_spec`)."""
    arch = net()
    method = registry.create(method_name, arch, {"epochs": 1})
    for t in range(2):
        method.learn_task(t, stream.tasks[t], TrainContext(progress=False))
    packed = method.pack()
    path = tmp_path / "nf.edgecl"
    artifact.save(packed, path)
    want = {}
    with torch.no_grad():
        for t in range(2):
            x = torch.from_numpy(stream.tasks[t].x_test)
            want[t] = forward(arch, from_numpy(materialize(packed, t)), x).numpy()
    with TaskRuntime(str(path), strategy="inplace", cache_tasks=1, task_tensors=task_tensors) as rt:
        inputs = {i.name for i in rt._strategy._session.get_inputs()}
        assert not any(name.endswith(".gain") for name in inputs)  # the graph standardises nothing per call
        assert not rt._strategy.graph_ops & {"ReduceMean", "Sqrt", "Div"}
        for t in (0, 1, 0, 1):  # one slot: every call a miss, so every call's weights were written and standardised
            assert np.abs(rt.infer(stream.tasks[t].x_test, task=t) - want[t]).max() <= 1e-5


def test_standardising_in_row_chunks_gives_the_exported_models_numbers_bit_for_bit():
    """A conv larger than one chunk is standardised chunk by chunk, in place into its slot: the numbers of the whole
    filter bank at once in float64, which a per-task session's and an exported file's fold has too."""
    spec = validate({"name": "s", "input_shape": [64, 4, 4], "nodes": [
        {"name": "c", "op": "conv", "inputs": ["input"], "in": 64, "out": 256, "k": 3, "pad": 1, "standardize": 1e-5,
         "gain_scale": 0.2}, {"name": "g", "op": "gap", "inputs": ["c"]}, {"name": "f", "op": "flatten",
                                                                           "inputs": ["g"]}]})
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 64, 3, 3)) * 0.05).astype(np.float32)
    gain = (rng.random(256) + 0.5).astype(np.float32)
    assert w[0].size * 256 > 2 * CHUNK_ELEMENTS
    plans = [TensorPlan("c.weight", "masked", w.shape, w), TensorPlan("c.gain", "static", gain.shape, gain)]
    std = SwitchStandardized(spec, plans)
    assert std.written == ["c"] and std.unread == {"c.gain"} and "standardize" not in std.arch["nodes"][0]
    slot = {"c.weight": w.copy()}
    std.after_fill(slot, lambda name: gain)
    rows = w.reshape(256, -1).astype(np.float64)
    centred = rows - rows.mean(axis=1, keepdims=True)
    var = (centred ** 2).mean(axis=1, keepdims=True)
    whole = gain[:, None].astype(np.float64) * 0.2 * centred / np.sqrt(var + 1e-5)
    assert np.array_equal(slot["c.weight"], whole.reshape(w.shape).astype(np.float32))
    assert np.array_equal(standardized(w, gain, 1e-5, 0.2), slot["c.weight"])


@pytest.mark.parametrize("factor", [False, True])
def test_a_shared_standardised_conv_is_standardised_once_or_folded_by_onnx_runtime(factor):
    """A trunk every task shares (finetune): unfactored, its weights are inputs bound once, standardised once at
    start-up (in the graph before: every call, 55.0 ms against 11.0 folded on nf_resnet26); factored, constants
    whose standardisation ONNX Runtime folds. Either way the runtime computes torch's logits."""
    arch = nf_spec()
    rng = np.random.default_rng(0)
    params = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in param_shapes(arch, 3).items()}
    packed = shared_model(arch, params, n_tasks=2)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = forward(arch, from_numpy(params), torch.from_numpy(x)).numpy()
    with TaskRuntime(packed, strategy="inplace", factor=factor) as rt:
        assert factor or not rt._strategy.graph_ops & {"ReduceMean", "Sqrt", "Div"}
        for t in (0, 1):
            assert np.abs(rt.infer(x, task=t) - want).max() <= 1e-5
