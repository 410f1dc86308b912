"""The continual-learning loop and the `edgecl train` command on real digits."""
import argparse
import importlib
import json
import subprocess
import sys
import textwrap

import pytest

from edgecl.arch import preset
from edgecl import cli
from edgecl.cli import main
from edgecl.errors import UsageError
from edgecl.train import engine, registry
from edgecl.train.compute import DEFAULT_THREADS
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext


@pytest.fixture(scope="module")
def stream():
    return make_stream("permuted-digits", 3)


@pytest.mark.slow  # two methods trained 5 epochs on 3 tasks
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


# `edgecl` in a subprocess where torch and the data libraries cannot be imported: a request refused with exit 2 here
# was refused before either was needed.
NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "sklearn", "scipy", "matplotlib"}:
                raise ImportError(f"{name} imported before the request was checked")

    sys.meta_path.insert(0, Refuse())
    from edgecl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _edgecl_without_torch(argv: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("argv, needle", [
    (["--method", "ewc"], "unknown method 'ewc'"),
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--method", "lps", "--set", "epochs=abc"], "LPSConfig: epochs must be an integer, got 'abc'"),
    (["--method", "lps", "--set", "alpha=2"], "LPSConfig: alpha must be in (0, 1], got 2"),
    (["--method", "halrp", "--set", "prune=sometimes"], "HALRPConfig: prune must be one of"),
    (["--method", "halrp", "--set", "epochs=1"], "HALRP needs epochs >= 2 (--set epochs=2)"),  # a user's 'small epochs'
    (["--method", "stl", "--set", "epoch=3"], "unknown config fields ['epoch']"),
    (["--method", "stl", "--stream", "cifar"], "unknown stream 'cifar'"),
    (["--method", "stl", "--set", "epochs"], "KEY=VALUE"),
    (["--method", "stl", "--arch", "vgg"], "unknown architecture 'vgg'"),
    (["--method", "stl", "--arch", "net.py"], "net.py is a Python file: add the factory that builds your module"),
    (["--method", "stl", "--arch", "missing.json"], "missing.json: file not found"),
    (["--method", "stl", "--input-shape", "3,x"], "--input-shape expects channels,height,width"),
    (["--method", "stl", "--input-shape", "2,32,32"], "1 or 3 channels"),
    (["--method", "stl", "--stream", "synthetic", "--input-shape", "3,32,32"], "applies to the digit streams"),
    (["--method", "stl", "--device", "tpu"], "--device must be cpu or cuda"),
    (["--method", "stl", "--threads", "0"], "argument --threads: must be in [1, 1024]"),
    (["--method", "stl", "--tasks", "0"], "the number of tasks must be 1-65536"),
    (["--method", "stl", "--seed", "3", "--set", "seed=7"], "--seed 3 and --set seed=7 disagree"),
])
def test_bad_input_exits_2_before_torch_or_data(argv, needle, tmp_path):
    proc = _edgecl_without_torch(["train", *argv, "--out", "D"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "D").exists()


def test_a_good_request_does_reach_torch(tmp_path):
    """The control for the test above: torch really is refused in that subprocess."""
    proc = _edgecl_without_torch(["train", "--method", "stl", "--out", "D"], tmp_path)
    assert proc.returncode != 0 and "imported before the request was checked" in proc.stderr


def test_help_shows_the_whole_description(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(cli.__doc__.split()) in text


def test_every_training_command_has_the_same_threads_option():
    helps = set()
    for name in ("train", "demo", "compare"):
        parser = argparse.ArgumentParser()
        importlib.import_module(f"edgecl.commands.{name}").add_arguments(parser)
        action = next(a for a in parser._actions if a.dest == "threads")
        assert action.default == DEFAULT_THREADS == 1 and action.type("1024") == 1024
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[1, 1024\]"):
            action.type("1025")
        helps.add(action.help)
    assert len(helps) == 1


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_importing_edgecl_is_light():
    code = "import sys, edgecl, edgecl.deltas, edgecl.arch; print(any(m in sys.modules for m in ('torch', 'onnx')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow  # mobilenet_v2 at 3×32×32, two tasks
def test_train_a_torchvision_network_on_resized_digits_and_run_it(tmp_path, capsys):
    """`--arch module:factory --input-shape`: the user's network goes in, the artifact runs in the runtime."""
    import numpy as np

    from edgecl.runtime import TaskRuntime

    out = tmp_path / "tv"
    rc = main(["train", "--method", "stl", "--arch", "torchvision.models:mobilenet_v2", "--input-shape", "3,32,32",
               "--stream", "split-digits", "--tasks", "2", "--set", "epochs=1", "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["arch"] == "mobilenet_v2" and len(data["acc_matrix"]) == 2
    assert json.loads((out / "spec.json").read_text())["feature_dim"] == 1280
    stream = make_stream("split-digits", 2, 0, (3, 32, 32))
    with TaskRuntime(str(out / "model.edgecl")) as rt:
        for t, task in enumerate(stream.tasks):
            acc = float(np.mean(rt.infer(task.x_test, task=t).argmax(1) == task.y_test))
            assert abs(acc - data["acc_matrix"][-1][t]) < 1e-9
    assert "mobilenet_v2" in capsys.readouterr().out


def test_factory_errors_exit_2_with_the_reason(tmp_path, capsys):
    trunk = tmp_path / "trunk.py"
    trunk.write_text("import torch\n\ndef conv_only():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))\n")
    for argv, needle in ((["--arch", "torchvision.models:nosuch"], "no callable 'nosuch'"),
                         (["--arch", "timm:nosuch"], "timm has no model 'nosuch'"),
                         (["--arch", f"{trunk}:conv_only", "--no-classifier"], "flat feature vector"),
                         (["--arch", f"{trunk}:conv_only"], "not an nn.Linear classifier")):
        rc = main(["train", "--method", "stl", *argv, "--input-shape", "3,32,32", "--stream", "split-digits",
                   "--out", str(tmp_path / "x")])
        assert rc == 2 and needle in capsys.readouterr().err


def test_resume_keeps_the_artifacts_architecture(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--method", "lps", "--arch", "lenet", "--stream", "split-digits", "--tasks", "1",
                 "--set", "epochs=1", "--no-progress", "--out", str(first)]) == 0
    assert main(["train", "--method", "lps", "--resume", str(first / "model.edgecl"), "--stream", "split-digits",
                 "--tasks", "1", "--no-progress", "--out", str(second)]) == 0
    assert json.loads((second / "results.json").read_text())["arch"] == "lenet"
    third = tmp_path / "c"  # the saved spec is an --arch of its own
    assert main(["train", "--method", "stl", "--arch", str(first / "spec.json"), "--stream", "split-digits",
                 "--tasks", "1", "--set", "epochs=1", "--no-progress", "--out", str(third)]) == 0


def test_a_diverging_run_stops_with_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "d"
    rc = main(["train", "--method", "finetune", "--stream", "split-digits", "--tasks", "1", "--set", "lr=1e30",
               "--set", "epochs=2", "--no-progress", "--out", str(out)])
    assert rc == 2 and "training diverged on task 'digits01'" in capsys.readouterr().err
    assert not (out / "model.edgecl").exists() and not (out / "results.json").exists()
