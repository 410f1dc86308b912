"""Lifelong append end to end: `edgecl train --resume` adds tasks to a deployed artifact, and every earlier task's
runtime outputs stay bit-identical."""
import json
import os
import re

import numpy as np
import pytest

from edgecl import artifact
from edgecl.arch import preset
from edgecl.cli import main
from edgecl.errors import UsageError
from edgecl.runtime import TaskRuntime
from edgecl.train.data import make_stream
from edgecl.train.methods.rgo import RGO, RGOConfig
from edgecl.train.protocol import TrainContext

QUICK = {"lps": ["--set", "epochs=2"], "halrp": ["--set", "epochs=2"], "agscl": ["--set", "epochs=3"], "rgo": ["--set", "epochs=1"]}


def _outputs(path, tasks):
    """Each task's runtime outputs on its own test images."""
    stream = make_stream("permuted-digits", 3)
    with TaskRuntime(str(path)) as rt:
        return [rt.infer(stream.tasks[t].x_test, task=t) for t in range(tasks)]


@pytest.mark.slow  # train, then resume, per method
@pytest.mark.parametrize("method,arch", [("lps", "mlp"), ("halrp", "mlp"), ("agscl", "mlp"), ("rgo", "mlp"),
                                         ("lps", "resnet"), ("halrp", "resnet"), ("rgo", "resnet")])
def test_resume_keeps_earlier_tasks_bit_identical(method, arch, tmp_path):
    """On the resnet preset (a graph with residual adds and BatchNorm) too: per-task BatchNorm comes back from the
    artifact, and RGO's feature encoding follows the same channel groups after the resume."""
    first, second = tmp_path / "v1", tmp_path / "v2"
    assert main(["train", "--method", method, "--arch", arch, "--tasks", "2", "--no-progress", *QUICK[method],
                 "--out", str(first)]) == 0
    assert main(["train", "--method", method, "--arch", arch, "--resume", str(first / "model.edgecl"), "--tasks",
                 "1", "--no-progress", "--out", str(second)]) == 0
    before = _outputs(first / "model.edgecl", 2)
    after = _outputs(second / "model.edgecl", 3)
    if method == "rgo":  # one shared trunk keeps learning: heads are kept exactly, outputs move a little
        for t in range(2):
            old_head = artifact.load(first / "model.edgecl").materialize(t)["head.weight"]
            assert np.array_equal(old_head, artifact.load(second / "model.edgecl").materialize(t)["head.weight"])
            # BatchNorm convnets drift more under RGO than the MLP (README: graph networks): 0.898 measured here
            assert np.mean(before[t].argmax(1) == after[t].argmax(1)) > (0.9 if arch == "mlp" else 0.85)
    else:
        for t in range(2):
            assert np.array_equal(before[t], after[t]), f"task {t} changed"
    assert after[2].shape[1] == 10


@pytest.mark.parametrize("argv, needle", [
    (["--method", "halrp", "--tasks", "1"], "made by method 'lps'"),
    (["--method", "lps", "--arch", "lenet", "--tasks", "1"], "architecture 'mlp'"),
    (["--method", "lps"], "--tasks N"),
    (["--method", "lps", "--tasks", "1", "--set", "lr=0.1"], "drop --set"),
])
def test_resume_refuses_other_method_or_arch(argv, needle, tmp_path, capsys):
    assert main(["train", "--method", "lps", "--tasks", "1", "--set", "epochs=1", "--no-progress",
                 "--out", str(tmp_path / "v1")]) == 0
    capsys.readouterr()
    rc = main(["train", "--resume", str(tmp_path / "v1" / "model.edgecl"), *argv, "--out", str(tmp_path / "v2")])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_rgo_resume_needs_its_training_state(tmp_path, capsys):
    """RGO's projection matrices are training state kept beside the artifact; without them it must refuse."""
    assert main(["train", "--method", "rgo", "--tasks", "1", "--set", "epochs=1", "--no-progress",
                 "--out", str(tmp_path / "v1")]) == 0
    state = tmp_path / "v1" / "model.edgecl.state"
    assert state.stat().st_size > 0
    state.unlink()
    capsys.readouterr()
    rc = main(["train", "--method", "rgo", "--resume", str(tmp_path / "v1" / "model.edgecl"), "--tasks", "1",
               "--out", str(tmp_path / "v2")])
    assert rc == 2
    assert f"resumes from its training state {state}, which is missing" in capsys.readouterr().err


