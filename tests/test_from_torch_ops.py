"""The forms a first-time user writes: functional pooling (positional or keyword arguments, as the module forms),
arithmetic with Python numbers, tensor subtraction and in-place sums, spatial amax, the PyTorch MNIST example
(F.max_pool2d, F.dropout, a final log_softmax) end to end through training and the runtime; refusals name op, fx
node, module path and source line; `path/net.py:factory` imports the files beside it."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.arch.factories import resolve_arch
from edgecl.deltas import materialize
from edgecl.errors import UsageError
from edgecl.runtime import TaskRuntime
from edgecl.train import registry
from edgecl.train.data import make_stream
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext
from torch_nets import check_parity, randomise_batchnorm


class MnistNet(nn.Module):
    """pytorch/examples mnist/main.py's `Net`, verbatim."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class Probe(nn.Module):
    """conv + BatchNorm, then `body(x)` (a (8, 8, 8) map in, a map — or with `flat` a vector — out), then a
    classifier."""

    def __init__(self, body, flat: bool = False):
        super().__init__()
        self.conv, self.bn, self.body, self.flat = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), body, flat
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.body(self.bn(self.conv(x)))
        return self.fc(y if self.flat else y.mean((2, 3)))


def _iadd(y):
    z = torch.sigmoid(y)
    z += y  # fx records operator.add (or iadd)
    z *= y
    return z


def _add_(y):
    return y.mul(2.0).add_(1).sub(y.tanh()).div_(4)


