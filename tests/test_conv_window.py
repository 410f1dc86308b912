"""A conv with ``window`` (EfficientViT-MSRA's depthwise conv on q over several windows): each window of the map on its
own with zeros at every window's border, in the torch forward and the ONNX graph, against a conv cut window by window
by hand; its validation and stored form; RGO's curvature vectors of such a conv (one per sample, its windows'
patches); every method on it is covered by tests/test_methods_on_graphs.py and tests/test_agscl_graphs.py
(``efficientvit_msra_windows``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_nets_vit import efficientvit_msra_windows_spec
from random_weights import random_params
from torch_nets import spec_logits

from edgecl.arch.later_fields import stored_form
from edgecl.arch.spec import validate
from edgecl.deltas import materialize
from edgecl.errors import UsageError
from edgecl.train import registry
from edgecl.train.data import make_stream
from edgecl.train.methods.rgo_ops import conv_patches
from edgecl.train.protocol import TrainContext


def _spec(conv: dict, shape=(4, 6, 9)) -> dict:
    node = {"name": "c", "op": "conv", "inputs": ["input"], "in": shape[0], "out": 4, "k": 3, "pad": 1, **conv}
    return {"name": "t", "input_shape": list(shape), "nodes": [node, {"name": "f", "op": "flatten", "inputs": ["c"]}]}


def _by_hand(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, window: list[int], **conv) -> torch.Tensor:
    """F.conv2d on each window's slice, the outputs put side by side."""
    wh, ww = window
    rows = [torch.cat([F.conv2d(x[:, :, i:i + wh, j:j + ww], w, b, **conv) for j in range(0, x.shape[3], ww)], 3)
            for i in range(0, x.shape[2], wh)]
    return torch.cat(rows, 2)


@pytest.mark.parametrize("conv", [{"window": [3, 3], "groups": 4}, {"window": [2, 3]},
                                  {"window": [3, 9], "stride": 2, "groups": 2}, {"window": [6, 3], "dilation": 2,
                                                                                 "pad": 2}])
def test_each_window_on_its_own_in_torch_and_onnx(conv):
    spec = validate(_spec(conv))
    weights = random_params(spec, seed=1)
    x = torch.randn(2, 4, 6, 9, generator=torch.Generator().manual_seed(0))
    got = spec_logits(spec, weights, x)  # also the ONNX graph within 1e-4
    w, b = (torch.from_numpy(weights[f"c.{k}"]) for k in ("weight", "bias"))
    fields = {k: v for k, v in spec["nodes"][0].items() if k in ("stride", "dilation", "groups")}
    head = [torch.from_numpy(weights[f"head.{k}"]) for k in ("weight", "bias")]
    want = F.linear(_by_hand(x, w, b, conv["window"], padding=spec["nodes"][0]["pad"], **fields).flatten(1), *head)
    assert np.abs(got - want.numpy()).max() <= 1e-5 * max(1.0, float(want.abs().max()))
    whole = F.conv2d(x, w, b, padding=spec["nodes"][0]["pad"], **fields).flatten(1)  # over the whole map
    if whole.shape[1] == head[0].shape[1]:  # a stride within windows of odd side gives another size
        assert np.abs(got - F.linear(whole, *head).numpy()).max() > 1e-3  # the windows' borders differ


def test_window_is_stored_only_where_given():
    assert "window" not in stored_form(validate(_spec({})))["nodes"][0]  # older readers see the spec as before
    windowed = stored_form(validate(_spec({"window": [3, 3]})))
    assert windowed["nodes"][0]["window"] == [3, 3] and validate(windowed) == validate(_spec({"window": [3, 3]}))
    assert validate(_spec({"window": 3}))["nodes"][0]["window"] == [3, 3]


@pytest.mark.parametrize("conv, words", [
    ({"window": [4, 3]}, "conv window \\[4, 3\\] does not tile the 6×9 map"),
    ({"window": [3, 2]}, "does not tile"),
    ({"window": [2, 3], "k": 5, "pad": 0}, "kernel \\[5, 5\\] does not fit the conv window \\[2, 3\\]"),
    ({"window": [0, 3]}, "window"),
    ({"window": [3, 3, 3]}, "window"),
])
def test_bad_windows_are_refused(conv, words):
    with pytest.raises(UsageError, match=words):
        validate(_spec(conv))