def test_a_stale_state_left_by_another_model_neither_stays_nor_blocks(tmp_path, capsys):
    """An RGO run, then an LPS run into the same folder: the RGO state no longer belongs to anything there and is
    removed with the new model (side files follow the model); a state planted beside an LPS artifact is not read
    by its resume, and a method that cannot resume says so, not something about a state."""
    out = tmp_path / "m"
    assert main(["train", "--method", "rgo", "--tasks", "1", "--set", "epochs=1", "--no-progress",
                 "--out", str(out)]) == 0
    rgo_state = (out / "model.edgecl.state").read_bytes()
    _train(out)
    assert not (out / "model.edgecl.state").exists()
    (out / "model.edgecl.state").write_bytes(rgo_state)
    capsys.readouterr()
    assert main(["train", "--method", "lps", "--resume", str(out / "model.edgecl"), "--tasks", "1", "--no-progress",
                 "--out", str(tmp_path / "m2")]) == 0
    assert main(["train", "--method", "finetune", "--tasks", "1", "--set", "epochs=1", "--no-progress",
                 "--out", str(tmp_path / "f")]) == 0
    (tmp_path / "f" / "model.edgecl.state").write_bytes(rgo_state)
    capsys.readouterr()
    assert main(["train", "--method", "finetune", "--resume", str(tmp_path / "f" / "model.edgecl"), "--tasks", "1",
                 "--out", str(tmp_path / "f2")]) == 2
    assert "cannot resume" in capsys.readouterr().err


def _train(out, *extra):
    assert main(["train", "--method", "lps", "--tasks", "1", "--set", "epochs=1", "--no-progress", *extra,
                 "--out", str(out)]) == 0


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_into_a_used_folder_replaces_its_model_in_one_last_rename(tmp_path, monkeypatch, capsys):
    """Killed before the new model's rename, the folder is exactly as it was (no copy of the resumed artifact over
    its model, no side files for the new model); a finished run writes the model first and results.json last."""
    from edgecl import io
    from edgecl.artifact import writer

    first, used = tmp_path / "first", tmp_path / "used"
    _train(first)
    _train(used, "--seed", "1")
    before = _files(used)

    def killed(tmp, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "commit", killed)
    argv = ["train", "--method", "lps", "--resume", str(first / "model.edgecl"), "--tasks", "1", "--no-progress",
            "--out", str(used)]
    assert main(argv) == 130
    after = {k: v for k, v in _files(used).items() if not k.endswith(".tmp")}
    assert after == before, "the folder changed before the new model was in place"
    monkeypatch.undo()
    order = []
    for module in (io, writer):
        real = module.commit
        monkeypatch.setattr(module, "commit", lambda tmp, path, real=real: (order.append(os.path.basename(path)),
                                                                                real(tmp, path)))
    capsys.readouterr()
    assert main(argv) == 0
    assert order == ["model.edgecl", "spec.json", "acc_matrix.png", "results.json"], order
    assert "verified: tasks 0-0 of" in capsys.readouterr().out
    assert artifact.load(used / "model.edgecl").n_tasks == 2


def test_a_training_state_from_another_model_version_is_refused(tmp_path, capsys):
    """RGO's state is written just after the model; a run stopped between the two leaves a state the next
    --resume must not use with the new model."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for out, seed in ((v1, "0"), (v2, "1")):
        assert main(["train", "--method", "rgo", "--tasks", "1", "--set", "epochs=1", "--no-progress", "--seed", seed,
                     "--out", str(out)]) == 0
    (v2 / "model.edgecl.state").write_bytes((v1 / "model.edgecl.state").read_bytes())  # v1's state beside v2
    capsys.readouterr()
    rc = main(["train", "--method", "rgo", "--resume", str(v2 / "model.edgecl"), "--tasks", "1", "--out",
               str(tmp_path / "v3")])
    assert rc == 2 and "belongs to another version" in capsys.readouterr().err


def _stream_file(path, n_tasks):
    """The first n tasks of the synthetic stream as a stream file (its tasks are named after the file)."""
    tasks = make_stream("synthetic", n_tasks).tasks
    np.savez(path, **{f"task{i}_{k}": getattr(t, k) for i, t in enumerate(tasks)
                      for k in ("x_train", "y_train", "x_test", "y_test")})
    return str(path)


def test_resume_scores_the_artifacts_tasks_on_their_own_data_from_a_stream_file(tmp_path, capsys):
    """The file holds the old tasks then the new ones: --tasks 1 on the 1-task artifact takes its first 2, row 0
    of the accuracy matrix is the resumed model on task 0's own test split, and one task is added."""
    path = _stream_file(tmp_path / "mine.npz", 3)
    _train(tmp_path / "v1", "--stream", path)
    capsys.readouterr()
    assert main(["train", "--method", "lps", "--resume", str(tmp_path / "v1" / "model.edgecl"), "--stream", path,
                 "--tasks", "1", "--no-progress", "--out", str(tmp_path / "v2")]) == 0
    first = json.loads((tmp_path / "v1" / "results.json").read_text())
    second = json.loads((tmp_path / "v2" / "results.json").read_text())
    assert second["tasks"] == ["mine-0", "mine-1"] and artifact.load(tmp_path / "v2" / "model.edgecl").n_tasks == 2
    assert second["acc_matrix"][0] == first["acc_matrix"][0]


