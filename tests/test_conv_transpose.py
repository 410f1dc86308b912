"""Transposed convolutions (`nn.ConvTranspose2d`, the spec's ``conv_transpose``): from_torch against the module (torch
form and ONNX ConvTranspose) over strides, paddings, output paddings, groups, dilations and odd sides; an
``output_size`` call refused by name; malformed specs refused with typed errors; its channels pinned (compaction keeps
them, removes others) and its tensors kept per task by every method."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conv_transpose_nets import OutputSized, TinyUNet, unet_spec
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.spec import rowless_tensors
from edgecl.deltas import materialize
from edgecl.errors import UsageError
from edgecl.export import compact_task
from edgecl.train import registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext


class One(nn.Module):
    """A conv to `c` channels, one ConvTranspose2d of `kwargs`, a BatchNorm, the mean and a classifier."""

    def __init__(self, c: int = 4, out: int = 6, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.up = nn.ConvTranspose2d(c, out, **kwargs)
        self.bn = nn.BatchNorm2d(out)
        self.fc = nn.Linear(out, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.up(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 2, "stride": 2}, {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
    {"kernel_size": 4, "stride": 2, "padding": 1, "groups": 2, "bias": False},
    {"kernel_size": 3, "padding": 2, "dilation": 2}, {"kernel_size": 3, "stride": 3, "output_padding": 2},
    {"kernel_size": (3, 2), "stride": (2, 3), "padding": (1, 0), "output_padding": (1, 2)},
    {"kernel_size": 3, "stride": 3, "dilation": 2, "output_padding": 2},
    {"kernel_size": 5, "stride": 1, "padding": 2, "groups": 2}],
    ids=["k2s2", "k3s2_outpad", "k4s2_groups_nobias", "dilated", "s3_outpad2", "asymmetric", "dilation_outpad",
         "k5_same_groups"])
@pytest.mark.parametrize("side", [(5, 5), (4, 7)])
def test_parity_over_fields(kwargs, side):
    module = randomised_all(One(**kwargs))
    randomise_batchnorm(module)
    spec = from_torch(module, (1, *side))
    node = next(n for n in spec["nodes"] if n["op"] == "conv_transpose")
    assert node["name"] == "up" and node["in"] == 4 and node["out"] == 6
    check_parity(module, spec, (1, *side))


def test_unet_parity_and_depthwise_transpose():
    for shape in [(1, 8, 8), (3, 12, 12)]:
        module = randomised_all(TinyUNet(in_channels=shape[0]))
        randomise_batchnorm(module)
        check_parity(module, from_torch(module, shape), shape)
    module = randomised_all(One(c=6, kernel_size=4, stride=2, padding=1, groups=6))  # depthwise, LowFormer's
    randomise_batchnorm(module)
    check_parity(module, from_torch(module, (1, 6, 6)), (1, 6, 6))


def test_output_size_call_and_padding_mode_refused_by_name():
    assert_refused(OutputSized(), "'up'", "ConvTranspose2d", "output_size")
    # torch runs an output padding below a larger dilation; ONNX Runtime refuses one of at least the stride
    assert_refused(One(kernel_size=3, stride=2, dilation=3, output_padding=2), "'up'", "output_padding", "stride",
                   input_shape=(1, 5, 5))
    with pytest.raises(ValueError):  # torch itself refuses a non-zeros padding mode on ConvTranspose2d
        nn.ConvTranspose2d(2, 2, 3, padding_mode="reflect")


def _spec(**fields) -> dict:
    node = {"name": "up", "op": "conv_transpose", "inputs": ["input"], "in": 4, "out": 6, "k": 3, "stride": 2,
            **fields}
    return {"name": "t", "input_shape": [4, 5, 5], "nodes": [node, {"name": "f", "op": "flatten", "inputs": ["up"]}]}


@pytest.mark.parametrize("fields,words", [
    ({"output_padding": 2}, "output_padding"), ({"output_padding": [0, 2], "dilation": 3}, "output_padding"),
    ({"output_padding": -1}, "output_padding"), ({"groups": 4}, "groups=4"), ({"groups": 3}, "groups=3"),
    ({"in": 3}, "expects a (3"), ({"pad": 9}, "cuts the whole output"), ({"k": 0}, "k"),
    ({"stride": 1 << 20}, "elements per sample"), ({"k": 2048, "out": 128}, "column values"), ({"bias": 1}, "bias"),
    ({"window": [2, 2]}, "window"),
    ({"standardize": 1e-5}, "standardize")])
def test_malformed_specs_refused(fields, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        validate(_spec(**fields))


def test_spec_shapes_and_stored_form():
    arch = validate(_spec(pad=1, output_padding=1, groups=2, bias=False))
    assert arch["nodes"][0]["output_padding"] == [1, 1] and arch["feature_dim"] == 6 * 10 * 10
    assert rowless_tensors(arch) == ["up.weight"]
    arch = validate(_spec())
    assert arch["feature_dim"] == 6 * 11 * 11 and rowless_tensors(arch) == ["up.weight", "up.bias"]


def test_channels_pinned_and_compaction_keeps_them():
    """The input and output channels of a conv_transpose neither go nor move; a dead channel elsewhere goes."""
    arch = unet_spec()
    cm = channel_map(arch)
    for name in ("up2", "up1", "refine"):
        assert cm.spaces[name][0][0] in cm.pinned and cm.spaces[name][0][0] in cm.ordered
        assert f"{name}.weight" not in cm.rows and f"{name}.weight" not in cm.cols
    assert cm.spaces["down2_2"][0][0] in cm.pinned  # up2's input
    rng = np.random.default_rng(0)
    from edgecl.arch.spec import param_shapes
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(arch, 5).items()}
    params.update({k: np.abs(v) + 0.5 for k, v in params.items() if k.endswith("running_var")})
    for layer in ("down1.0", "down2.0"):  # channel 1 of each dead: its filter, bias, BatchNorm shift
        for k in (f"{layer}.weight", f"{layer}.bias"):
            params[k][1] = 0
        bn = layer.replace(".0", ".1")
        params[f"{bn}.bias"][1], params[f"{bn}.running_mean"][1] = 0, 0
    small, small_params, report = compact_task(arch, params, channel_multiple=1)
    nodes = {n["name"]: n for n in small["nodes"]}
    assert nodes["down1.0"]["out"] == 7 and nodes["down2.0"]["out"] == 16  # up2 reads down2's: kept
    assert nodes["up2"] == {n["name"]: n for n in arch["nodes"]}["up2"]
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    from torch_nets import spec_logits
    want = spec_logits(arch, params, torch.from_numpy(x))
    got = spec_logits(small, small_params, torch.from_numpy(x))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("method_name,kind", [("lps", "shared"), ("rgo", "task"), ("halrp", "task"),
                                              ("agscl", "task")])
def test_methods_keep_its_tensors_whole(method_name, kind):
    """No per-channel rule reads a (in, out/groups, kh, kw) weight: RGO, HALRP and AGS-CL store it per task (each
    task's own trained values: nothing projected, factored or node-masked); LPS as its other tensors outside its
    partitions (biases): learned on the first task, then frozen — shared, unchanged by the second."""
    stream = make_stream("split-digits", 2, seed=0)
    method = registry.create(method_name, unet_spec(), {} if method_name == "agscl" else {"epochs": 3})
    packs = []
    for t in range(2):
        method.learn_task(t, stream.tasks[t], TrainContext(progress=False))
        packs.append(method.pack())
    tensors = ("up2.weight", "up2.bias", "up1.weight", "refine.weight", "refine.bias")
    assert {packs[1].params[k]["kind"] for k in tensors} == {kind}
    first, second = (materialize(p, 0) for p in packs)
    assert all(np.array_equal(first[k], second[k]) for k in tensors)
    if kind == "task":  # the second task trained its own
        assert not all(np.array_equal(materialize(packs[1], 1)[k], first[k]) for k in tensors)


@pytest.mark.parametrize("method_name", ["rgo", "agscl"])
def test_runtime_switches_its_per_task_tensors(method_name, tmp_path):
    """Its per-task weight and bias bound per task in place (plain layout) and in per-task sessions: each task's
    logits are the training forward's of that task's materialised weights."""
    from edgecl import artifact
    from edgecl.runtime import TaskRuntime
    from edgecl.train.models import forward, from_numpy

    stream = make_stream("split-digits", 2, seed=0)
    method = registry.create(method_name, unet_spec(), {} if method_name == "agscl" else {"epochs": 1})
    for t in range(2):
        method.learn_task(t, stream.tasks[t], TrainContext(progress=False))
    packed = method.pack()
    path = tmp_path / "m.edgecl"
    artifact.save(packed, path)
    x = stream.tasks[0].x_test[:16]
    for strategy in ("inplace", "sessions"):
        with TaskRuntime(str(path), strategy=strategy) as rt:
            for t in (1, 0, 1):
                with torch.no_grad():
                    want = forward(packed.arch, from_numpy(materialize(packed, t)), torch.from_numpy(x)).numpy()
                got = rt.infer(x, task=t)
                assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), (strategy, t)
