"""AGS-CL on EdgeNeXt's SDTA block (`TinyEdgeNeXt`): channels no conv or linear layer writes — the ``fourier_pos``
grid, a ``channel_attention``'s output — are read like the network input (always important, never cut, Ω finite),
and each task deploys the network it trained. Before: the grid's nodes had Ω = 0/0 = NaN, counted as unimportant,
and (I.1) cut every column of the grid's 1×1 conv after the first task (task 0's logits moved by 3.2, 27.4 %
trained, 11.7 % deployed in a script at 5 epochs); a GELU's input node counted as unused when it stayed below 0
(its mean ReLU activation), although GELU passes it; and XCA's output channel i shared q_i's node, so a dead q_i, k_i,
v_i would have cut the projection's column i although that channel (a mix of the head's v channels) is not 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from linear_nets import TinyEdgeNeXt
from test_agscl_affine import _trained_networks

from edgecl.arch import from_torch, validate
from edgecl.arch.channels import channel_map
from edgecl.deltas import materialize
from edgecl.train.data import make_stream
from edgecl.train.methods.agscl import AGSCL, AGSCLConfig
from edgecl.train.methods.agscl_nodes import node_map
from edgecl.train.models import forward, from_numpy, init_params
from edgecl.train.protocol import TrainContext


@pytest.mark.parametrize("mu_adam, zeroed", [(0.001, 0), (0.01, 20)])
def test_grid_and_attention_output_are_never_cut_and_each_task_deploys_what_it_trained(monkeypatch, mu_adam, zeroed):
    """At μ_adam 0.001 an MLP node's GELU input stayed below 0 (ReLU mean 0, so it counted as unused and fc2's column
    was cut although GELU passes it: logits moved by 0.017); at 0.01 the lasso zeroes nodes exactly."""
    torch.manual_seed(0)
    arch = from_torch(TinyEdgeNeXt(in_channels=3, width=16), (3, 8, 8))
    method = AGSCL(arch, AGSCLConfig(epochs=3, mu_adam=mu_adam))
    trained = _trained_networks(monkeypatch, method)
    unwritten = {"block.pos_embd.grid": 64, "block.xca.attend": 16}
    assert {g: n for g, n in method.nodes.groups.items() if g in unwritten} == unwritten
    assert {k: v["op"] for k, v in method.nodes.passes.items()} == {"block.mlp.fc1": "gelu"}  # measured after it
    tasks = make_stream("permuted-digits", 2, 0, (3, 8, 8)).tasks
    for t, task in enumerate(tasks):
        method.learn_task(t, task, TrainContext(progress=False))
        assert method.stats[t]["exact_zero_nodes"] >= zeroed
        assert np.isfinite(method.omega.numpy()).all()
        alive = method.nodes.split(method.alive[t])
        assert all(alive[g].all() for g in unwritten)
        cuts = method.cuts()
        for weight in ("block.pos_embd.token_projection.weight", "block.xca.proj.weight"):
            assert weight not in cuts and np.abs(method.trunk[weight].numpy()).sum(0).all()  # no column zeroed
        x = torch.from_numpy(task.x_test)
        with torch.no_grad():
            was = forward(arch, trained[t], x)
            now = forward(arch, from_numpy(materialize(method.pack(), t)), x)
        assert float((was - now).abs().max()) < 1e-5, t


def test_attention_output_channels_are_not_the_dead_q_k_v_channels():
    """q, k and v rows of channel 0 zeroed (weights and biases): q̂_0 = 0 gives uniform weights, so output channel 0
    is the mean of its head's v channels — not 0. The channel map must not put it in q_0's group (a rule that zeroes
    or cuts a group's channels when its rows are zero would change the network), nor may AGS-CL's node map."""
    spec = validate({"name": "x", "input_shape": [2, 3, 5], "output": "f", "nodes": [
        *({"name": n, "op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1} for n in "qkv"),
        {"name": "a", "op": "channel_attention", "inputs": ["q", "k", "v"], "heads": 2},
        {"name": "p", "op": "conv", "inputs": ["a"], "in": 4, "out": 4, "k": 1},
        {"name": "f", "op": "flatten", "inputs": ["p"]}]})
    params = init_params(spec, 3, torch.Generator().manual_seed(0))
    for n in "qkv":
        params[f"{n}.weight"][0] = 0
        params[f"{n}.bias"][0] = 0
    params["p.weight"] = torch.eye(4).reshape(4, 4, 1, 1)  # p passes the attention's output through
    params["p.bias"].zero_()
    with torch.no_grad():
        out = forward(spec, params, torch.randn(4, 2, 3, 5), head=False).reshape(4, 4, 15)
    assert float(out[:, 0].abs().min()) > 0
    cm = channel_map(spec)
    assert cm.spaces["a"] == [("a", 1)] and {"a", *(g for g, _ in cm.spaces["q"])} <= cm.pinned & cm.ordered
    nodes = node_map(spec)
    assert nodes.unwritten[nodes.cols["p.weight"]].all()  # p reads channels AGS-CL never cuts
