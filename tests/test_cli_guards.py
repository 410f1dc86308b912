"""What an attacker handed the CLI (issue: outputs over inputs, hostile .npy/.npz headers, unbounded flags, FIFOs,
broken pipes): each is a typed error naming the flag or file (exit 2), refused before the allocation or the long work,
never a traceback, a hang or a replaced input. Real files, real ONNX Runtime sessions, fresh processes where the
behaviour is the process's (exit codes on a closed pipe, memory peaks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
import zipfile

import numpy as np
import pytest
from cli_run import run_cli

import artifact_models as am
from edgecl import artifact
from edgecl.errors import ArtifactError, BudgetError, EdgeclWarning, UsageError
from edgecl.runtime import TaskRuntime
from edgecl.runtime.budget import parse_budget
from edgecl.runtime.inputs import load_input

X = np.random.default_rng(3).standard_normal((4, 1, 4, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("guards") / "model.edgecl"
    artifact.save(am.make("lps", seed=5, n_tasks=3), path)
    return str(path)


_run = run_cli


def _process(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "edgecl", *argv], capture_output=True, text=True, timeout=120,
                          env=env, **kw)


def _npy(path, descr: object, shape: tuple[int, ...], data: bytes) -> str:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(data)
    return str(path)


# ---------------------------------------------------------------- 1, 12: outputs never replace inputs

def test_outputs_that_are_an_input_are_refused(model, tmp_path, capsys):
    copy = tmp_path / "v.edgecl"
    copy.write_bytes(open(model, "rb").read())
    os.symlink(copy, tmp_path / "link.png")
    for plot in (copy, tmp_path / "link.png"):
        code, _, err = _run(capsys, "audit", str(copy), "--budget", "1GiB", "--plot", str(plot))
        assert code == 2 and "same file as the artifact" in err, err
    assert copy.read_bytes() == open(model, "rb").read()
    x = tmp_path / "x.npy"
    np.save(x, X)
    os.symlink(x, tmp_path / "xl.npy")
    for output in (x, tmp_path / "xl.npy", tmp_path / "xl"):  # xl becomes xl.npy, the link to the input
        code, _, err = _run(capsys, "run", model, "--task", "0", "--input", str(x), "--output", str(output))
        assert code == 2 and "--output" in err and "same file as the --input" in err, err
    np.testing.assert_array_equal(np.load(x), X)


def test_run_output_folder_empty_and_extension_case(model, tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, X)
    code, _, err = _run(capsys, "run", model, "--task", "0", "--input", str(x), "--output", str(tmp_path))
    assert code == 2 and "is a folder" in err and not (tmp_path.parent / f"{tmp_path.name}.npy").exists()
    code, _, err = _run(capsys, "run", model, "--task", "0", "--input", str(x), "--output", "")
    assert code == 2 and "argument --output: expected a path" in err
    code, out, _ = _run(capsys, "run", model, "--task", "0", "--input", str(x), "--output", str(tmp_path / "y.NPY"))
    assert code == 0 and np.load(tmp_path / "y.NPY").shape[0] == 4
    assert not (tmp_path / "y.NPY.npy").exists()


def test_train_out_refused_over_its_stream_but_a_resume_may_update_its_own_folder(tmp_path, capsys):
    """--out's results.json over the --stream file is refused before training; resuming into the artifact's own
    folder is the designed update (written beside it, verified, renamed over it), so it runs."""
    stream = tmp_path / "results.json"
    np.savez(tmp_path / "s.npz", x=np.zeros(1))
    os.replace(tmp_path / "s.npz", stream)
    code, _, err = _run(capsys, "train", "--method", "finetune", "--stream", str(stream), "--out", str(tmp_path))
    assert code == 2 and "same file as the --stream" in err, err
    out = tmp_path / "v1"
    assert _run(capsys, "train", "--method", "lps", "--tasks", "1", "--set", "epochs=1", "--no-progress", "--out",
                str(out))[0] == 0
    code, printed, err = _run(capsys, "train", "--method", "lps", "--resume", str(out / "model.edgecl"), "--tasks",
                              "1", "--no-progress", "--out", str(out))
    assert code == 0, err
    with artifact.load(out / "model.edgecl") as art:
        assert art.n_tasks == 2
    # the saved architecture, reused in its own folder: spec.json is rewritten with what was read from it
    code, _, err = _run(capsys, "train", "--method", "lps", "--arch", str(out / "spec.json"), "--tasks", "1",
                        "--set", "epochs=1", "--no-progress", "--out", str(out))
    assert code == 0, err


def test_an_engine_beside_a_listed_graph_follows_its_task(model, tmp_path, capsys):
    """TensorRT engines are listed only once built: one left by a failed build beside task_001.onnx goes when task 1
    is no longer exported, and stays (to be rebuilt) while it is."""
    ex = tmp_path / "ex"
    assert _run(capsys, "export", model, "--out", str(ex), "--quiet", "--no-verify")[0] == 0
    (ex / "task_001.engine").write_bytes(b"built before a later task failed")
    assert _run(capsys, "export", model, "--out", str(ex), "--quiet", "--no-verify")[0] == 0
    assert (ex / "task_001.engine").exists()
    assert _run(capsys, "export", model, "--tasks", "0", "--out", str(ex), "--quiet", "--no-verify")[0] == 0
    assert not (ex / "task_001.engine").exists()


def test_export_removes_only_what_the_previous_index_listed(model, tmp_path, capsys):
    ex = tmp_path / "ex"
    assert _run(capsys, "export", model, "--out", str(ex), "--quiet", "--no-verify")[0] == 0
    (ex / "mine.onnx").write_bytes(b"not ours")
    assert _run(capsys, "export", model, "--out", str(ex), "--tasks", "0", "--quiet", "--no-verify")[0] == 0
    assert sorted(os.listdir(ex)) == ["index.json", "mine.onnx", "task_000.onnx"]
    assert [e["file"] for e in json.loads((ex / "index.json").read_text())["tasks"]] == ["task_000.onnx"]
    (ex / "task_001.onnx").write_bytes(open(model, "rb").read())  # an artifact named like a graph: never replaced
    code, _, err = _run(capsys, "export", str(ex / "task_001.onnx"), "--out", str(ex), "--tasks", "1", "--quiet")
    assert code == 2 and "same file as the artifact" in err


# ---------------------------------------------------------------- 2, 3: hostile input files

@pytest.mark.parametrize("descr, shape, size", [("|S0", (10, 1, 4, 4), 0), ("|V0", (10, 1, 4, 4), 0),
                                                 ("<m8[s]", (2, 1, 4, 4), 256), (("<f4", (1, 4, 4)), (3,), 192),
                                                 ([("a", "<f4")], (2, 1, 4, 4), 128)])
def test_headers_with_dtypes_that_are_not_plain_numbers_are_refused(tmp_path, descr, shape, size):
    path = _npy(tmp_path / "x.npy", descr, shape, b"\0" * size)
    with pytest.raises(UsageError, match="not an array of plain numbers"):
        load_input(path)


def _npz_bytes(tmp_path) -> bytearray:
    np.savez_compressed(tmp_path / "ok.npz", x=np.random.default_rng(0).random((64, 1, 4, 4)).astype(np.float32))
    return bytearray((tmp_path / "ok.npz").read_bytes())


def test_damaged_and_encrypted_npz_are_usage_errors(tmp_path):
    data = _npz_bytes(tmp_path)
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    for i in range(start + 40, start + 200):
        data[i] ^= 0x5A
    (tmp_path / "bad.npz").write_bytes(data)
    encrypted = _npz_bytes(tmp_path)
    encrypted[6] |= 1
    central = encrypted.rfind(b"PK\x01\x02")
    encrypted[central + 8] |= 1
    (tmp_path / "enc.npz").write_bytes(encrypted)
    for name in ("bad.npz", "enc.npz"):
        with pytest.raises(UsageError, match="not a readable .npz"):
            load_input(tmp_path / name)


def test_an_npz_bomb_is_judged_by_its_header_before_decompressing(tmp_path):
    """A ~1 MB archive declaring 1 GB: refused against the budget and the input cap before inflating (peak RSS)."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (250_000_000,)})
            zeros = bytes(1 << 24)
            for start in range(0, 10**9, len(zeros)):
                f.write(zeros[:min(len(zeros), 10**9 - start)])
    # the child's own peak from VmHWM: ru_maxrss would carry pytest's over the exec
    code = ("import sys; from edgecl.runtime.inputs import load_input\n"
            "for budget in ('32MiB', None):\n"
            "    try: load_input(sys.argv[1], budget)\n"
            "    except Exception as e: print(type(e).__name__, e)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("BudgetError") and "memory budget" in lines[0], done.stdout + done.stderr
    assert lines[1].startswith("UsageError") and "one input may hold" in lines[1]
    assert int(lines[2]) < 400_000  # KiB: the 1 GB array was never inflated


# ---------------------------------------------------------------- 4, 5, 6, 7, 8, 9, 11, 14: bounded flags

def test_audit_judges_a_batch_over_budget_without_allocating_it(model, tmp_path):
    done = _process("audit", model, "--budget", "32MiB", "--batch", "1000000", "--plot", str(tmp_path / "a.png"))
    assert done.returncode == 1 and "DOES NOT FIT" in done.stdout and "batch of 1000000 alone" in done.stdout
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    done = _process("audit", model, "--budget", "32MiB", "--batch", "99999999999999")
    assert done.returncode == 2 and "argument --batch: must be in [1, " in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--benchmark", "1", "--batch", "1000000000000"], "argument --batch: must be in"),
    (["--benchmark", "1", "--batch", "9999999999999999999999"], "argument --batch: must be in"),
    (["--benchmark", "100000000000000"], "argument --benchmark: must be in"),
    (["--benchmark", "1", "--device-budget", "1GiB"], "--device-budget applies to --device cuda"),
    (["--benchmark", "1", "--cuda-graph"], "--cuda-graph applies to --device cuda"),
    (["--benchmark", "1", "--budget", "0.5"], "at least 1 byte"),
    (["--benchmark", "1", "--budget", "1e-3"], "at least 1 byte")])
