"""ECA channel attention (timm's EcaModule and CecaModule): a ``channel_conv`` node whose torch and ONNX forms equal
the module for zero and circular padding; the channel map pins and orders the channels it reads, so compaction
keeps them and RGO's feature encoding leaves them in place; every method keeps its k weights so that earlier tasks
stay as they were; variants the op does not compute are refused by name with the source line."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from layer_nets import TinyEca
from torch_nets import check_parity, randomise_batchnorm

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.graph.compact import compact_task
from edgecl.train.models import forward, from_numpy
from timm.layers.eca import CecaModule, EcaModule


def test_tiny_eca_equals_the_module():
    module = TinyEca(in_channels=3).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 8, 8))
    check_parity(module, spec, (3, 8, 8))
    nodes = node_by_name(spec)
    assert nodes["block1.5.conv"] == {**nodes["block1.5.conv"], "op": "channel_conv", "ch": 8, "k": 3,
                                      "circular": False, "inputs": ["block1.5.pool"], "module_shape": [1, 1, 3]}
    assert nodes["block2.5.conv"]["circular"] and nodes["block2.5.conv"]["k"] == 5
    assert [nodes[f"block1.5{s}"]["op"] for s in (".pool", ".gate", "")] == ["gap", "sigmoid", "mul"]
    assert state_keys(spec)["block2.5.conv.weight"] == "block2.5.conv.weight"
    assert state_shapes(spec)["block2.5.conv.weight"] == (1, 1, 5)


class _Gated(nn.Module):
    def __init__(self, gate: nn.Module, channels: int = 6):
        super().__init__()
        self.conv, self.gate, self.fc = nn.Conv2d(2, channels, 3), gate, nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("gate", [
    lambda: EcaModule(kernel_size=1), lambda: EcaModule(kernel_size=7), lambda: EcaModule(channels=6),
    lambda: EcaModule(kernel_size=3, gate_layer="hard_sigmoid"), lambda: CecaModule(kernel_size=3),
    lambda: CecaModule(kernel_size=11)])  # circular padding 5 of 6 channels: wraps around almost all of them
def test_eca_variants_equal_the_module(gate):
    torch.manual_seed(0)
    module = _Gated(gate())
    with torch.no_grad():
        module.gate.conv.weight.mul_(4)  # gates far from 1/2, so every weight shows in the output
    spec = from_torch(module, (2, 7, 7))
    check_parity(module, spec, (2, 7, 7))


def test_a_conv1d_padded_same_is_the_zero_padded_eca():
    """torch keeps padding="same" as the string: read as (k−1)/2 for the odd kernel, not a raw ValueError."""
    gate = EcaModule(kernel_size=5)
    gate.conv = nn.Conv1d(1, 1, 5, padding="same", bias=False)
    module = _Gated(gate)
    spec = from_torch(module, (2, 7, 7))
    assert node_by_name(spec)["gate.conv"]["k"] == 5
    check_parity(module, spec, (2, 7, 7))


def test_channel_conv_is_the_neighbour_sum():
    """out[i] = Σ_j w[j]·x[i + j − 2] with zeros or wrapped ends, in torch and in ONNX Runtime."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    for circular in (False, True):
        spec = validate({"name": "cc", "input_shape": [5, 1, 1], "nodes": [
            {"name": "cc", "op": "channel_conv", "inputs": ["input"], "ch": 5, "k": 5, "circular": circular},
            {"name": "f", "op": "flatten", "inputs": ["cc"]}]})
        padded = np.concatenate([x[:, 3:], x, x[:, :2]] if circular else [np.zeros((3, 2)), x, np.zeros((3, 2))], 1)
        want = np.stack([padded[:, i:i + 5] @ w for i in range(5)], 1)
        params = {"cc.weight": w, "head.weight": np.eye(5, dtype=np.float32), "head.bias": np.zeros(5, np.float32)}
        with torch.no_grad():
            got = forward(spec, from_numpy(params), torch.from_numpy(x.reshape(3, 5, 1, 1))).numpy()
        session = ort.InferenceSession(build_onnx(spec, params).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {"x": x.reshape(3, 5, 1, 1)})[0]
        assert np.abs(got - want).max() < 1e-5 and np.abs(onnx_out - want).max() < 1e-5


