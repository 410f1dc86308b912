"""Training on several ranks (issue 18): real runs of 2 CPU processes with gloo, started by torch's launcher.

`dist_worker.py` trains every method for 2 tasks of a small BatchNorm convnet, resumes it with a third, and evaluates
each method's data statistic under 2 ranks; the tests below read what every rank wrote. `edgecl train --nproc 2` is
run end to end, and so are the failures: a rank that stops with an error, a rank killed mid-training, ranks that
read different data. A single process runs exactly the code it ran before: the fast tests check that the
distributed helpers are the identity there.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import dist_worker
from edgecl import artifact
from edgecl.commands import train as train_command
from edgecl.train import distributed, engine
from edgecl.train.data import make_stream

ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
METHODS = ["lps", "agscl", "halrp", "rgo", "finetune", "stl"]
NO_FORGETTING = ["lps", "agscl", "halrp", "stl"]  # BWT exactly 0 by construction (agscl: freeze="exact")


def edgecl(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecl", *argv], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One torchrun launch of `dist_worker.py` for all six methods (~25 s on 2 cores): the folder it trained into and
    what each rank recorded."""
    out = tmp_path_factory.mktemp("two_ranks")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("dist_worker.py")), str(out), ",".join(METHODS)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_rank_holds_bit_identical_state_after_every_task(two_ranks, method):
    """Each rank hashed everything its method object holds (tensors, generators, statistics) after each task — two
    trained, one resumed (baselines: two) — and the hashes agree; the run recorded the same for every rank."""
    _, ranks = two_ranks
    own = [r[method]["digests"] for r in ranks]
    assert len(own[0]) == (2 if method in dist_worker.NO_RESUME else 3)
    assert own[0] == own[1]
    assert all(len(set(d)) == 1 for d in ranks[0][method]["all_digests"])
    assert len({d for d in own[0]}) == len(own[0])  # a real digest of the state: it changes with every task


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_rank0_writes_a_valid_artifact_and_the_method_keeps_its_guarantee(two_ranks, method):
    """The artifact rank 0 wrote loads (every checksum verified), materialises to the accuracies the 2 ranks
    evaluated (sharded, counts summed) on one process, and the method's property holds; the resumed run appended a
    task with earlier tasks verified bit-identical (or, for RGO, their heads) by `artifact.append_task`."""
    out, _ = two_ranks
    folders = [out / method] + ([] if method in dist_worker.NO_RESUME else [out / f"{method}-resumed"])
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        assert results["distributed"]["world_size"] == 2 and results["distributed"]["per_rank_batch"] == \
            [len(p) for p in np.array_split(np.arange(results["config"]["batch_size"]), 2)]
        with artifact.load(folder / "model.edgecl") as art:
            packed = art.to_packed()
        stream = make_stream(dist_worker.STREAM, packed.n_tasks)
        assert [engine.accuracy(packed, t, stream.tasks[t]) for t in range(packed.n_tasks)] == \
            results["acc_matrix"][-1]
        if method in NO_FORGETTING:
            assert results["bwt"] == 0.0
    if method not in dist_worker.NO_RESUME:
        resumed = json.loads((out / f"{method}-resumed" / "results.json").read_text())
        first = json.loads((out / method / "results.json").read_text())
        assert resumed["resumed_at_task"] == 2 and len(resumed["acc_matrix"]) == 3
        if method != "rgo":  # old tasks' rows stay exactly where they were
            assert resumed["acc_matrix"][2][:2] == first["acc_matrix"][1]


@pytest.mark.slow
@pytest.mark.parametrize("method,statistic", [("agscl", "omega"), ("halrp", "importance"), ("rgo", "projection"),
                                              ("finetune", "running_stats")])
