"""BatchNorm folded at a switch on the device path (`edgecl.runtime.fold_bn`): the scaled-select kernel's C twin equals
its numpy twin bit for bit; on the numpy twin of the device, the runtime reads conv + bias where the graph had conv →
BatchNorm, equals the per-task reference sessions, and every bound tensor equals `materialize` folded; a conv read by
more than its BatchNorm, or whose weight no switch writes, keeps its BatchNorm."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from torch import nn

from edgecl.arch import from_torch, preset
from edgecl.arch.spec import BN_TENSORS
from edgecl.deltas import PackedModel, materialize
from edgecl.runtime import TaskRuntime, device_kernel
from edgecl.runtime.fold_bn import FoldedBN
from edgecl.runtime.plan import read_plans
from edgecl.source import open_model
from edgecl.synthetic import random_packed, random_share
from test_device_fill import _compiled

rng = np.random.default_rng(11)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


def test_scaled_kernel_compiled_as_c_equals_its_numpy_twin(tmp_path):
    """Three segments (row lengths 9, 64, 1; 64-aligned starts, padding between them): the C build of the kernel's
    text and the numpy twin write the same bits — base · scale of the row where kept (negative scales, NaN, inf,
    -0.0 and subnormal bases), +0.0 where not — and leave the padding alone."""
    assert device_kernel.SCALED_ELEMENT in device_kernel.scale_cuda_source()
    assert device_kernel.SCALED_ELEMENT in device_kernel.scale_c_source()
    fn = _compiled(tmp_path, device_kernel.scale_c_source(), device_kernel.SCALE_NAME,
                   [ctypes.c_void_p] * 5 + [ctypes.c_ulonglong])
    shapes = [(5, 9), (3, 64), (70, 1)]
    table, offset, first = [], 0, 0
    for rows, row_len in shapes:
        table.append([offset, rows, row_len, first])
        offset += -(-rows * row_len // 64) * 64
        first += rows
    table = np.array(table, np.uint64)
    base = rng.standard_normal(offset).astype(np.float32)
    base[::7], base[3::11], base[5::13], base[6::17] = -0.0, np.inf, np.nan, np.float32(1e-45)
    bits = np.packbits(rng.random(offset) < 0.6)
    scale = rng.standard_normal(first).astype(np.float32)
    scale[::4] *= -1
    out_c, out_np = np.full(offset, 7.0, np.float32), np.full(offset, 7.0, np.float32)
    fn(base.ctypes.data, bits.ctypes.data, scale.ctypes.data, out_c.ctypes.data, table.ctypes.data, len(table))
    device_kernel.masked_scale_numpy(base, bits, scale, out_np, table)
    assert np.array_equal(_bits(out_c), _bits(out_np))
    keep = np.unpackbits(bits).view(bool)
    for (start, rows, row_len, first_scale) in table.tolist():
        n = rows * row_len
        want = np.where(keep[start:start + n].reshape(rows, row_len),
                        base[start:start + n].reshape(rows, row_len) * scale[first_scale:first_scale + rows, None],
                        np.float32(0.0))
        assert np.array_equal(_bits(out_np[start:start + n]), _bits(want.reshape(-1)))
        assert (out_np[start + n:start + -(-n // 64) * 64] == 7.0).all()  # padding untouched


def _with_task_batchnorm(packed: PackedModel, negative: bool = True) -> PackedModel:
    """`packed` with every BatchNorm learned per task (LPS's default ``batchnorm="task"``), some scales negative."""
    params, base = dict(packed.params), dict(packed.base)
    task_tensors = [dict(tt) for tt in packed.task_tensors]
    names = [n for n in params if n.rpartition(".")[2] in BN_TENSORS and n.rpartition(".")[0] in
             {node["name"] for node in packed.arch["nodes"] if node["op"] == "bn"}]
    for name in names:
        shared = base.pop(name)
        params[name] = {"kind": "task"}
        for t, tt in enumerate(task_tensors):
            value = shared * (1 + 0.2 * rng.standard_normal(shared.shape)).astype(np.float32)
            if name.endswith(".weight") and negative:
                value[t::3] *= -1
            tt[name] = np.abs(value) if name.endswith("running_var") else value.astype(np.float32)
    return PackedModel(packed.arch, packed.method, packed.config, params, base, packed.tasks, task_tensors)


def _compare(packed: PackedModel, cuda_graph: bool = False, factor: bool = True) -> TaskRuntime:
    device = TaskRuntime(packed, resident="device", cache_tasks=1, cuda_graph=cuda_graph, factor=factor)
    reference = TaskRuntime(packed, strategy="sessions")
    for t in [0, 2, 1, 0, 2, 1][:2 * packed.n_tasks]:
        t %= packed.n_tasks
        x = rng.standard_normal((3, *packed.arch["input_shape"])).astype(np.float32)
        np.testing.assert_allclose(device.infer(x, task=t), reference.infer(x, task=t), atol=2e-5, rtol=1e-5)
    strategy = device._strategy
    for t in range(packed.n_tasks):
        want = strategy.as_bound(materialize(packed, t))
        for name, got in device.bound_tensors(t).items():
            if name in want:
                assert got.shape == want[name].shape and np.array_equal(got, want[name]), (t, name)
    reference.close()
    return device


@pytest.mark.parametrize("shape", ["lps", "lowrank", "mixed"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_per_task_batchnorm_is_folded_into_the_switched_convs(shape, cuda_graph):
    """The resnet preset with per-task BatchNorm: each conv a switch writes is read with its BatchNorm folded in
    (no BatchNormalization left for them, a per-task bias instead, the BatchNorm's tensors neither bound nor
    kept), and the outputs equal the per-task sessions on every task."""
    packed = _with_task_batchnorm(random_packed(preset("resnet"), n_tasks=3, shape=shape, classes=(5, 3)))
    device = _compare(packed, cuda_graph=cuda_graph)
    strategy = device._strategy
    pairs = strategy.folded_bn.pairs
    written = {p.name.removesuffix(".weight") for p in read_plans(open_model(packed), factored=True).plans
               if p.varies and p.name.endswith(".weight")}
    convs = {n["name"] for n in packed.arch["nodes"] if n["op"] == "conv"}
    assert pairs and set(pairs) == written & convs  # every written conv of this net is followed by its own BN
    inputs = {i.name for i in strategy._session.get_inputs()}
    bound = device.bound_tensors(1)
    for conv, bn in pairs.items():
        assert f"{conv}.bias" in inputs and f"{conv}.bias" in bound
        assert not any(f"{bn['name']}.{k}" in inputs or f"{bn['name']}.{k}" in bound for k in BN_TENSORS)
    if written == convs:
        assert "BatchNormalization" not in strategy.graph_ops
    device.close()


def test_host_path_and_unwritten_convs_keep_their_batchnorm():
    """Only the device path folds, and only where a switch writes the conv: on the host path, and on the device for
    factored (constant) conv weights, the graph keeps its BatchNormalization nodes."""
    packed = _with_task_batchnorm(random_packed(preset("resnet"), n_tasks=2, shape="node", classes=(5,)))
    host = TaskRuntime(packed, strategy="inplace")
    assert not host._strategy.folded_bn.pairs and "BatchNormalization" in host._strategy.graph_ops
    device = _compare(packed)  # node masks of convs reading ≥ 8 channels: factored, constant weights
    assert set(device._strategy.folded_bn.pairs) == {"stem"}  # one input channel: its masked weight is written
    assert "BatchNormalization" in device._strategy.graph_ops
    host.close()
    device.close()


class ReadTwice(nn.Module):
    """conv1 is read by its BatchNorm and by the residual add; conv2 (with a bias) only by its BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.conv1(x)
        h = torch.relu(self.bn1(h)) + h
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.flatten(self.pool(h), 1)


def test_a_conv_read_twice_is_not_folded_and_a_conv_bias_is():
    """conv1's output is also added to the BatchNorm's: folding would change what the add reads, so it stays;
    conv2's own bias goes into the folded one, (b − μ)·s + β."""
    arch = from_torch(ReadTwice(), (1, 8, 8), classifier=False)
    packed = _with_task_batchnorm(random_packed(arch, n_tasks=3, shape="lps", classes=(4,)))
    device = _compare(packed)
    assert set(device._strategy.folded_bn.pairs) == {"conv2"}
    assert "BatchNormalization" in device._strategy.graph_ops  # bn1's
    raw = materialize(packed, 2)
    folded = device.bound_tensors(2)
    scale = raw["bn2.weight"] / np.sqrt(raw["bn2.running_var"] + np.float32(1e-5))
    np.testing.assert_allclose(folded["conv2.bias"], (raw["conv2.bias"] - raw["bn2.running_mean"]) * scale
                               + raw["bn2.bias"], rtol=1e-6)
    device.close()


def test_a_batchnorm_switched_with_its_conv_is_folded_from_each_tasks_values():
    """A BatchNorm whose own tensors a switch writes (here: LPS-masked like the weights) is folded too: each task's
    values are written once at load, and the outputs still equal the reference."""
    arch = from_torch(ReadTwice(), (1, 8, 8), classifier=False)
    packed = random_packed(arch, n_tasks=2, shape="lps", classes=(4,))
    params = dict(packed.params)
    params["bn2.weight"] = {"kind": "lps"}
    base = dict(packed.base)
    owner = rng.integers(0, 3, size=8).astype(np.uint8)
    base["bn2.weight:owner"] = owner
    task_tensors = [dict(tt, **{"bn2.weight:share": random_share(rng, owner, t)})
                    for t, tt in enumerate(packed.task_tensors)]
    packed = PackedModel(arch, packed.method, packed.config, params, base, packed.tasks, task_tensors)
    plans = read_plans(open_model(packed), factored=True).plans
    assert next(p for p in plans if p.name == "bn2.weight").varies
    assert set(FoldedBN(arch, plans, 2).pairs) == {"conv2"}
    _compare(packed).close()
