"""Shape-specialised tracing (`edgecl.arch.fx_shape_flow`): a user's own module with Python control flow on shapes
goes in at the import shape, its resolved network equal to the module (torch and ONNX Runtime parity); control flow
on tensor values or on the batch size is refused naming the user's source line."""
from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, randomised_parity

from edgecl.arch import from_torch
from edgecl.deltas import check_consistent
from edgecl.errors import UsageError
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext


def _ops(spec: dict) -> list[str]:
    return [n["op"] for n in spec["nodes"]]


def _at(cls: type, text: str) -> str:
    """A pattern for `text`'s source line in `cls.body`, as a refusal names it (``file:line: code``)."""
    lines, first = inspect.getsourcelines(cls.body)
    number = first + next(i for i, line in enumerate(lines) if text in line)
    return re.escape(f"test_shape_control_flow.py:{number}: ") + ".*" + re.escape(text)


class _Head(nn.Module):
    """A conv stem and a pooled classifier around the control flow under test (`body`)."""

    def __init__(self, width: int = 8, in_channels: int = 3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 5)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x):
        x = self.body(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class InterpolateIfSizeDiffers(_Head):
    size = 8

    def body(self, x):
        assert x.dim() == 4, "a batch of maps"
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="nearest")
        return x


class PadIfOdd(_Head):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(8, 8, 2, stride=2)

    def body(self, x):
        H, W = x.shape[-2:]
        if H % 2 or W % 2:
            x = F.pad(x, (0, W % 2, 0, H % 2))
        return self.down(x)


class ShapeLoops(_Head):
    """A chain built by loops over shape-derived ranges: a block per 4 channels, a stride-2 conv per halving down to
    4×4 (`math.log2` on a size), and the parts of a split walked with `for`."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.downs = nn.ModuleList(nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(4))
        self.parts = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(2))

    def body(self, x):
        for i in range(x.size(1) // 4):
            x = torch.relu(self.blocks[i](x))
        for i in range(int(math.log2(x.shape[-1])) - 2):
            x = self.downs[i](x)
        x = torch.cat([conv(part) for conv, part in zip(self.parts, x.split(4, 1))], 1)
        return x * x.size(1)  # a number computed from a shape: a constant at the import shape


class WindowPadding(_Head):
    """TinyViT's window branch on a map: the whole map at the window size, else pad to whole windows first."""

    def __init__(self, in_channels: int = 3, window: int = 4, width: int = 8):
        super().__init__(width, in_channels)
        self.window = window
        self.whole, self.local = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1)

    def body(self, x):
        B, C, H, W = x.shape
        ws = self.window
        if H == ws and W == ws:
            return self.whole(x)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        if pad_b > 0 or pad_r > 0:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        return self.local(F.avg_pool2d(x, ws))


@pytest.mark.parametrize("cls, shape, expect", [
    (InterpolateIfSizeDiffers, (3, 4, 4), ["upsample"]), (InterpolateIfSizeDiffers, (3, 8, 8), []),
    (PadIfOdd, (3, 9, 7), ["pad"]), (PadIfOdd, (3, 8, 8), []),
    (ShapeLoops, (3, 16, 16), ["slice", "cat", "scale"]),
    (WindowPadding, (3, 10, 10), ["pad", "avgpool"]), (WindowPadding, (3, 4, 4), []),
])
def test_shape_control_flow_is_resolved_at_the_import_shape(cls, shape, expect):
    torch.manual_seed(0)
    module = cls()
    randomise_batchnorm(module)
    spec = from_torch(module, shape)
    ops = _ops(spec)
    for op in ("upsample", "pad", "avgpool"):  # the branch taken, and only that one
        assert (op in ops) == (op in expect), (op, ops)
    assert all(op in ops for op in expect)
    check_parity(module, spec, shape)


def test_the_branch_taken_depends_on_the_shape():
    """One module, two import shapes, two networks: the loops run once per 4 channels and once per halving."""
    counts = {}
    for side in (16, 32):
        spec = from_torch(ShapeLoops(), (3, side, side))
        counts[side] = sum(1 for n in spec["nodes"] if n["op"] == "conv" and n["name"].startswith("downs."))
        assert sum(1 for n in spec["nodes"] if n["name"].startswith("blocks.")) == 2
    assert counts == {16: 2, 32: 3}
    window = from_torch(WindowPadding(), (3, 4, 4))
    assert any(n["name"] == "whole" for n in window["nodes"]) and not any(n["name"] == "local" for n in
                                                                          window["nodes"])


