"""AGS-CL past a scalar affine (`edgecl.train.methods.agscl_affine`): a node the lasso zeroed is 0 up to the affine
and its b after it; while a task trains, b reaches live nodes only, so the deployed network (readers' columns of dead
nodes cut) computes exactly what the task trained — on TinyHGNet, where it did not before (36.1 % trained, 31.3 %
deployed). An affine whose channels reach a channel-mixing op keeps b everywhere (the deployed network reads it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_nets import ScalarAffine, TinyHGNet
from timm.layers import LayerNorm2d
from torch import nn

from edgecl.arch import from_torch, validate
from edgecl.deltas import materialize
from edgecl.train.data import make_stream
from edgecl.train.methods import agscl as agscl_module
from edgecl.train.methods.agscl import AGSCL, AGSCLConfig
from edgecl.train.methods.agscl_affine import BiasMasks, column_read, nonzero_nodes
from edgecl.train.methods.agscl_faithful import tolerance
from edgecl.train.methods.agscl_nodes import node_map
from edgecl.train import batchnorm, protocol
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext


def _trained_networks(monkeypatch, method: AGSCL) -> list[dict]:
    """The network each task's training ended with, as its loss read it: the parameters `learn_task` recalibrates
    (its last forward over the task's data), copied before the cut after the task."""
    seen: list[dict] = []
    recalibrate = agscl_module.recalibrate

    def spy(arch, params, *args, **kwargs):
        recalibrate(arch, params, *args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in params.items()})

    monkeypatch.setattr(agscl_module, "recalibrate", spy)
    return seen


def _passes(monkeypatch) -> list[int]:
    """Counts the passes over a task's training data: the calls of the loader every epoch, BatchNorm recalibration
    and every no-grad pass draw their batches from."""
    count, shards = [0], protocol.shards

    def counted(*args, **kwargs):
        count[0] += 1
        return shards(*args, **kwargs)

    monkeypatch.setattr(protocol, "shards", counted)
    monkeypatch.setattr(batchnorm, "shards", counted)
    return count


def _deployed_equals_trained(monkeypatch, arch: dict, config: AGSCLConfig, tasks: list,
                             within_rounding: bool = False) -> tuple[AGSCL, list]:
    """Each task's deployed logits are the trained network's (its head as trained, before the cut), with zeroed nodes
    past affines whose b is not 0; each task reads its data once per epoch, then once to recalibrate BatchNorm and
    once for Ω, whose pass also sums the head's features where cut columns' b is folded into the head's bias (before,
    the fold made a pass of its own). Within 1e-5, or with `within_rounding` (a deep network) within what AGS-CL's own
    check calls float rounding (`agscl_faithful.tolerance`: 1e-4 of the largest logit + 1e-6)."""
    method = AGSCL(arch, config)
    trained = _trained_networks(monkeypatch, method)
    passes = _passes(monkeypatch)
    for t, task in enumerate(tasks):
        passes[0] = 0
        method.learn_task(t, task, TrainContext(progress=False))
        assert passes[0] == config.epochs + 2, (t, passes[0])  # the epochs, recalibration, Ω (and the fold)
        assert method.stats[t]["exact_zero_nodes"] > 0  # the case at hand: zeroed nodes past affines
        x = torch.from_numpy(task.x_test)
        with torch.no_grad():
            was = forward(arch, trained[t], x)  # the head as trained too: (I.1) cuts it in place after the task
            now = forward(arch, from_numpy(materialize(method.pack(), t)), x)
        biases = [float(trained[t][f"{n['name']}.bias"].abs().max()) for n in arch["nodes"]
                  if n["op"] == "scalar_affine"]
        assert max(biases) > 1e-3  # b is not 0: unmasked, the cut would move the logits
        assert float((was - now).abs().max()) < (tolerance(was) if within_rounding else 1e-5), t
    return method, trained


def test_hgnet_deploys_what_each_task_trained(monkeypatch):
    """Before: this test failed with logits moved by 0.036 on task 0."""
    arch = from_torch(TinyHGNet(in_channels=3, width=16), (3, 8, 8))
    _deployed_equals_trained(monkeypatch, arch, AGSCLConfig(epochs=3, mu=8.0),
                             make_stream("permuted-digits", 2, 0, (3, 8, 8)).tasks)


