"""The continual-learning loop and the `edgecl train` command on real digits."""
import json
import subprocess
import sys

import pytest

from edgecl.arch import preset
from edgecl.cli import main
from edgecl.errors import UsageError
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext


@pytest.fixture(scope="module")
def stream():
    return make_stream("permuted-digits", 3)


def test_finetune_forgets_and_stl_does_not(stream):
    arch = preset("mlp")
    ft = engine.run(registry.create("finetune", arch, {"epochs": 5}), stream, TrainContext(progress=False))
    stl = engine.run(registry.create("stl", arch, {"epochs": 5}), stream, TrainContext(progress=False))
    ft_json, stl_json = ft.to_json(), stl.to_json()
    assert ft_json["bwt"] <= -0.05, ft_json["acc_matrix"]
    assert stl_json["bwt"] == 0.0
    assert all(len(row) == i + 1 for i, row in enumerate(ft_json["acc_matrix"]))
    assert all(0.0 <= v <= 1.0 for row in ft_json["acc_matrix"] for v in row)
    assert stl_json["acc"] > 0.85


def test_predict_rejects_task_out_of_range(stream):
    res = engine.run(registry.create("finetune", preset("mlp"), {"epochs": 1}), make_stream("split-digits", 1),
                     TrainContext(progress=False))
    with pytest.raises(UsageError, match="out of range"):
        engine.predict(res.packed, 4, stream.tasks[0].x_test)


def test_config_fields_are_checked():
    with pytest.raises(UsageError, match="unknown config fields"):
        registry.create("finetune", preset("mlp"), {"epoch": 3})
    with pytest.raises(UsageError, match="unknown method"):
        registry.create("ewc", preset("mlp"))


def test_lenet_needs_images():
    with pytest.raises(UsageError, match="image inputs"):
        preset("lenet", (64,))


def test_train_command_writes_results_and_artifact(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--method", "finetune", "--stream", "split-digits", "--tasks", "2", "--set", "epochs=2",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    for key in ("method", "stream", "acc_matrix", "acc", "bwt"):
        assert key in data
    assert data["method"] == "finetune" and data["stream"] == "split-digits"
    assert (out / "acc_matrix.png").stat().st_size > 1000
    assert (out / "model.edgecl").exists()
    assert "ACC" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--method", "ewc", "--out", "x"], "unknown method 'ewc'"),
    (["train", "--method", "stl", "--stream", "cifar", "--out", "x"], "unknown stream 'cifar'"),
    (["train", "--method", "stl", "--set", "epochs", "--out", "x"], "KEY=VALUE"),
])
def test_bad_input_exits_2_with_message(argv, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgecl.cli", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_importing_edgecl_is_light():
    code = "import sys, edgecl, edgecl.deltas, edgecl.arch; print(any(m in sys.modules for m in ('torch', 'onnx')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