def test_tracing_leaves_the_module_as_it_was():
    """Deciding runs the module's layers on examples: in eval mode, so a training module's BatchNorm statistics and
    its mode are untouched."""
    module = PadIfOdd().train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    from_torch(module, (3, 9, 9))
    assert module.training and module.bn.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class _Data(_Head):
    kind = "sum"

    def body(self, x):
        if self.kind == "sum":
            if x.sum() > 0:
                x = x * 2
        elif self.kind == "any":
            if (x > 0).any():
                x = x * 2
        elif self.kind == "item":
            for _ in range(int(x.max().item())):
                x = x * 2
        elif self.kind == "weights":
            if self.stem.weight.abs().max() > 1:
                x = x * 2
        elif self.kind == "nonzero":
            if x.nonzero().shape[0] > 3:
                x = x * 2
        return x


@pytest.mark.parametrize("kind, line", [
    ("sum", "if x.sum() > 0:"), ("any", "if (x > 0).any():"), ("item", "for _ in range(int(x.max().item())):"),
    ("weights", "if self.stem.weight.abs().max() > 1:"), ("nonzero", "if x.nonzero().shape[0] > 3:"),
])
def test_data_dependent_control_flow_is_refused_at_its_line(kind, line):
    module = _Data()
    module.kind = kind
    with pytest.raises(UsageError, match="data-dependent control flow cannot be converted") as err:
        from_torch(module, (3, 8, 8))
    assert re.search(_at(_Data, line), str(err.value)), str(err.value)


class _Batch(_Head):
    kind = "if"

    def body(self, x):
        if self.kind == "if":
            if x.shape[0] > 1:
                x = x * 2
        elif self.kind == "len":
            x = x * (1.0 / len(x))
        elif self.kind == "rows":
            x = torch.cat([row.unsqueeze(0) for row in x])
        elif self.kind == "view":
            x = x.view(int(x.shape[0]), 8, -1).mean(2)[:, :, None, None]
        elif self.kind == "threshold":  # the same at batch 1, 2 and 3, not at 4
            if x.shape[0] < 4:
                x = torch.relu(x - 0.5)
        elif self.kind == "numel":
            if x.numel() < 2000:  # 512 elements a sample: the same at batch 1, 2 and 3, not at 4
                x = x * 2
        return x


@pytest.mark.parametrize("kind, line, why", [
    ("if", "if x.shape[0] > 1:", "depends on the batch size"), ("len", "x = x * (1.0 / len(x))", "first axis"),
    ("rows", "x = torch.cat([row.unsqueeze(0) for row in x])", "first axis"),
    ("view", "x = x.view(int(x.shape[0]), 8, -1)", "depends on the batch size"),
    ("threshold", "if x.shape[0] < 4:", "depends on the batch size.*at batch 4"),
    ("numel", "if x.numel() < 2000:", "depends on the batch size.*at batch 4"),
])
def test_batch_dependent_control_flow_is_refused_at_its_line(kind, line, why):
    module = _Batch()
    module.kind = kind
    with pytest.raises(UsageError, match=why) as err:
        from_torch(module, (3, 8, 8))
    assert re.search(_at(_Batch, line), str(err.value)), str(err.value)


class _BatchFree(_Head):
    """Decisions that read the batch axis yet are the same at every batch size: an empty-batch guard, the other
    axes of a shape read whole."""

    def body(self, x):
        if x.shape[0] == 0 or x.numel() == 0:
            return x
        b, c, h, w = x.shape
        if c * h * w > 100:
            x = x * 2
        return x


def test_decisions_that_read_the_batch_but_never_change_with_it_go_in():
    assert "scale" in _ops(randomised_parity(_BatchFree(), (3, 8, 8)))


class _Checked(_Head):
    def body(self, x):
        assert x.shape[-1] % 4 == 0, "the width must be a multiple of 4"
        return x