class HeadHGNet(TinyHGNet):
    """TinyHGNet with PP-HGNetV2's head: pooled features, a 1×1 conv with bias, ReLU and an affine before the
    classifier. Head units whose ReLU fell silent keep rows the lasso has not zeroed yet: live in training (b past the
    affine), unimportant after it, their head columns cut."""

    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__(in_channels=3, width=width)
        self.last_conv = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.ReLU(), ScalarAffine())
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc(self.last_conv(self.block(x).mean((2, 3), keepdim=True)).flatten(1))


def test_live_but_unimportant_nodes_past_an_affine_keep_their_b_at_the_head(monkeypatch):
    """Before: task 1's logits moved by 0.068 at deployment (0.087 and 34.8 % trained, 32.2 % deployed in a script
    run on another random state): the head's columns of unimportant nodes with rows not yet zero were cut with the b
    they read; now it is folded into the head's bias."""
    arch = from_torch(HeadHGNet(), (3, 8, 8))
    method, trained = _deployed_equals_trained(monkeypatch, arch, AGSCLConfig(epochs=3, mu_adam=0.003),
                                               make_stream("permuted-digits", 2, 0, (3, 8, 8)).tasks)
    nodes = node_map(arch)
    head_affine = nodes.affines[[n["name"] for n in arch["nodes"] if n["op"] == "scalar_affine"][-1]]
    rows = {k: torch.from_numpy(idx) for k, idx in nodes.trainable.items()}
    live_cut = [int((nonzero_nodes(trained[t], rows, nodes.n).numpy() & ~method.alive[t])[head_affine].sum())
                for t in range(2)]
    assert max(live_cut) > 0, live_cut  # the case at hand: such nodes were cut


