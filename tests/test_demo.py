"""`edgecl demo` end to end on two tasks, and its device-side check on a quickly trained model."""
import json

import pytest

from edgecl.cli import main
from edgecl.demo import run_on_runtime
from edgecl.train.pipeline import ARTIFACT_NAME, train_and_write


def test_runtime_check_passes_on_a_trained_artifact_and_fails_on_a_wrong_claim(tmp_path, capsys):
    quick = {"epochs": 1, "admm_epochs": 1, "final_epochs": 1}
    results = train_and_write("lps", "permuted-digits", str(tmp_path), n_tasks=2, overrides=quick, threads=1,
                              progress=False, log=lambda _line: None)
    path = str(tmp_path / ARTIFACT_NAME)
    assert run_on_runtime(path, results, 2, "32MiB")
    assert "runtime accuracy equals training-side accuracy on every task" in capsys.readouterr().out
    wrong = {**results, "acc_matrix": results["acc_matrix"][:-1] + [[a - 0.01 for a in results["acc_matrix"][-1]]]}
    assert not run_on_runtime(path, wrong, 2, "32MiB")
    assert "MISMATCH" in capsys.readouterr().out
    # a budget the model cannot meet: every task is still replayed, and the audit says it does not fit
    assert not run_on_runtime(path, results, 2, "1MiB")
    printed = capsys.readouterr().out
    assert "replaying the tasks without a budget" in printed and "equals training-side accuracy" in printed
    assert "DOES NOT FIT" in printed


def test_demo_refuses_a_malformed_budget_before_training(tmp_path, capsys):
    assert main(["demo", "--tasks", "2", "--budget", "lots", "--out", str(tmp_path / "d")]) == 2
    assert "lots" in capsys.readouterr().err and not (tmp_path / "d").exists()


@pytest.mark.slow  # LPS at its demo settings: 50 epochs per task
def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tasks", "2", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in ("== 1/4 train", "== 2/4 pack", "== 3/4 export", "== 4/4 run", "FITS", "demo finished"):
        assert step in printed
    assert json.loads((out / "results.json").read_text())["config"]["alpha"] == 0.09
    assert (out / "onnx" / "index.json").exists() and (out / "acc_matrix.png").exists()