@pytest.mark.parametrize("width, node, message", [
    (4, {"k": 4}, "odd k"), (5, {}, r"pooled \(4, 1, 1\) input"), (4, {"k": 11, "circular": True}, "at most 9")])
def test_spec_refuses_what_the_op_does_not_compute(width, node, message):
    cc = {"name": "cc", "op": "channel_conv", "inputs": ["g"], "ch": 4, "k": 3, **node}
    with pytest.raises(UsageError, match=message):
        validate({"name": "bad", "input_shape": [width, 4, 4], "nodes": [
            {"name": "g", "op": "gap", "inputs": ["input"]}, cc, {"name": "f", "op": "flatten", "inputs": ["cc"]}]})


def test_unsupported_variants_are_refused_by_name():
    with pytest.raises(UsageError, match=r"EcaModule at 'gate' \(call_module gate, at .*test_eca.py:\d+: .*\) uses "
                                         r"use_mlp"):
        from_torch(_Gated(EcaModule(channels=6, use_mlp=True)), (2, 7, 7))
    biased = EcaModule(kernel_size=3)
    biased.conv = nn.Conv1d(1, 1, 3, padding=1)
    with pytest.raises(UsageError, match=r"EcaModule at 'gate' .*: its Conv1d must be .* no bias"):
        from_torch(_Gated(biased), (2, 7, 7))

    class Bare(nn.Module):  # a Conv1d of the user's own: not a layer edgecl knows
        def __init__(self):
            super().__init__()
            self.conv, self.mix, self.fc = nn.Conv2d(2, 6, 3), nn.Conv1d(1, 1, 3, padding=1, bias=False), \
                nn.Linear(6, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.mean((2, 3)) * self.mix(y.mean((2, 3)).view(x.shape[0], 1, -1)).view(x.shape[0], -1))

    with pytest.raises(UsageError, match=r"unsupported layer Conv1d at 'mix' .*test_eca.py:\d+"):
        from_torch(Bare(), (2, 7, 7))


def _gated_spec() -> dict:
    """a (4 channels) → ECA gate (k=3) → b (1×1 conv reading a)."""
    return validate({"name": "eca", "input_shape": [1, 4, 4], "nodes": [
        {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 3, "pad": 1},
        {"name": "p", "op": "gap", "inputs": ["a"]},
        {"name": "cc", "op": "channel_conv", "inputs": ["p"], "ch": 4, "k": 3},
        {"name": "s", "op": "sigmoid", "inputs": ["cc"]}, {"name": "m", "op": "mul", "inputs": ["a", "s"]},
        {"name": "b", "op": "conv", "inputs": ["m"], "in": 4, "out": 3, "k": 1},
        {"name": "g", "op": "gap", "inputs": ["b"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})


def test_compaction_keeps_every_channel_the_gate_reads():
    """Channel 2 of `a` is read by nobody after the gate (b's column is zero), but the gates of channels 1 and 3 read
    it: it stays (removed, its neighbours would be shifted), and the logits are the dense ones."""
    spec = _gated_spec()
    cm = channel_map(spec)
    assert cm.pinned == cm.ordered == {"a"} and "cc.weight" not in cm.rows
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in
              {"a.weight": (4, 1, 3, 3), "a.bias": (4,), "cc.weight": (3,), "b.weight": (3, 4, 1, 1), "b.bias": (3,),
               "head.weight": (2, 3), "head.bias": (2,)}.items()}
    params["b.weight"][:, 2] = 0
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    assert node_by_name(small)["a"]["out"] == 4 and np.array_equal(kept["cc.weight"], params["cc.weight"])
    x = torch.from_numpy(rng.standard_normal((5, 1, 4, 4)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5
