"""Lifelong append end to end: `edgecl train --resume` adds tasks to a deployed artifact, and every earlier task's
runtime outputs stay bit-identical."""
import numpy as np
import pytest

from edgecl.cli import main
from edgecl.runtime import TaskRuntime
from edgecl.train.data import make_stream

QUICK = {"lps": ["--set", "epochs=2"], "halrp": ["--set", "epochs=2"], "agscl": ["--set", "epochs=3"]}


def _outputs(path, tasks, x):
    with TaskRuntime(str(path)) as rt:
        return [rt.infer(x, task=t) for t in range(tasks)]


@pytest.mark.parametrize("method", ["lps", "halrp", "agscl"])
def test_resume_keeps_earlier_tasks_bit_identical(method, tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    assert main(["train", "--method", method, "--tasks", "2", "--no-progress", *QUICK[method],
                 "--out", str(first)]) == 0
    assert main(["train", "--method", method, "--resume", str(first / "model.edgecl"), "--tasks", "1",
                 "--no-progress", "--out", str(second)]) == 0
    x = make_stream("permuted-digits", 3).tasks[2].x_test[:64]
    before = _outputs(first / "model.edgecl", 2, x)
    after = _outputs(second / "model.edgecl", 3, x)
    for t in range(2):
        assert np.array_equal(before[t], after[t]), f"task {t} changed"
    assert after[2].shape == (64, 10)


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


def test_resume_of_a_method_without_resume_is_refused(tmp_path, capsys):
    assert main(["train", "--method", "rgo", "--tasks", "1", "--set", "epochs=1", "--no-progress",
                 "--out", str(tmp_path / "v1")]) == 0
    capsys.readouterr()
    rc = main(["train", "--method", "rgo", "--resume", str(tmp_path / "v1" / "model.edgecl"), "--tasks", "1",
               "--out", str(tmp_path / "v2")])
    assert rc == 2
    assert "resume" in capsys.readouterr().err