def test_a_statistic_over_two_ranks_is_the_one_process_statistic(two_ranks, method, statistic):
    """On the same weights, each method's statistic over the task's data — AGS-CL's Ω (sums and counts
    all-reduced), HALRP's gradient importances (each global batch's gradient all-reduced before squaring), RGO's
    projection update (curvature vectors all-gathered), BatchNorm recalibration (statistics of the global batch) —
    is bit-identical on both ranks and equals one process's within float summation order."""
    out, ranks = two_ranks
    mine = [np.array(r[method]["statistics"][statistic]) for r in ranks]
    assert np.array_equal(mine[0], mine[1])
    one = np.array(dist_worker.dist_equivalence.statistics(method, str(out / method / "model.edgecl"),
                                                           dist_worker.STREAM)[statistic])
    assert not distributed.active() and mine[0].shape == one.shape and np.abs(one).max() > 0
    np.testing.assert_allclose(mine[0], one, rtol=1e-4, atol=1e-6 * np.abs(one).max())


@pytest.mark.slow
def test_ranks_that_read_different_data_are_refused_before_training(two_ranks):
    out, ranks = two_ranks
    for r, mine in enumerate(ranks):
        assert mine["mismatch_error"].startswith(f"rank {r}: the method, settings, stream or resumed model differs "
                                                 "across ranks"), mine["mismatch_error"]
    assert not (out / "mismatch" / "model.edgecl").exists()


