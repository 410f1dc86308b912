"""The device side must run where torch does not exist: a subprocess in which importing torch (or edgecl.train, or
any train-only dependency) fails saves and loads an artifact, switches and infers, checks the result against
numpy's own forward pass, and audits it."""
from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = {"torch", "tqdm", "sklearn", "scipy", "matplotlib"}  # not in a runtime-only install

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or name.startswith("edgecl.train"):
                raise ImportError(f"blocked on the device: {name}")
            return None

    sys.meta_path.insert(0, Block())
""")

SCRIPT = BLOCKER + textwrap.dedent("""
    import numpy as np
    from edgecl.arch import preset
    from edgecl.deltas import materialize
    from edgecl.runtime import TaskRuntime
    from edgecl.runtime.audit import audit
    from edgecl.synthetic import random_packed

    try:
        import torch  # noqa: F401
        raise SystemExit("torch import was not blocked")
    except ImportError:
        pass
    import os, tempfile
    from edgecl import artifact

    packed = random_packed(preset("mlp"), n_tasks=3, classes=(10, 4))
    path = os.path.join(tempfile.mkdtemp(), "model.edgecl")
    artifact.save(packed, path)
    runtime = TaskRuntime(path, cache_tasks=1)
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    for t in (1, 0, 2, 1):
        runtime.switch(t)
        w = materialize(packed, t)
        h = np.maximum(x.reshape(5, -1) @ w["fc1.weight"].T + w["fc1.bias"], 0)
        h = np.maximum(h @ w["fc2.weight"].T + w["fc2.bias"], 0)
        ref = h @ w["head.weight"].T + w["head.bias"]
        assert np.abs(runtime.infer(x) - ref).max() < 1e-4, t
    assert audit(path, "64MiB")["fits"]
    assert not any(m.split(".")[0] in BLOCKED or m.startswith("edgecl.train") for m in sys.modules)
    print("ok")
""")


def test_runtime_runs_without_torch():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_runtime_imports_only_the_device_side():
    """`edgecl.runtime` and its audit load neither torch nor the exporter, the trainer or the CLI commands."""
    code = ("import sys, edgecl.runtime, edgecl.runtime.audit\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'torch'\n"
            "       or m.startswith(('edgecl.export', 'edgecl.train', 'edgecl.commands'))]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _doctor(extra_blocked: str = "") -> subprocess.CompletedProcess:
    script = BLOCKER.replace('"matplotlib"}', '"matplotlib"' + (f', "{extra_blocked}"' if extra_blocked else "") + "}")
    script += "from edgecl.cli import main\nsys.exit(main(['doctor', '--json']))\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_doctor_checks_the_runtime_without_torch():
    """`edgecl doctor` on a device: real CPU check (switch + infer vs numpy), the fill the runtime will use, exit 0."""
    import json

    from edgecl.runtime import maskfill

    done = _doctor()
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["runtime_ready"] and report["cpu_check"] == "ok"
    assert report["auto"]["cpu"]["providers"] == ["CPUExecutionProvider"]
    assert report["masked_fill"]["implementation"] == maskfill.IMPLEMENTATION


def test_doctor_exits_1_when_onnxruntime_is_missing():
    import json

    done = _doctor("onnxruntime")
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert not report["runtime_ready"] and "cannot import onnxruntime" in report["onnxruntime"]["error"]


ABSENT = textwrap.dedent("""
    import importlib.abc, sys

    class Absent(importlib.abc.MetaPathFinder):  # as a runtime-only install: these packages do not exist
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "tqdm", "sklearn", "scipy", "matplotlib", "torchvision", "timm"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    from edgecl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_device_commands_run_and_train_says_what_to_install_without_torch(tmp_path):
    """On a device install (no torch, no training packages) the device commands run on a real artifact file, and
    `edgecl train`/`demo` exit 2 naming the missing package and the extra to install (they died with an import
    traceback, exit 1)."""
    import numpy as np
    from edgecl import artifact
    from edgecl.arch import preset
    from edgecl.synthetic import random_packed
    path = tmp_path / "model.edgecl"
    artifact.save(random_packed(preset("mlp"), n_tasks=2), path)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))

    def edgecl(*argv):
        return subprocess.run([sys.executable, "-c", ABSENT, *argv], capture_output=True, text=True, timeout=180)

    for argv in (["inspect", str(path)], ["audit", str(path), "--budget", "64MiB"],
                 ["run", str(path), "--task", "1", "--input", str(tmp_path / "x.npy")],
                 ["export", str(path), "--out", str(tmp_path / "onnx"), "--quiet"]):
        done = edgecl(*argv)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr[-2000:])
    for argv in (["train", "--method", "lps", "--out", str(tmp_path / "t")], ["demo", "--out", str(tmp_path / "d")]):
        done = edgecl(*argv)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (argv, done.stderr[-2000:])
        assert f"error: torch is not installed: `edgecl {argv[0]}` needs the 'train' extra" in done.stderr
