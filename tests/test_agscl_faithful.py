"""AGS-CL's faithfulness check (`edgecl.train.methods.agscl_faithful`): after every task the trained and deployed
logits are compared on a fixed sample of the task's training data; the gap is recorded per task (0.0 on a healthy
run), a cut that moves the logits keeps the nodes that move them (``faithful="keep"``) or warns (``"warn"``), and the
CLI prints the warning. `AGSCL.deployed(t)` is `materialize(pack(), t)` without packing every task."""
from __future__ import annotations

import inspect
import json
import textwrap

import numpy as np
import torch
from cli_run import run_cli
from test_agscl_deployed import ReluThenBn, dead_relu_then_shift

from edgecl.arch import from_torch, preset
from edgecl.deltas import materialize
from edgecl.train import engine
from edgecl.train.data import make_stream
from edgecl.train.methods.agscl import AGSCL, AGSCLConfig
from edgecl.train.methods.agscl_faithful import SAMPLE, sample
from edgecl.train.protocol import TrainContext


def _relu_then_bn(faithful: str) -> tuple[AGSCL, TrainContext]:
    """`ReluThenBn` with a dead ReLU before a used BatchNorm shift, two tasks under Adam's-metric lasso."""
    torch.manual_seed(0)
    method = dead_relu_then_shift(AGSCL(from_torch(ReluThenBn(), (3, 8, 8)),
                                        AGSCLConfig(epochs=2, mu_adam=0.01, seed=0, faithful=faithful)))
    ctx = TrainContext(progress=False)
    for t, task in enumerate(make_stream("permuted-digits", 2, 0, (3, 8, 8)).tasks):
        method.learn_task(t, task, ctx)
        packed = method.pack()
        for j in range(t + 1):  # every task so far: the one-task form is the artifact's, bit for bit
            deployed, full = method.deployed(j), materialize(packed, j)
            assert set(deployed) == set(full)
            assert all(np.array_equal(deployed[k].view(np.uint32), full[k].view(np.uint32)) for k in full), (t, j)
    return method, ctx


def test_a_cut_that_moves_the_logits_warns_naming_the_group():
    method, ctx = _relu_then_bn("warn")
    first = method.stats[0]
    assert first["deploy_gap"] > 0.1 and first["deploy_gap"] == first["deploy_gap_before_keep"]
    a = method.nodes.split(np.arange(method.nodes.n))["a.0"]
    assert first["kept_for_gap"] == 0 and not method.alive[0][a].any()
    note = ctx.notes[0]["warning"]
    assert note.startswith("agscl task 0: the deployed network's logits differ")
    assert f"by up to {first['deploy_gap']:.3g}" in note
    assert "cutting nodes of a.0 moves them" in note and "--set mu_adam=" in note and "faithful='keep'" in note
    assert 1 not in ctx.notes  # task 1: a.0's shift is no longer read as trained (gap 0.0)
    assert method.stats[1]["deploy_gap"] == 0.0
    assert method.pack().extra["deploy_gap"] == [first["deploy_gap"], 0.0]


def test_keep_keeps_the_moving_nodes_and_deploys_what_it_trained():
    """The default: a.0's 8 nodes are kept important (an Ω > 0 of their own, so later tasks hold them), no note."""
    method, ctx = _relu_then_bn("keep")
    assert [s["deploy_gap"] for s in method.stats] == [0.0, 0.0] and not ctx.notes
    assert method.stats[0]["deploy_gap_before_keep"] > 0.1 and method.stats[0]["kept_for_gap"] == 8
    a = method.nodes.split(np.arange(method.nodes.n))["a.0"]
    assert method.alive[0][a].all() and (method.omega[a] > 0).all()
    again = AGSCL(method.arch, method.config)
    again.resume(method.pack())
    assert again.stats == method.stats  # results.json's record survives a resume


def test_a_healthy_run_records_zero_and_no_warning():
    """LeNet on split digits: Ω alone cuts faithfully (a ReLU network); results.json shows 0.0 per task."""
    lines: list[str] = []
    result = engine.run(AGSCL(preset("lenet"), AGSCLConfig(epochs=2)), make_stream("split-digits", 2, seed=0),
                        TrainContext(progress=False), log=lines.append)
    info = result.to_json()["method_info"]
    assert info["deploy_gap"] == [0.0, 0.0] and info["kept_for_gap"] == [0, 0]
    assert not result.to_json()["notes"] and not any("logits differ" in line for line in lines)


def test_the_sample_is_fixed_per_seed_and_task():
    """`SAMPLE` of a larger task's examples, drawn per (seed, task); a smaller task is compared on all of them."""
    task = make_stream("permuted-digits", 1, seed=0).tasks[0]
    assert len(task.x_train) > SAMPLE
    one = sample(task, 0, 0, "cpu")
    assert len(one) == SAMPLE and torch.equal(one, sample(task, 0, 0, "cpu"))
    assert not torch.equal(one, sample(task, 1, 0, "cpu")) and not torch.equal(one, sample(task, 0, 1, "cpu"))
    small = make_stream("split-digits", 1, seed=0).tasks[0]
    assert len(small.x_train) <= SAMPLE and torch.equal(sample(small, 0, 0, "cpu"), torch.from_numpy(small.x_train))


FACTORY = "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(ReluThenBn) + textwrap.dedent("""

    def relu_then_bn():
        torch.manual_seed(0)
        net = ReluThenBn()
        with torch.no_grad():  # a.0's ReLU is 0 everywhere; its BatchNorm adds β = 2
            net.a[0].weight.zero_(), net.a[0].bias.fill_(-1.0), net.a[2].bias.fill_(2.0)
        return net
    """)  # the class's own source: the factory file the CLI loads builds the same net


def test_the_cli_prints_the_warning_and_results_json_keeps_it(tmp_path, capsys):
    factory = tmp_path / "nets.py"
    factory.write_text(FACTORY)
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--method", "agscl", "--arch", f"{factory}:relu_then_bn",
                              "--input-shape", "3,8,8", "--init-weights", "module", "--stream", "permuted-digits",
                              "--tasks", "1", "--set", "epochs=2", "--set", "mu_adam=0.01", "--set", "faithful=warn",
                              "--no-progress", "--out", str(out))
    assert code == 0
    printed = [line for line in stdout.splitlines() if "WARNING" in line and "logits differ" in line]
    assert len(printed) == 1 and "agscl task 0" in printed[0] and "a.0" in printed[0], stdout
    data = json.loads((out / "results.json").read_text())
    assert "logits differ" in data["notes"]["0"]["warning"] and data["method_info"]["deploy_gap"][0] > 0.1
