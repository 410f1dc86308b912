"""Weight-standardised convolutions (timm's ScaledStdConv2d, NF-ResNet): the spec's ``standardize`` / ``gain_scale``
fields and ``gain`` tensor, the import of timm's layer with module parity (torch bit for bit, ONNX folded and
switchable), the stored form older readers read, folding before compaction, AGS-CL's cut that keeps a standardised
filter's function, and timm's nf_resnet26 (slow)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from layer_nets_nf import TinyNFNet, shared_model
from random_weights import random_params
from torch_nets import check_parity, classifier_of, randomised_parity, tensors_of

from edgecl.arch import from_torch, validate
from edgecl.arch.factories import build_module
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_shapes
from edgecl.arch.spec import param_shapes
from edgecl.deltas import materialize
from edgecl.errors import UsageError
from edgecl.export.onnx_export import run_onnx
from edgecl.graph.builder import build_onnx
from edgecl.graph.compact import compact_task
from edgecl.graph.standardize import cut_keeping_standardized, fold_standardized, standardized
from edgecl.runtime.plan import factor_forms
from edgecl.source import open_model
from edgecl.train.data import make_stream
from edgecl.train.methods.agscl import AGSCL, AGSCLConfig
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext

CONV = {"name": "c", "op": "conv", "inputs": ["input"], "in": 4, "out": 6, "k": [3, 3], "pad": [1, 1]}


def _spec(**fields) -> dict:
    return validate({"name": "s", "input_shape": [4, 6, 6], "nodes": [
        {**CONV, **fields}, {"name": "r", "op": "relu", "inputs": ["c"]}, {"name": "g", "op": "gap", "inputs": ["r"]},
        {"name": "f", "op": "flatten", "inputs": ["g"]}]})


def _onnx(model, x: np.ndarray, feeds: dict | None = None) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, **(feeds or {})})[0]


def test_timm_scaled_std_conv_goes_in_with_its_eps_and_scale_and_torch_is_bit_identical():
    torch.manual_seed(0)
    net = TinyNFNet().eval()
    spec = randomised_parity(net, (1, 8, 8))  # torch within 1e-5 and ONNX within 1e-4 of the module
    convs = {n["name"]: n for n in spec["nodes"] if n["op"] == "conv"}
    assert len(convs) == 8 and all(n["standardize"] == 1e-5 for n in convs.values())
    assert convs["block1.conv2"]["groups"] == 2 and convs["block1.conv2"]["gain_scale"] == net.block1.conv2.scale
    weights = {**tensors_of(net, spec), **classifier_of(net)}
    assert weights["stem.gain"].shape == (8,) and state_shapes(spec)["stem.gain"] == (8, 1, 1, 1)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(forward(spec, from_numpy(weights), x), net(x))  # timm's own F.batch_norm form


def test_fields_stored_form_and_refusals():
    plain, std = _spec(), _spec(standardize=1e-6)
    assert "standardize" not in plain["nodes"][0] and "c.gain" not in param_shapes(plain)  # as before the field
    assert std["nodes"][0]["gain_scale"] == 1.0 and param_shapes(std)["c.gain"] == (6,)
    assert stored_form(std)["nodes"][0]["standardize"] == 1e-6 and validate(stored_form(std)) == std
    assert stored_form(plain) == plain
    with pytest.raises(UsageError, match=r"node 0 \(c\): gain_scale needs standardize"):
        _spec(gain_scale=0.5)
    for eps in (0, 1.5, "x", True):
        with pytest.raises(UsageError, match="standardize"):
            _spec(standardize=eps)


@pytest.mark.parametrize("groups", [1, 2])
def test_folded_and_switchable_graphs_compute_torchs_standardisation(groups):
    """On a task's effective weight with cut columns (a node mask's zeros): the folded model is a plain conv (no
    gain, no statistics in the graph), the switchable one standardises its bound weight; both equal torch."""
    spec = _spec(standardize=1e-5, gain_scale=0.3, groups=groups)
    params = random_params(spec, 3, seed=groups)
    params["c.weight"][:, :1] = 0.0
    x = np.random.default_rng(0).standard_normal((5, 4, 6, 6)).astype(np.float32)
    with torch.no_grad():
        want = forward(spec, from_numpy(params), torch.from_numpy(x)).numpy()
    folded = build_onnx(spec, params)
    assert "c.gain" not in {t.name for t in folded.graph.initializer}
    assert not {n.op_type for n in folded.graph.node} & {"ReduceMean", "Sqrt"}
    switchable = build_onnx(spec, weights_as_inputs=True)
    assert np.abs(_onnx(folded, x) - want).max() <= 1e-5
    assert np.abs(_onnx(switchable, x, params) - want).max() <= 1e-5


def test_compaction_folds_first_since_cutting_columns_changes_a_filters_statistics():
    """A dead input channel of a standardised conv is not read (its value is 0), yet its weights count in the
    filter's mean and variance: compacting the unfolded filter would change the live outputs."""
    torch.manual_seed(0)
    net = TinyNFNet()
    spec = from_torch(net, (1, 8, 8))
    params = {**tensors_of(net, spec), **classifier_of(net)}
    params["stem.weight"][:3], params["stem.bias"][:3] = 0.0, 0.0  # three dead stem channels
    small_arch, small, report = compact_task(spec, params, channel_multiple=1)
    assert report.compacted and small["block1.conv1.weight"].shape[1] == 5
    assert not any(n.get("standardize") for n in small_arch["nodes"])
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    assert np.abs(_onnx(build_onnx(small_arch, small), x) - _onnx(build_onnx(spec, params), x)).max() <= 1e-5
    w, gain = params["block1.conv1.weight"], params["block1.conv1.gain"]  # why folding comes first:
    node = next(n for n in spec["nodes"] if n["name"] == "block1.conv1")
    unfolded_cut = standardized(w[:, 3:], gain, node["standardize"], node["gain_scale"])
    assert np.abs(unfolded_cut - standardized(w, gain, node["standardize"], node["gain_scale"])[:, 3:]).max() > 1e-2