def test_rgo_vectors_of_a_windowed_conv_are_one_per_sample():
    """A windowed conv's input reaches F.conv2d as (samples·windows, C, wh, ww): with `samples` its patches are each
    sample's, all windows together (the mean variant: one row per sample, its windows' mean patch)."""
    x = torch.randn(2 * 4, 3, 3, 3, generator=torch.Generator().manual_seed(0))  # 2 samples of 4 windows
    rows = conv_patches(x, (3, 1, 3, 3), 1, 1, mean=False, groups=3, samples=2)
    mean = conv_patches(x, (3, 1, 3, 3), 1, 1, mean=True, groups=3, samples=2)
    patches = F.unfold(x, 3, padding=1).reshape(2, 4, 3, 9, 9)  # sample, window, channel, tap, position
    for s in range(2):
        for g in range(3):
            own = patches[s, :, g].permute(0, 2, 1).reshape(-1, 9)  # every patch of the sample's windows
            part = rows[g, s * 36:(s + 1) * 36]
            torch.testing.assert_close(part.T @ part, own.T @ own / 36, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mean[g, s], own.mean(0))


@pytest.mark.parametrize("config", [{"weight_vectors": "backprop"}, {"conv_vectors": "mean"}])
def test_rgo_learns_a_network_with_windowed_convs(config):
    """Before: ∂f_y/∂b of a windowed conv had a row per window, the scale one per sample (a shape error)."""
    stream = make_stream("permuted-digits", 2, 0, (3, 8, 8))
    method = registry.create("rgo", efficientvit_msra_windows_spec((3, 8, 8)), {"epochs": 1, "lr": 0.01, **config})
    for t in range(2):
        method.learn_task(t, stream.tasks[t], TrainContext(progress=False))
    conv = "mixer.attn.dws.0.conv.weight"
    p = method.proj[conv].normalized()
    assert not torch.allclose(p, torch.eye(p.shape[-1], dtype=p.dtype).expand_as(p))  # task 0's patches went in
    assert all(np.isfinite(v).all() for v in materialize(method.pack(), 1).values())


def _windowed_net() -> dict:
    """A stem, a plain conv in 4×4 windows (HALRP's low-rank branch: its window sums inside each window) and a
    depthwise one in 2×2 windows (RGO's permuted rows), on 8×8 digits."""
    conv = {"op": "conv", "k": 3, "pad": 1}
    nodes = [{"name": "stem", **conv, "inputs": ["input"], "in": 1, "out": 8},
             {"name": "r0", "op": "relu", "inputs": ["stem"]},
             {"name": "plain", **conv, "inputs": ["r0"], "in": 8, "out": 8, "window": [4, 4]},
             {"name": "r1", "op": "relu", "inputs": ["plain"]},
             {"name": "dw", **conv, "inputs": ["r1"], "in": 8, "out": 8, "groups": 8, "window": [2, 2]},
             {"name": "r2", "op": "relu", "inputs": ["dw"]},
             {"name": "gap", "op": "gap", "inputs": ["r2"]}, {"name": "f", "op": "flatten", "inputs": ["gap"]}]
    return validate({"name": "windowed", "input_shape": [1, 8, 8], "nodes": nodes})


@pytest.mark.parametrize("method_name", ["halrp", "rgo"])
def test_factored_runtime_equals_the_exported_graph(method_name, monkeypatch):
    """Every layer factored (low rank, permuted rows) inside the windows: the runtime gives each task's exported
    logits."""
    import onnxruntime as ort

    from edgecl.graph.builder import build_onnx
    from edgecl.runtime import TaskRuntime
    from edgecl.runtime import plan as plan_module

    stream = make_stream("split-digits", 2, seed=0)
    method = registry.create(method_name, _windowed_net(), {"epochs": 2})
    for t in range(2):
        method.learn_task(t, stream.tasks[t], TrainContext(progress=False))
    packed = method.pack()
    monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", 0)
    chosen = []
    forms = plan_module.factor_forms
    monkeypatch.setattr(plan_module, "factor_forms", lambda *a, **k: chosen.append(forms(*a, **k)) or chosen[-1])
    x = stream.tasks[0].x_test[:64]
    with TaskRuntime(packed) as rt:
        for t in range(2):
            graph = build_onnx(packed.arch, materialize(packed, t)).SerializeToString()
            want = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            assert np.abs(rt.infer(x, task=t) - want).max() <= 1e-4
    assert chosen and chosen[-1].get("plain") == {"halrp": "lowrank", "rgo": "permute+bias"}[method_name]