def test_a_shape_check_the_import_shape_fails_names_its_line():
    spec = from_torch(_Checked(), (3, 8, 8))
    assert _ops(spec)[:3] == ["conv", "bn", "relu"]
    with pytest.raises(UsageError, match="multiple of 4") as err:
        from_torch(_Checked(), (3, 10, 10))
    assert re.search(_at(_Checked, "assert x.shape[-1] % 4 == 0"), str(err.value)), str(err.value)


def test_a_model_that_does_not_take_the_input_shape_says_so_first():
    """A 3-channel model on 1-channel data, failing where the control flow runs it, led with 'deciding the control
    flow at ...' (a torchvision file's `result += input`), hiding that the input shape was the problem."""
    with pytest.raises(UsageError) as err:
        from_torch(InterpolateIfSizeDiffers(), (1, 8, 8))
    text = str(err.value)
    assert re.match(r"InterpolateIfSizeDiffers: the model does not run on inputs of shape \(2, 1, 8, 8\) at stem: "
                    r"RuntimeError: .*3 channels", text), text
    assert re.search(r"\(met while deciding the control flow at .*" + _at(InterpolateIfSizeDiffers, "assert x.dim()"),
                     text), text


class _Typed(_Head):
    """dtype and device reads resolve as float32 on the CPU, the spec's own."""

    def body(self, x):
        if x.dtype != torch.float32 or not x.is_floating_point():
            x = x.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return x + 1.0


def test_dtype_and_device_reads_resolve_as_float32_on_the_cpu():
    assert "scale" in _ops(randomised_parity(_Typed(), (3, 8, 8)))


@pytest.mark.parametrize("method_name", ["lps", "agscl", "halrp", "rgo"])
def test_every_method_learns_and_deploys_a_resolved_network(method_name, tmp_path):
    """The window-padding network imported at the digits' 1×8×8 (windows of 3: the pad branch) learns two real tasks
    with each method (at least twice chance: a small network, five short epochs), and its artifact's runtime and
    exported ONNX give training's answers."""
    from test_methods_on_graphs import _deploys

    stream = make_stream("split-digits", 2, seed=0)
    spec = from_torch(WindowPadding(in_channels=1, window=3, width=32), (1, 8, 8))
    assert "pad" in _ops(spec)
    method = registry.create(method_name, spec, {"epochs": 5})
    for t, task in enumerate(stream.tasks):
        method.learn_task(t, task, TrainContext(progress=False))
    packed = method.pack()
    check_consistent(packed)
    assert all(engine.accuracy(packed, t, task) > 0.4 for t, task in enumerate(stream.tasks))  # 5 classes each
    _deploys(packed, stream, tmp_path)


def test_tracing_keeps_each_layers_own_mode():
    """A frozen BatchNorm (eval) in a training module stays in eval after the import runs the module (shapes, and
    the decisions of its control flow)."""
    for module, shape in ((PadIfOdd(), (3, 9, 9)), (InterpolateIfSizeDiffers(), (3, 8, 8))):
        module.train()
        module.bn.eval()
        from_torch(module, shape)
        assert module.training and module.stem.training and not module.bn.training


class _ManyLayers(_Head):
    """Sixty shape decisions in a model that holds thousands of layers (here unused: no compute to time)."""

    def __init__(self, layers: int):
        super().__init__()
        self.spare = nn.ModuleList(nn.Identity() for _ in range(layers))

    def body(self, x):
        for _ in range(60):
            if x.shape[-1] % 2:
                x = F.pad(x, (0, 1, 0, 1))
        return x


def test_deciding_does_not_walk_every_layer_per_decision(monkeypatch):
    """Each decision runs the module in eval mode: switching the modes must not walk every layer through
    nn.Module.train (before the fix: 60 decisions × 4,000 layers, ~6 s more than without the layers). Counted in
    calls, not timed (speed is measured in tools/, never asserted in tests)."""
    calls = [0]
    original = nn.Module.train

    def counting(self, mode=True):
        calls[0] += 1
        return original(self, mode)

    monkeypatch.setattr(nn.Module, "train", counting)

    def train_calls(layers: int) -> int:
        module = _ManyLayers(layers).train()
        calls[0] = 0
        from_torch(module, (3, 8, 8))
        return calls[0]

    assert train_calls(4000) - train_calls(0) < 4000  # the walk was 2 calls per layer per decision: 480,000