def test_cut_keeping_standardized_moves_the_kept_entries_so_their_standardised_values_stay():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 18)) * 0.05).astype(np.float32)
    dead = rng.random((6, 18)) < 0.3
    dead[0] = False  # nothing to cut
    w[1, dead[1]] = 0.0  # cut already: nothing moves
    dead[2] = True  # all cut
    ones = np.ones(6, np.float32)
    before = standardized(w[:, :, None, None], ones, 1e-5, 1.0)[:, :, 0, 0]
    cut = cut_keeping_standardized(w, dead, 1e-5)
    after = standardized(cut[:, :, None, None], ones, 1e-5, 1.0)[:, :, 0, 0]
    assert (cut[dead] == 0).all() and np.array_equal(cut[:2], w[:2])
    assert np.abs(np.where(dead, 0.0, after - before)).max() <= 1e-6
    plain = standardized(np.where(dead, 0, w)[:, :, None, None], ones, 1e-5, 1.0)[:, :, 0, 0]
    assert np.abs(np.where(dead, 0.0, plain - before)).max() > 1e-2  # what a plain zeroing would change


def test_agscl_cut_leaves_the_trained_logits_and_standardised_convs_never_factor():
    """AGS-CL's (I.1) cut of a dead node's connections out of standardised readers: the deployed task-0 model
    computes what training ended with (a plain zeroing changes it); the runtime's factored forms leave them out."""
    arch = from_torch(TinyNFNet(in_channels=3, width=16), (3, 8, 8))
    task = make_stream("permuted-digits", 1, 0, (3, 8, 8)).tasks[0]
    method = AGSCL(arch, AGSCLConfig(epochs=3, lasso="adam", mu_adam=0.01))
    seen = {}
    cut = method._zero_from_dead

    def spy(alive, head, trunk):  # the trunk a cut writes: a copy of the trained one (the faithfulness check)
        seen["trunk"], seen["head"] = {k: v.clone() for k, v in trunk.items()}, dict(head)
        seen["dead"] = alive
        cut(alive, head, trunk)

    method._zero_from_dead = spy
    method.learn_task(0, task, TrainContext(progress=False))
    x = torch.from_numpy(task.x_test)
    packed = method.pack()
    with torch.no_grad():
        trained = forward(arch, {**seen["trunk"], **seen["head"]}, x)
        deployed = forward(arch, from_numpy(materialize(packed, 0)), x)
        zeroed = {k: v.clone() for k, v in seen["trunk"].items()}
        for weight, cols in method.nodes.cols.items():
            dead = torch.from_numpy(~np.append(seen["dead"], True)[cols])[:, :, None]
            zeroed[weight].view(zeroed[weight].shape[0], zeroed[weight].shape[1], -1).masked_fill_(dead, 0)
        plain = forward(arch, {**zeroed, **seen["head"]}, x)
    assert float((trained - deployed).abs().max()) <= 1e-5
    assert float((trained - plain).abs().max()) > 1e-4
    assert factor_forms(open_model(packed)) == {}  # node masks on standardised convs are folded per switch
    small_arch, small = fold_standardized(arch, materialize(packed, 0))
    assert np.abs(_onnx(build_onnx(small_arch, small), task.x_test) - deployed.numpy()).max() <= 1e-4