def test_run_flags_are_bounded(model, capsys, argv, needle):
    code, _, err = _run(capsys, "run", model, "--task", "0", *argv)
    assert code == 2 and needle in err, err


def test_run_says_what_it_would_ignore_or_cannot_write(model, tmp_path, capsys):
    """--batch sizes only the random benchmark input (with --input it was silently ignored), and an --output whose
    folder does not exist is named before anything runs (not as a temporary file's name after the run)."""
    x = tmp_path / "x.npy"
    np.save(x, X)
    code, _, err = _run(capsys, "run", model, "--task", "0", "--input", str(x), "--batch", "8")
    assert code == 2 and "--batch 8 sizes the random --benchmark input" in err, err
    code, _, err = _run(capsys, "run", model, "--task", "0", "--input", str(x), "--output",
                        str(tmp_path / "nowhere" / "y.npy"))
    assert code == 2 and "does not exist or is not writable" in err and ".tmp" not in err, err


def test_threads_are_bounded_in_the_runtime_and_in_training(model, capsys):
    with pytest.raises(UsageError, match=r"threads must be an integer in \[1, 1024\]"):
        TaskRuntime(model, threads=2**40)
    for argv in (["--threads", "100000"], ["--nproc", "100000"], ["--seed", "4611686018427387904"], ["--out", ""]):
        code, _, err = _run(capsys, "train", "--method", "finetune", "--stream", "synthetic", "--tasks", "1",
                            *(["--out", "o"] if "--out" not in argv else []), *argv)
        assert code == 2 and f"argument {argv[0]}:" in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--set", f"seed={2**70}"], "seed must be in [0, 4294967295]"),
    (["--set", "epochs=" + "1" * 5000], "--set epochs: a number of 5000 characters")])