@pytest.mark.parametrize("stream, extra, needle", [
    ("new.npz", ["--tasks", "1"], "holds 1 task, fewer than the 2 asked for: {v1} holds 1 task and --tasks 1 adds 1, "
                                  "so the stream must hold 2: the artifact's tasks first"),   # only the new task
    ("mine.npz", ["--tasks", "5"], "holds 3 tasks, fewer than the 6 asked for"),             # used to add 1 of 5
    ("other.npz", ["--tasks", "1"], "its task 0 is 'mine-0' with 10 classes, the stream 'other' has 'other-0'"),
    (None, ["--tasks", "1"], "its task 0 is 'mine-0' with 10 classes, the stream 'permuted-digits' has 'perm0'"),
    ("synthetic", ["--tasks", "1"], "the stream 'synthetic' has 'syn0'"),
    ("mine.npz", ["--tasks", "1", "--seed", "3"], "was trained with seed 0; --resume keeps it"),
])
def test_resume_refuses_a_stream_that_does_not_hold_the_artifacts_tasks_first(tmp_path, capsys, stream, extra,
                                                                              needle):
    """Old tasks were scored on whatever the stream's first tasks were (another file's, the default stream's), and a
    stream of only the new task 'verified' the artifact, printed ACC 0.00% and added nothing, with exit 0."""
    for name, n in (("mine.npz", 3), ("new.npz", 1), ("other.npz", 3)):
        _stream_file(tmp_path / name, n)
    v1 = tmp_path / "v1" / "model.edgecl"
    _train(tmp_path / "v1", "--stream", str(tmp_path / "mine.npz"))
    capsys.readouterr()
    where = [] if stream is None else ["--stream", stream if stream == "synthetic" else str(tmp_path / stream)]
    assert main(["train", "--method", "lps", "--resume", str(v1), *where, *extra, "--no-progress",
                 "--out", str(tmp_path / "v2")]) == 2
    out, err = capsys.readouterr()
    assert needle.format(v1=v1) in err and "Traceback" not in err
    assert "edgecl: lps on" not in out and not (tmp_path / "v2").exists()


def test_resume_names_each_problem_of_the_training_state():
    """A damaged projection state is refused for what is wrong with it: dtype, shape or non-finite values."""
    method = RGO(preset("mlp"), RGOConfig(epochs=1))
    method.learn_task(0, make_stream("permuted-digits", 1).tasks[0], TrainContext(progress=False))
    packed, state = method.pack(), method.training_state()
    name = next(iter(state))
    shape = state[name].shape
    for bad, message in ((state[name].astype(np.int8), "dtype int8, expected float64"),
                         (state[name][:-1], f"has shape {(shape[0] - 1, *shape[1:])}, expected {shape}"),
                         (np.where(np.eye(*shape, dtype=bool), np.nan, state[name]), f"{shape[0]} NaN/inf values")):
        with pytest.raises(UsageError, match=re.escape(message)):
            RGO(preset("mlp"), RGOConfig(epochs=1)).resume(packed, {**state, name: bad})
    RGO(preset("mlp"), RGOConfig(epochs=1)).resume(packed, state)  # the state as saved resumes


def test_a_seed_given_by_set_seeds_the_stream_too_so_a_resume_scores_old_tasks_on_their_data(tmp_path, capsys):
    """`--set seed=5` seeds the method and the built-in stream alike; the resume rebuilds the stream with the
    artifact's seed 5, so LPS's bit-identical old task scores exactly what it scored when it was learned."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    assert main(["train", "--method", "lps", "--tasks", "2", "--set", "epochs=1", "--set", "seed=5",
                 "--no-progress", "--out", str(v1)]) == 0
    assert main(["train", "--method", "lps", "--resume", str(v1 / "model.edgecl"), "--tasks", "1", "--no-progress",
                 "--out", str(v2)]) == 0
    before = json.loads((v1 / "results.json").read_text())["acc_matrix"]
    after = json.loads((v2 / "results.json").read_text())["acc_matrix"]
    assert after[:2] == before and after[2][:2] == before[1]


def test_rotated_digits_cannot_be_resumed_and_says_why(tmp_path, capsys):
    v1 = tmp_path / "v1"
    assert main(["train", "--method", "lps", "--stream", "rotated-digits", "--tasks", "2", "--set", "epochs=1",
                 "--no-progress", "--out", str(v1)]) == 0
    capsys.readouterr()
    assert main(["train", "--method", "lps", "--stream", "rotated-digits", "--resume", str(v1 / "model.edgecl"),
                 "--tasks", "1", "--out", str(tmp_path / "v2")]) == 2
    assert "spreads its angles over the whole task count" in capsys.readouterr().err