@pytest.mark.slow
def test_edgecl_train_nproc_2_trains_what_one_process_trains(tmp_path):
    """The CLI starts 2 ranks through torch's launcher; rank 0 alone prints and writes; with the same data order,
    the 2-rank run (per-rank batch 16) matches one process at batch 32."""
    common = ["train", "--method", "lps", "--tasks", "2", "--set", "epochs=1", "--no-progress"]
    one = edgecl(*common, "--out", str(tmp_path / "one"))
    two = edgecl(*common, "--nproc", "2", "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("ACC ") == 1 and "2 ranks (gloo)" in two.stdout
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert "distributed" not in a and b["distributed"]["per_rank_batch"] == [16, 16]
    assert np.allclose(sum(a["acc_matrix"], []), sum(b["acc_matrix"], []), atol=0.01)
    assert b["bwt"] == 0.0


@pytest.mark.slow
def test_a_rank_that_fails_stops_the_job_with_its_error(tmp_path):
    """Rank 0 alone checks --out (it alone writes) and fails before training; its error, naming it, is shown, the
    waiting rank stops, the exit code is the failed rank's, and nothing is written."""
    out = tmp_path / "taken"
    out.write_text("a file, not a folder")
    done = edgecl("train", "--method", "finetune", "--tasks", "2", "--set", "epochs=1", "--nproc", "2",
                  "--out", str(out))
    assert done.returncode == 2
    assert "rank 0 of 2 failed: UsageError: rank 0: --out" in done.stderr and "is not a folder" in done.stderr
    assert out.read_text() == "a file, not a folder"


@pytest.mark.slow
def test_a_rank_killed_mid_training_leaves_no_model(tmp_path):
    """A rank killed (as the out-of-memory killer would) while training: the launcher stops the other rank (or its
    collective fails first and it stops with one line, not a backend traceback), names the killed rank, and no file
    appears."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgecl", "train", "--method", "lps", "--tasks", "3", "--set",
                             "epochs=4", "--no-progress", "--nproc", "2", "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("edgecl: lps on")  # rank 0 is training
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        assert len(ranks) == 1
        time.sleep(0.5)
        ranks[0].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "rank 1 of 2 was killed by signal 9" in err
    assert "Traceback" not in err  # rank 0 was stopped by the launcher, or stopped itself with one line
    assert not out.exists()


# -- one process: the same code as before, the helpers are the identity -------------------------------------------

def test_alone_the_distributed_helpers_change_nothing():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    index = torch.arange(7)
    assert distributed.local_part(index) is index
    loss = torch.tensor(0.25)
    assert distributed.weighted(loss, 3, 7) is loss
    grads = [torch.ones(3), torch.zeros(2)]
    assert distributed.all_sum(grads) is grads
    rows = {"w": torch.ones(4, 3)}
    assert distributed.gather_rows(rows) is rows
    assert distributed.check_identical("abc", "x") == ["abc"] and distributed.from_main({"a": 1}) == {"a": 1}
    with distributed.joined("cpu") as world:
        assert world.size == 1 and world.is_main and world.device("cuda") == "cuda"
    assert distributed.World(1, 4, 1).device("cuda") == "cuda:1"
    assert distributed.World(0, 4).describe(10)["per_rank_batch"] == [3, 3, 2, 2]


def test_the_state_digest_sees_tensors_generators_and_helper_objects_but_not_timings():
    class Helper:
        def __init__(self):
            self.p = torch.eye(3, dtype=torch.float64)

    class State:
        def __init__(self):
            self.weights = {"fc.weight": torch.zeros(2, 3)}
            self.mask = np.zeros(4, bool)
            self.gen = torch.Generator().manual_seed(1)
            self.proj = {"fc": Helper()}
            self.importance = [{"fc": 0.5}]
            self.train_seconds = [1.0]

    base = distributed.state_digest(State())
    changes = [lambda s: s.weights["fc.weight"].__setitem__((0, 0), -0.0), lambda s: s.mask.__setitem__(3, True),
               lambda s: torch.rand(1, generator=s.gen), lambda s: s.proj["fc"].p.__setitem__((2, 2), 1 + 1e-16 * 3),
               lambda s: s.importance[0].__setitem__("fc", 0.5000001)]
    for change in changes:
        state = State()
        change(state)
        assert distributed.state_digest(state) != base
    state = State()
    state.train_seconds.append(2.0)
    assert distributed.state_digest(state) == base


def test_a_rank_command_line_parses_back_to_the_same_request():
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    argv = ["--method", "rgo", "--set", "epochs=2", "--set", "lr=-0.5", "--seed=3", "--no-progress", "--nproc", "4",
            "--input-shape", "3,16,16", "--out", "x y", "--arch", "net.py:build", "--arch-arg", "width=8",
            "--arch-arg", "depth=2", "--init-weights", "module"]
    args = parser.parse_args(argv)
    child = train_command.rank_argv(args)
    assert child[0] == "train" and not any(a.startswith("--nproc") for a in child)
    again = parser.parse_args(child[1:])
    assert {**vars(again), "nproc": 4} == vars(args)


def test_nproc_is_checked_once_before_any_rank_starts(tmp_path):
    """Bad values and requests are refused by the launching command itself, in well under torch's start-up."""
    for argv, needle in [(["--nproc", "0"], "argument --nproc: must be in [1, 256]"),
                         (["--nproc", "2", "--set", "epochs=-1"], "epochs")]:
        done = edgecl("train", "--method", "lps", *argv, "--out", str(tmp_path / "x"))
        assert done.returncode == 2 and needle in done.stderr and not (tmp_path / "x").exists()
    done = subprocess.run([sys.executable, "-m", "edgecl", "train", "--method", "lps", "--nproc", "2", "--out",
                           str(tmp_path / "x")], env={**ENV, "WORLD_SIZE": "2"}, capture_output=True, text=True)
    assert done.returncode == 2 and "under torchrun leave it out" in done.stderr


def test_out_must_be_a_writable_folder_before_training_starts(tmp_path):
    taken = tmp_path / "file"
    taken.write_text("")
    done = edgecl("train", "--method", "lps", "--out", str(taken))
    assert done.returncode == 2 and "exists and is not a folder" in done.stderr and "[lps]" not in done.stdout


def test_a_rank_leaves_with_its_exit_code_and_its_output_flushed():
    """Ranks end with `os._exit` (edgecl/__main__.py) after flushing: the code and everything printed survive."""
    env = {**os.environ, "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-m", "edgecl"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2  # no command: help, exit 2
    assert "usage: edgecl" in done.stdout and "COMMAND" in done.stdout