def test_seeds_and_huge_overrides_are_refused_by_config(capsys, argv, needle):
    code, _, err = _run(capsys, "train", "--method", "lps", "--stream", "synthetic", "--out", "o", *argv)
    assert code == 2 and needle in err, err


@pytest.mark.parametrize("seeds", ["99999999999999999999", "0,18446744073709551616", "1001"])
def test_compare_seeds_are_bounded(tmp_path, capsys, seeds):
    code, _, err = _run(capsys, "compare", "--seeds", seeds, "--out", str(tmp_path / "c"))
    assert code == 2 and "--seeds expects" in err, err


def test_sub_byte_budgets_are_refused_like_zero():
    for value in ("0.5", "1e-3", 0.25, 0):
        with pytest.raises(UsageError, match="positive size"):
            parse_budget(value)
    assert parse_budget("1") == 1


# ---------------------------------------------------------------- 10, 15, 16: FIFOs, pipes, warnings

def test_a_fifo_artifact_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: result.append(pytest.raises(ArtifactError, artifact.load, fifo).value),
                              daemon=True)  # on the defect it blocks forever; the test must still end
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "opening a FIFO as an artifact blocked"
    assert "not a regular file" in str(result[0])


def test_a_closed_stdout_pipe_exits_quietly(model):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "edgecl", "inspect", model, "--blobs"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_only_edgecl_warnings_carry_the_edgecl_label(capsys):
    from edgecl.cli import _labelled

    passed_on: list[tuple] = []  # what Python's own showwarning (here a recorder) is handed
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _labelled("inspect", lambda *args, **kw: passed_on.append(args))
        warnings.warn("ours", EdgeclWarning)
        warnings.warn("theirs", RuntimeWarning)
    err = capsys.readouterr().err
    assert "edgecl inspect: warning: ours" in err and "theirs" not in err
    assert [(str(a[0]), a[1]) for a in passed_on] == [("theirs", RuntimeWarning)]


def test_budget_error_is_typed_for_inputs_over_the_budget(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4096, 1, 4, 4), np.float32))
    with pytest.raises(BudgetError, match="memory budget"):
        load_input(path, "64KiB")