@pytest.mark.parametrize("stride,padded", [(2, True), (1, False)])
def test_scaled_std_conv_same_pads_as_tensorflow_when_its_padding_is_dynamic(stride, padded):
    """DeepMind's NFNets' ScaledStdConv2dSame: at stride 2 on an 8×8 map "same" pads one row and column, at the
    bottom and right (a ``pad`` node before the standardised conv); at stride 1 its padding is static, its own."""
    from timm.layers import ScaledStdConv2dSame

    conv = ScaledStdConv2dSame(2, 4, 3, stride=stride, gain_init=0.7)
    assert conv.same_pad == padded
    side = 8 // stride
    net = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * side * side, 3))
    spec = randomised_parity(net, (2, 8, 8))
    node = next(n for n in spec["nodes"] if n["op"] == "conv")
    assert node["standardize"] == conv.eps and node["gain_scale"] == conv.scale
    assert [n["op"] for n in spec["nodes"]].count("pad") == int(padded)


@pytest.mark.slow
def test_nf_resnet26_has_module_parity_with_random_gains():
    """timm builds each block's last gain at 0 (the branch off); random gains check every standardised conv."""
    torch.manual_seed(0)
    net = build_module("timm:nf_resnet26").eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".gain"):
                p.copy_(torch.rand(p.shape) + 0.5)
    spec = from_torch(net, (3, 64, 64))
    assert sum(bool(n.get("standardize")) for n in spec["nodes"]) == 29
    check_parity(net, spec, (3, 64, 64), batch=2)


def test_an_eps_below_float32s_smallest_normal_is_refused_and_the_smallest_kept_one_runs_finite():
    """The switchable graph adds eps in float32: 1e-50 is 0 there, so a zero filter (a masked or cut row) is 0/0 and
    the runtime's logits NaN while torch and the folded model give numbers (measured before the rule: NaN on every
    input, reported as an input overflowing float32). The smallest eps kept runs finite in both graphs."""
    tiny = float(np.finfo(np.float32).tiny)
    with pytest.raises(UsageError, match=r"node 0 \(c\).*standardize.*float32"):
        _spec(standardize=1e-50)
    spec = _spec(standardize=tiny)
    params = random_params(spec, 3, seed=0)
    params["c.weight"][0] = 0.0  # a dead filter
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    switchable = _onnx(build_onnx(spec, weights_as_inputs=True), x, params)
    folded = _onnx(build_onnx(spec, params), x)
    assert np.isfinite(switchable).all() and np.abs(switchable - folded).max() <= 1e-5


def test_gains_that_overflow_the_standardised_weight_are_refused_naming_the_conv(tmp_path):
    """Finite gains times gain_scale can overflow float32 once multiplied by a standardised filter's values (up to
    √n): export wrote a model with inf weights before (and the runtime blamed the input); now each path names the
    conv."""
    from edgecl import artifact
    from edgecl.export import export_onnx
    from edgecl.runtime import TaskRuntime

    spec = _spec(standardize=1e-5)
    params = random_params(spec, 3, seed=0)
    params["c.gain"] = np.full(6, 3e38, np.float32)
    with pytest.raises(UsageError, match=r"architecture node 'c': its standardised weight overflows float32"):
        fold_standardized(spec, params)
    path = tmp_path / "m.edgecl"
    artifact.save(shared_model(spec, params), path)
    with pytest.raises(UsageError, match="node 'c'"):
        export_onnx(path, tmp_path / "onnx", progress=False)
    for strategy in ("inplace", "sessions"):
        with pytest.raises(UsageError, match="node 'c'"):
            with TaskRuntime(str(path), strategy=strategy, factor=False) as rt:
                rt.infer(np.ones((1, 4, 6, 6), np.float32), task=0)


def test_a_filter_of_one_weight_standardises_to_zero_in_torch_numpy_and_onnx():
    """A depthwise 1×1 standardised conv: each filter is one weight, which centring leaves 0 (torch's batch_norm
    refuses a single value, so the torch form says 0 itself): torch forward = the switchable ONNX graph = the
    folded one, every output the bias (found by the hostile-spec fuzzer: a ValueError from torch before)."""
    spec = _spec(standardize=1e-5, k=1, groups=4, out=4, pad=0)
    params = random_params(spec, 3, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    with torch.no_grad():
        want = forward(spec, from_numpy(params), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(build_onnx(spec, params), x), want, rtol=1e-5, atol=1e-6)
    assert float(np.abs(standardized(params["c.weight"], params["c.gain"], 1e-5, 1.0)).max()) == 0.0