def test_random_windows_match_a_conv_cut_by_hand():
    """Non-square maps and windows, strides that do not divide the window, dilation, groups, padding wider than the
    kernel, batch 1 and 2: torch and ONNX give the conv cut window by window; a window the size of the map is the
    plain conv, a 1×1 window of a 1×1 kernel a per-position product (held on the current code)."""
    rng, checked = np.random.default_rng(0), 0
    for trial in range(60):
        (wh, ww), (nh, nw) = rng.integers(1, 6, 2).tolist(), rng.integers(1, 4, 2).tolist()
        fields = {"k": rng.integers(1, 5, 2).tolist(), "stride": rng.integers(1, 4, 2).tolist(),
                  "pad": rng.integers(0, 4, 2).tolist(), "dilation": rng.integers(1, 3, 2).tolist(),
                  "groups": int(rng.choice([1, 2, 4])), "window": [wh, ww]}
        try:
            spec = validate(_spec(fields, (4, nh * wh, nw * ww)))
        except UsageError:  # the kernel does not fit the window
            continue
        weights = random_params(spec, seed=trial)
        x = torch.randn(1 + trial % 2, 4, nh * wh, nw * ww, generator=torch.Generator().manual_seed(trial))
        w, b = (torch.from_numpy(weights[f"c.{k}"]) for k in ("weight", "bias"))
        conv = {"stride": fields["stride"], "padding": fields["pad"], "dilation": fields["dilation"],
                "groups": fields["groups"]}
        head = [torch.from_numpy(weights[f"head.{k}"]) for k in ("weight", "bias")]
        want = F.linear(_by_hand(x, w, b, [wh, ww], **conv).flatten(1), *head)
        assert np.abs(spec_logits(spec, weights, x) - want.numpy()).max() <= 1e-5 * max(1.0, float(want.abs().max()))
        checked += 1
    assert checked >= 30
    x = torch.randn(2, 4, 6, 9, generator=torch.Generator().manual_seed(1))
    for fields, window in (({"stride": 2, "dilation": [2, 1], "pad": 2, "groups": 2}, [6, 9]),
                           ({"k": 1, "pad": 0}, [1, 1])):
        weights = random_params(validate(_spec(fields)), seed=2)
        assert np.abs(spec_logits(validate(_spec({**fields, "window": window})), weights, x) -
                      spec_logits(validate(_spec(fields)), weights, x)).max() <= 1e-5


@pytest.mark.parametrize("pad, k, stride, kept", [(1, 3, 1, 5), (0, 3, 1, 4), (0, 1, 2, 4), (1, 3, 2, 5)])
def test_compaction_folds_a_constant_through_a_windowed_conv_only_without_padding(pad, k, stride, kept):
    """A constant channel (0.7) read by a windowed conv: padded, every window's border sees zeros, so the channel
    stays; unpadded, it folds into the conv's bias; the compacted graph's logits are the dense one's (held)."""
    from edgecl.export import compact_task
    from edgecl.export.onnx_export import run_onnx
    from edgecl.graph.builder import build_onnx

    nodes = [{"name": "c1", "op": "conv", "inputs": ["input"], "in": 2, "out": 6, "k": 3, "pad": 1},
             {"name": "r", "op": "relu", "inputs": ["c1"]},
             {"name": "c2", "op": "conv", "inputs": ["r"], "in": 6, "out": 6, "k": k, "pad": pad, "stride": stride,
              "window": [4, 3]},
             {"name": "dw", "op": "conv", "inputs": ["c2"], "in": 6, "out": 6, "k": 3, "pad": 1, "groups": 6,
              "window": [1, 1] if stride == 2 else [2, 2]},
             {"name": "f", "op": "flatten", "inputs": ["dw"]}]
    arch = validate({"name": "w", "input_shape": [2, 12, 12], "nodes": nodes})
    p = random_params(arch, 3)
    p["c1.weight"][0], p["c1.bias"][0] = 0, 0.7  # constant 0.7 into c2
    p["c1.weight"][1], p["c1.bias"][1] = 0, -0.3  # ReLU makes it 0: goes
    p["dw.weight"][4] = 0  # c2's channel 4 reaches the logits as dw's bias only: folds
    c_arch, c_params, report = compact_task(arch, p, channel_multiple=1)
    assert report.layers["c1"] == [6, kept] and report.layers["c2"] == [6, 5]
    assert [n.get("window") for n in c_arch["nodes"][2:4]] == [[4, 3], nodes[3]["window"]]
    x = np.random.default_rng(0).random((4, 2, 12, 12), dtype=np.float32)
    dense, small = run_onnx(build_onnx(arch, p), x), run_onnx(build_onnx(c_arch, c_params), x)
    assert np.abs(dense - small).max() <= 1e-4 * max(1.0, np.abs(dense).max())