BODIES = {
    "F.max_pool2d(x, 2)": lambda y: F.max_pool2d(y, 2),
    "F.max_pool2d keywords": lambda y: F.max_pool2d(y, kernel_size=3, stride=2, padding=1),
    "F.max_pool2d positional, dilation, ceil_mode": lambda y: F.max_pool2d(y, 3, 2, 1, 2, True),
    "F.avg_pool2d(x, 2)": lambda y: F.avg_pool2d(y, 2),
    "F.avg_pool2d keywords": lambda y: F.avg_pool2d(y, kernel_size=3, stride=1, padding=1, count_include_pad=False),
    "F.adaptive_avg_pool2d(x, 2)": lambda y: F.adaptive_avg_pool2d(y, 2),
    "F.adaptive_max_pool2d(x, 1)": lambda y: F.adaptive_max_pool2d(y, 1),
    "F.adaptive_max_pool2d((2, None))": lambda y: F.adaptive_max_pool2d(y, output_size=(2, None)),
    "nn.AdaptiveMaxPool2d(4)": nn.AdaptiveMaxPool2d(4),
    "torch.amax keepdim": lambda y: y * torch.amax(y, (2, 3), keepdim=True),
    "x.amax(dim)": lambda y: y.amax(dim=(-1, -2)),
    "x * 0.5 + 1.0": lambda y: y * 0.5 + 1.0,
    "1.0 - x, 2 * x, -x, x / 4": lambda y: (1.0 - y) + 2 * y - y / 4 + (-y),
    "torch.add/mul/sub with numbers": lambda y: torch.sub(torch.mul(torch.add(y, 1.5), 3), other=0.25),
    "x - y of tensors": lambda y: y - torch.sigmoid(y),
    "in-place += *=": _iadd,
    "methods mul add_ sub div_": _add_,
    "nn.LeakyReLU(0.2)": nn.LeakyReLU(0.2),
    "F.leaky_relu(x, 0.1), keyword and default": lambda y: F.leaky_relu(F.leaky_relu(y, 0.1), negative_slope=0.3)
    + F.leaky_relu(y),
    "x[:, :4], x[:, 4:]": lambda y: torch.cat([y[:, :4], torch.sigmoid(y[:, 4:])], 1),
    "x[:, a:b, ...], x[:, -3:, :, :], a bound from x.shape": lambda y: torch.cat(
        [y[:, 1:3, ...], y[:, -3:, :, :], y[:, :y.shape[1] // 4] * 2, y[:, y.shape[1] - 1:]], 1),
    "F.interpolate(x, scale_factor=2) then avg_pool2d": lambda y: F.avg_pool2d(F.interpolate(y, scale_factor=2), 2),
    "nn.Upsample, nn.UpsamplingNearest2d, a max pool back": nn.Sequential(
        nn.Upsample(scale_factor=(2, 3)), nn.UpsamplingNearest2d(scale_factor=2), nn.MaxPool2d((4, 6))),
    "adaptive pooling to a multiple of the input (repeats each value)": lambda y: y + F.adaptive_avg_pool2d(
        F.avg_pool2d(y, 4), 8),
    "x[:, x.shape[1] // 2:7]: a computed start": lambda y: torch.cat([y[:, y.shape[1] // 2:7], y[:, :5]], 1),
    "split with sizes, parts reordered": lambda y: torch.cat(torch.split(y, [3, 5], dim=1)[::-1], 1),
    "torch.cat(x.split(3, 1)): a smaller last part": lambda y: torch.cat(y.split(3, 1), 1).relu(),
    "x.split(3, 1)[i]": lambda y: torch.cat([y.split(3, 1)[i].relu() for i in range(3)], 1),
    "a, b = x.chunk(2, dim=1); a + b, a[:, :2], b[:, 2:]": lambda y: _halves(y),
}


def _halves(y):
    a, b = y.chunk(2, dim=1)
    return torch.cat([a + b, a[:, :2], b[:, 2:]], 1)


class _DropPathResidual(nn.Module):
    """y + drop(sigmoid(y)) with torchvision's StochasticDepth or timm's DropPath: identities at inference."""

    def __init__(self, library: str):
        super().__init__()
        if library == "timm":
            from timm.layers import DropPath

            self.drop = DropPath(0.5)
        else:
            from edgecl.arch.factories import ensure_torchvision_imports

            ensure_torchvision_imports()
            from torchvision.ops import StochasticDepth

            self.drop = StochasticDepth(0.5, "row")

    def forward(self, y):
        return y + self.drop(torch.sigmoid(y))


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_stochastic_depth_and_drop_path_are_dropped(library):
    torch.manual_seed(0)
    module = Probe(_DropPathResidual(library)).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    assert [n["op"] for n in spec["nodes"]][2:5] == ["sigmoid", "add", "gap"]
    check_parity(module, spec, (3, 8, 8))


@pytest.mark.parametrize("name, shape", [("torchvision.models:efficientnet_b0", (3, 32, 32)),
                                         ("timm:darknet17", (3, 32, 32)), ("timm:mixnet_s", (3, 32, 32)),
                                         ("timm:rexnet_100", (3, 32, 32)), ("timm:cs3darknet_s", (3, 32, 32)),
                                         ("timm:hrnet_w18_small", (3, 32, 32))])
def test_library_models_with_stochastic_depth_leaky_relu_or_slices_match_the_module(name, shape):
    """efficientnet_b0: StochasticDepth in every block (dropped: identity at inference); darknet17: LeakyReLU
    inside timm's BatchNormAct2d; mixnet_s (torch.split into kernel sizes), rexnet_100 (x[:, :c] + shortcut) and
    cs3darknet_s (x.split in CSP stages): channel slices, which the channel map follows; hrnet_w18_small: nearest
    upsampling (nn.Upsample) in its fuse layers."""
    from edgecl.arch.factories import build_module

    torch.manual_seed(0)
    module = build_module(name).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, shape)
    assert any(n["op"] == "leaky_relu" for n in spec["nodes"]) == (name == "timm:darknet17")
    assert any(n["op"] == "slice" for n in spec["nodes"]) == (name in ("timm:mixnet_s", "timm:rexnet_100",
                                                                       "timm:cs3darknet_s"))
    check_parity(module, spec, shape, batch=2)
    channel_map(spec)  # every channel followed: node masks, FEL and compaction work on it


@pytest.mark.parametrize("form", list(BODIES))
def test_functional_pooling_and_arithmetic_match_the_module(form):
    torch.manual_seed(0)
    module = Probe(BODIES[form], flat="dim)" in form).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    check_parity(module, spec, (3, 8, 8))


def test_functional_and_module_pooling_give_the_same_node():
    def pool_node(body):
        spec = from_torch(Probe(body), (3, 8, 8))
        node = next(n for n in spec["nodes"] if n["op"] in ("maxpool", "avgpool"))
        return {k: v for k, v in node.items() if k not in ("name", "inputs")}

    assert pool_node(nn.MaxPool2d(3, 2, 1)) == pool_node(lambda y: F.max_pool2d(y, 3, 2, 1)) == \
        pool_node(lambda y: F.max_pool2d(y, kernel_size=3, stride=2, padding=1))
    assert pool_node(nn.AvgPool2d(2)) == pool_node(lambda y: F.avg_pool2d(y, 2)) == \
        pool_node(lambda y: F.avg_pool2d(y, kernel_size=2, stride=None))
    assert pool_node(nn.AdaptiveAvgPool2d(4)) == pool_node(lambda y: F.adaptive_avg_pool2d(y, (4, 4)))


def test_scalar_arithmetic_is_one_scale_node():
    spec = from_torch(Probe(lambda y: 1.0 - y / 4), (3, 8, 8))
    scales = [(n["factor"], n["offset"]) for n in spec["nodes"] if n["op"] == "scale"]
    assert scales == [(0.25, 0.0), (-1.0, 1.0)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "2", 1e39])
def test_scale_constants_must_be_finite_float32_numbers(bad):
    node = {"name": "s", "op": "scale", "inputs": ["input"], "factor": bad}
    with pytest.raises(UsageError, match="factor .* must be a finite number"):
        validate({"input_shape": [4], "nodes": [node]})
    assert validate({"input_shape": [4], "nodes": [{**node, "factor": 2}]})["nodes"][0] == {**node, "factor": 2.0,
                                                                                          "offset": 0.0}


def test_the_pytorch_mnist_example_imports_trains_and_deploys(tmp_path):
    """The final log_softmax is dropped: edgecl's heads give logits and train with cross-entropy (which is
    log_softmax + NLL, and log_softmax of log-probabilities changes nothing), and the argmax is the same."""
    torch.manual_seed(0)
    module = MnistNet().eval()
    spec = from_torch(module, (1, 28, 28))
    assert [n["op"] for n in spec["nodes"]] == ["conv", "relu", "conv", "relu", "maxpool", "flatten", "linear", "relu"]
    assert node_by_name(spec)["max_pool2d"]["k"] == [2, 2] and node_by_name(spec)["max_pool2d"]["stride"] == [2, 2]
    check_parity(module, spec, (1, 28, 28), post=lambda logits: F.log_softmax(logits, dim=1), batch=2)

    stream = make_stream("split-digits", 1, seed=0, input_shape=(1, 28, 28))
    method = registry.create("finetune", spec, {"epochs": 2})
    method.learn_task(0, stream.tasks[0], TrainContext(progress=False))
    packed = method.pack()
    task = stream.tasks[0]
    x = task.x_test[:64]
    with torch.no_grad():
        logits = forward(packed.arch, from_numpy(materialize(packed, 0)), torch.from_numpy(x)).numpy()
    assert (logits.argmax(1) == task.y_test[:64]).mean() > 0.9  # two digit classes: it learned
    with TaskRuntime(packed) as runtime:
        assert np.abs(runtime.infer(x, task=0) - logits).max() <= 1e-4 * max(1.0, float(np.abs(logits).max()))


class Inner(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("body, match", [
    (lambda y: y / torch.sigmoid(y), r"'truediv' .*division by a tensor"),
    (lambda y: 2.0 / y, r"'truediv' .*nonzero Python number"),
    (lambda y: y[:, :4].repeat(1, 2, 1, 1), r"'repeat'"),
    (lambda y: y[:, ::2].repeat(1, 2, 1, 1), r"'getitem' .*without a step"),
    (lambda y: y[:, :, :4], r"'getitem' .*only a slice of the channel axis"),
    (lambda y: y * y[:, 0, None], r"'getitem' .*only a slice of the channel axis"),
    (lambda y: torch.cat(torch.split(y, 4, dim=2), 2), r"'split' .*along dim 2; only along channels"),
    (lambda y: F.avg_pool2d(F.interpolate(y, scale_factor=2, mode="area"), 2), r"'interpolate' .*'area'"),
    (lambda y: F.avg_pool2d(F.interpolate(y, scale_factor=2, mode="bilinear", antialias=True), 2),
     r"'interpolate' .*antialias=True"),
    (lambda y: F.interpolate(F.interpolate(y, scale_factor=1.5), size=(8, 8)), r"'interpolate' .*integer factors"),
    (lambda y: torch.add(y, y, alpha=2), r"'add' .*alpha"),
    (lambda y: F.max_pool2d(y, 2, return_indices=True)[0], r"'max_pool2d_with_indices' .*return_indices"),
    (lambda y: F.softmax(y, dim=1), r"'softmax' .*only as the last op"),
    (lambda y: y.amax(1, keepdim=True) * y, r"'amax' .*only the spatial amax"),
    (lambda y: y * y.size(0), r"'mul' .*computed in forward"),  # the batch size: not folded (`fx_shape_flow`)
    (lambda y: torch.clamp(y, 0, 1), r"'clamp'"),
    (lambda y: y + y.mean(1, keepdim=True), r"'mean' .*only the spatial mean"),
    (lambda y: y - y.mean((2, 3), keepdim=True), r"'sub' .*shapes \[8, 8, 8\] and \[8, 1, 1\]; only of equal"),
])
def test_refusals_name_the_op_node_module_path_and_source_line(body, match):
    with pytest.raises(UsageError) as info:
        from_torch(Probe(Inner(body)), (3, 8, 8))
    message = str(info.value)
    assert __import__("re").search(match, message), message
    assert " in body" in message, message  # the module path the call runs in (Probe.body = Inner)
    assert f"{__file__}:" in message and "lambda y" in message.split(f"{__file__}:")[1], message  # the source line


def test_a_final_softmax_without_a_classifier_is_refused():
    class Trunk(nn.Module):
        def forward(self, x):
            return F.log_softmax(torch.flatten(x, 1), dim=1)

    with pytest.raises(UsageError, match=r"'log_softmax' \(call_function log_softmax, at .*only as the last op"):
        from_torch(Trunk(), (3, 4, 4), classifier=False)


def test_a_model_that_is_only_a_classifier_says_so():
    with pytest.raises(UsageError, match=r"only its classifier .*nn.Linear 20→3.*head per task.*no trunk"):
        from_torch(nn.Linear(20, 3), (20,))
    assert from_torch(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)), (20,))["feature_dim"] == 8


def test_a_model_file_imports_the_modules_beside_it(tmp_path):
    (tmp_path / "edgecl_test_blocks.py").write_text(
        "from torch import nn\n\n\ndef block(c_in, c_out):\n"
        "    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())\n")
    (tmp_path / "edgecl_test_heads.py").write_text("from torch import nn\n\nHEAD = nn.Linear(8, 4)\n")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\nfrom edgecl_test_blocks import block\n\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.body = block(3, 8)\n        from edgecl_test_heads import HEAD\n        self.fc = HEAD\n\n"
        "    def forward(self, x):\n        return self.fc(self.body(x).mean((2, 3)))\n\n\n"
        "def build():\n    return Net()\n")
    path_before = list(sys.path)
    try:
        spec = resolve_arch(f"{tmp_path / 'net.py'}:build", (3, 8, 8))
    finally:
        for name in ("edgecl_test_blocks", "edgecl_test_heads"):
            sys.modules.pop(name, None)
    assert spec["feature_dim"] == 8 and [n["op"] for n in spec["nodes"]][:3] == ["conv", "bn", "relu"]
    assert sys.path == path_before
    (tmp_path / "broken.py").write_text("from edgecl_test_no_such_sibling import block\n")
    with pytest.raises(UsageError, match="importing .*broken.py raised ModuleNotFoundError"):
        resolve_arch(f"{tmp_path / 'broken.py'}:build", (3, 8, 8))
    assert sys.path == path_before


def test_a_model_that_fails_on_the_input_shape_names_its_line_once(capfd):
    """torch's ShapeProp prints a traceback before it re-raises; the user gets one error with the failing line."""
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(self.conv(x).reshape(-1, 4 * 6 * 6))

    capfd.readouterr()
    with pytest.raises(UsageError, match=r"does not run on inputs of shape \(1, 9, 9\) \(call_method reshape, at "
                                         r".*test_from_torch_ops.py:\d+: return self.fc\(.*\): RuntimeError: "):
        from_torch(Fixed(), (1, 9, 9))
    assert "Traceback" not in capfd.readouterr().err


def test_slices_of_a_linear_layers_features_match_the_module():
    """The ONNX builder may hold a linear layer's output transposed; a slice reads it in the batch-first layout."""
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(64, 32), nn.Linear(16, 12), nn.Linear(18, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x.flatten(1)))
            g = torch.relu(self.fc2(h[:, :16] + h[:, 16:]))
            return self.out(torch.cat([g[:, 4:], g[:, :4], h[:, 10:16]], 1))

    torch.manual_seed(0)
    module = Halves().eval()
    spec = from_torch(module, (1, 8, 8))
    assert sum(n["op"] == "slice" for n in spec["nodes"]) == 5
    check_parity(module, spec, (1, 8, 8))