class NormReadHGNet(nn.Module):
    """A conv-BN-ReLU-affine whose channels the head reads (their mean) and a LayerNorm reads too: the affine is not
    column-read, so its b reaches every channel in training, dead nodes' too."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  ScalarAffine(1.0, 0.5))
        self.norm, self.mix = LayerNorm2d(width), nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU())
        self.fc = nn.Linear(2 * width, 3)

    def forward(self, x):
        y = self.stem(x)
        return self.fc(torch.cat([y.mean((2, 3)), self.mix(self.norm(y)).mean((2, 3))], 1))


def test_head_columns_past_an_affine_a_layer_norm_reads_keep_their_b(monkeypatch):
    """Before: the head's columns of dead nodes past such an affine were cut with the b they read in training (task
    0's logits moved by 0.21, 16.9 % trained, 9.8 % deployed); now b is folded into the head's bias as for live ones."""
    arch = from_torch(NormReadHGNet(), (3, 8, 8))
    assert not column_read(arch, "stem.3")
    _deployed_equals_trained(monkeypatch, arch, AGSCLConfig(epochs=3, mu=8.0),
                             make_stream("permuted-digits", 2, 0, (3, 8, 8)).tasks)


@pytest.mark.slow  # timm's hgnetv2_b0 at 32×32, two tasks of two epochs (~10-30 s)
def test_timm_hgnetv2_b0_deploys_what_each_task_trained(monkeypatch):
    """Before: this test failed with logits moved by 0.0078 on task 0 (default config); then passed comparing the
    head after its cut, while the head as trained read 0.0077 more from 147 live-but-unimportant head units' b.
    The full network rounds differently on different CPUs: on an AMD EPYC the gap is 1.2e-4 with logits up to 1.7
    (the Xeon of earlier runs stayed below 1e-5), so it is held to AGS-CL's own rounding tolerance (1.7e-4 here),
    which the 0.0078 this test caught exceeds 46×."""
    import timm

    torch.manual_seed(0)
    arch = from_torch(timm.create_model("hgnetv2_b0", pretrained=False, num_classes=5).eval(), (3, 32, 32))
    _deployed_equals_trained(monkeypatch, arch, AGSCLConfig(epochs=2),
                             make_stream("split-digits", 2, 0, (3, 32, 32)).tasks, within_rounding=True)


def test_only_column_read_affines_are_masked():
    """TinyHGNet's affines reach only convolutions and the head (through cat, add, an ESE gate and pooling); an affine
    read by ECA's neighbour conv or by a LayerNorm keeps its b on every channel."""
    arch = from_torch(TinyHGNet(in_channels=3, width=8), (3, 8, 8))
    affines = [n["name"] for n in arch["nodes"] if n["op"] == "scalar_affine"]
    assert len(affines) == 4 and all(column_read(arch, a) for a in affines)
    masks = BiasMasks(arch, node_map(arch))
    assert sorted(masks.channels) == sorted(f"{a}.bias" for a in affines)

    def spec(mixer: list[dict]) -> dict:
        return validate({"name": "mix", "input_shape": [1, 6, 6], "nodes": [
            {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 3, "pad": 1},
            {"name": "r", "op": "relu", "inputs": ["a"]},
            {"name": "lab", "op": "scalar_affine", "inputs": ["r"]}, *mixer,
            {"name": "b", "op": "conv", "inputs": [mixer[-1]["name"]], "in": 4, "out": 3, "k": 1},
            {"name": "g", "op": "gap", "inputs": ["b"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})

    eca = spec([{"name": "p", "op": "gap", "inputs": ["lab"]},
                {"name": "e", "op": "channel_conv", "inputs": ["p"], "ch": 4, "k": 3},
                {"name": "s", "op": "sigmoid", "inputs": ["e"]}, {"name": "m", "op": "mul", "inputs": ["lab", "s"]}])
    norm = spec([{"name": "n", "op": "layer_norm", "inputs": ["lab"], "ch": 4}])
    plain = spec([{"name": "m", "op": "maxpool", "inputs": ["lab"], "k": 2}])
    assert not column_read(eca, "lab") and not column_read(norm, "lab") and column_read(plain, "lab")
    assert not BiasMasks(eca, node_map(eca)) and BiasMasks(plain, node_map(plain))


def test_a_zeroed_node_loses_b_and_gets_it_back_when_it_revives():
    """The mask follows the rows: b·live per channel, live = important before the task or any row not zero."""
    arch = from_torch(TinyHGNet(in_channels=3, width=8), (3, 8, 8))
    nodes = node_map(arch)
    params = from_numpy({k: np.ones(v.shape, np.float32) for k, v in
                         AGSCL(arch).trunk.items()})
    params["stem.3.bias"] = torch.tensor([0.5])
    masks = BiasMasks(arch, nodes)
    stem = nodes.affines["stem.3"]
    dead = int(stem[1])
    for k, rows in nodes.trainable.items():
        params[k][torch.from_numpy(rows == dead)] = 0
    masks.update(params, np.zeros(nodes.n, bool))
    b = masks.apply(params)["stem.3.bias"].flatten()
    assert b[1] == 0 and (b[np.arange(8) != 1] == 0.5).all()
    held = np.zeros(nodes.n, bool)
    held[dead] = True  # important for an earlier task: never masked
    masks.update(params, held)
    assert (masks.apply(params)["stem.3.bias"] == 0.5).all()
    params["stem.0.weight"][1, 0, 0, 0] = 1e-3  # the lasso let it revive
    masks.update(params, np.zeros(nodes.n, bool))
    assert (masks.apply(params)["stem.3.bias"] == 0.5).all()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_resumed_mid_stream_the_next_task_deploys_what_it_trained_and_old_tasks_stay(monkeypatch, tmp_path):
    """--resume past affines: the masks follow from the artifact's rows and node masks (nothing else is kept), so a
    resumed task 1 deploys what it trained and task 0 reads bit for bit what it did."""
    from edgecl import artifact

    arch = from_torch(HeadHGNet(), (3, 8, 8))
    config, tasks = AGSCLConfig(epochs=3, mu_adam=0.003), make_stream("permuted-digits", 2, 0, (3, 8, 8)).tasks
    first = AGSCL(arch, config)
    first.learn_task(0, tasks[0], TrainContext(progress=False))
    path = tmp_path / "hg.edgecl"
    artifact.save(first.pack(), path)
    before = artifact.load(path).materialize(0)
    again = AGSCL(arch, config)
    again.resume(artifact.load(path).to_packed())
    trained = _trained_networks(monkeypatch, again)
    again.learn_task(1, tasks[1], TrainContext(progress=False))
    x = torch.from_numpy(tasks[1].x_test)
    with torch.no_grad():
        gap = forward(arch, trained[0], x) - forward(arch, from_numpy(materialize(again.pack(), 1)), x)
    assert float(gap.abs().max()) < 1e-5
    artifact.append_task(path, again.pack())  # refuses if any earlier tensor would change
    after = artifact.load(path).materialize(0)
    assert all(np.array_equal(after[k], w) for k, w in before.items())
