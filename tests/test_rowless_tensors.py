"""Tensors that belong to no channel — ECA's k weights (`channel_conv`), a scalar affine's two numbers (PP-HGNetV2),
LeViT's, Swin's, TinyViT's, MaxViT's (window and grid) and EfficientFormerV2's attention-bias tables and the latter's
talking heads, EdgeNeXt's XCA temperatures, a lambda layer's position filters, MLP-Mixer's token mixing weights
(rows and columns are token positions) — under every method: LPS learns them
on the first task and holds them (its rule for biases), HALRP and RGO keep a copy per task (RGO: no rows for an
input-side projection or a feature encoding), STL is all per task, finetune shares everything, AGS-CL keeps them per
task and resumes them as packed; the first task's copy is bit-identical after the second task wherever the method
promises it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets import (TinyEca, TinyEfficientFormerV2, TinyHGNet, TinyLeViT, TinyMaxViT, TinySwin, TinySwinV2,
                        TinyTinyViT)
from layer_nets_mixer import TinyMixer
from linear_nets import TinyEdgeNeXt, TinyLambdaNet

from edgecl.arch import from_torch
from edgecl.arch.spec import rowless_tensors
from edgecl.deltas import materialize
from edgecl.graph.compact import compact_task
from edgecl.train import registry
from edgecl.train.data import make_stream
from edgecl.train.methods.agscl import AGSCL, AGSCLConfig
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext

CTX = TrainContext(progress=False)
NETS = {"eca": TinyEca, "hgnet": TinyHGNet, "levit": TinyLeViT, "swin": TinySwin, "tiny_vit": TinyTinyViT,
        "efficientformer": TinyEfficientFormerV2, "maxvit": TinyMaxViT, "edgenext": TinyEdgeNeXt,
        "lambda": TinyLambdaNet, "mixer": TinyMixer, "swinv2": TinySwinV2}  # Swin V2: its logit scales too


@pytest.fixture(scope="module")
def stream():
    return make_stream("split-digits", 2, seed=0)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method_name, kind", [("lps", "shared"), ("halrp", "task"), ("rgo", "task"),
                                               ("stl", "task"), ("finetune", "shared")])
def test_each_method_keeps_rowless_tensors_by_its_rule(net, method_name, kind, stream):
    spec = from_torch(NETS[net](), (1, 8, 8))
    names = rowless_tensors(spec)
    assert names  # the network has some
    method = registry.create(method_name, spec, {"epochs": 3 if method_name == "halrp" else 1})
    packs = []
    for t in range(2):
        method.learn_task(t, stream.tasks[t], CTX)
        packs.append(method.pack())
    assert {packs[1].params[k]["kind"] for k in names} == {kind}
    if method_name != "finetune":
        assert all(np.array_equal(materialize(packs[0], 0)[k], materialize(packs[1], 0)[k]) for k in names)
    if (method_name, net) == ("rgo", "eca"):  # the stream both gates read: one order in every task
        skipped = packs[1].extra["fel_skipped"]
        assert any("channel_conv" in why for why in skipped.values())
        assert not set(skipped) & set(packs[1].extra["fel_groups"])


@pytest.mark.parametrize("net", list(NETS))
def test_agscl_keeps_rowless_tensors_per_task_and_resumes_them(net):
    """Per task, resumed as packed; and the dead nodes it leaves compact away with the logits unchanged (after a
    scalar affine a dead node is the affine's bias, cut from every reader by the column masks)."""
    spec = from_torch(NETS[net](width=16), (1, 8, 8))
    names = rowless_tensors(spec)
    stream = make_stream("permuted-digits", 2, seed=0)
    method = AGSCL(spec, AGSCLConfig(epochs=1))
    for t in range(2):
        method.learn_task(t, stream.tasks[t], CTX)
    packed = method.pack()
    assert {packed.params[k]["kind"] for k in names} == {"task"}
    assert any(not np.array_equal(packed.task_tensors[0][k], packed.task_tensors[1][k]) for k in names)
    again = AGSCL(spec, AGSCLConfig(epochs=1))
    again.resume(packed)
    repacked = again.pack()
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(packed.task_tensors, repacked.task_tensors) for k in names)
    weights = materialize(packed, 0)
    small, compact, _ = compact_task(spec, weights, channel_multiple=1)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        dense, fewer = forward(spec, from_numpy(weights), x), forward(small, from_numpy(compact), x)
    assert np.abs(dense.numpy() - fewer.numpy()).max() < 1e-5
