"""What a user hands the CLI and the runtime (issue 17, items 2, 7 and 12): every bad file, flag or array is a clear
typed error (exit 2), never a traceback, an allocation the file cannot back, or logits that are not numbers; and
`edgecl run` prints labels and times itself."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from cli_run import run_cli

import artifact_models as am
from edgecl import artifact
from edgecl.errors import UsageError
from edgecl.runtime import TaskRuntime
from edgecl.runtime.inputs import load_input


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-inputs")
    packed = am.make("lps", seed=5, n_tasks=3)
    path = folder / "model.edgecl"
    artifact.save(packed, path)
    return str(path), packed


_run = run_cli


X = np.random.default_rng(3).standard_normal((4, 1, 4, 4)).astype(np.float32)


# ---------------------------------------------------------------- item 7: input files

def test_npz_with_one_array_runs_like_npy(model, tmp_path, capsys):
    path, packed = model
    np.save(tmp_path / "x.npy", X)
    np.savez_compressed(tmp_path / "x.npz", batch=X)
    expected = TaskRuntime(packed).infer(X, task=1)
    for name in ("x.npy", "x.npz"):
        code, _, err = _run(capsys, "run", path, "--task", "1", "--input", str(tmp_path / name),
                            "--output", str(tmp_path / f"y-{name}.npy"))
        assert code == 0, err
        np.testing.assert_allclose(np.load(tmp_path / f"y-{name}.npy"), expected, rtol=1e-6)
    np.savez(tmp_path / "two.npz", a=X, b=X)
    code, _, err = _run(capsys, "run", path, "--task", "1", "--input", str(tmp_path / "two.npz"))
    assert code == 2 and "holds 2 arrays ['a', 'b']" in err
    np.savez(tmp_path / "none.npz")  # an archive with no array (the array left out of the call): a zip all the same
    code, _, err = _run(capsys, "run", path, "--task", "1", "--input", str(tmp_path / "none.npz"))
    assert code == 2 and "holds 0 arrays" in err and "not a .npy or .npz file" not in err, err


def _npy_header(shape, dtype="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_a_small_file_declaring_a_huge_array_is_refused_before_allocation(model, tmp_path, capsys):
    path, _ = model
    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(_npy_header((1 << 19, 1, 4, 4 << 15)) + b"\0" * 20)  # 2 TiB declared, ~100 bytes held
    assert bomb.stat().st_size < 200
    tracemalloc.start()
    try:
        code, _, err = _run(capsys, "run", path, "--task", "0", "--input", str(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and "declares shape" in err and "holds 20 bytes" in err, err
    assert peak < 8 << 20
    truncated = tmp_path / "short.npy"
    truncated.write_bytes(_npy_header((4, 1, 4, 4)) + X.tobytes()[:-4])
    with pytest.raises(UsageError, match="truncated"):
        load_input(truncated)


@pytest.mark.parametrize("setup, message", [
    (lambda d: "/dev/zero", "is not a regular file"),
    (lambda d: str(d), "is not a regular file"),
    (lambda d: str(d / "missing.npy"), "not found"),
    (lambda d: (d / "t.npy").write_text("1 2 3\n4 5 6\n") and str(d / "t.npy"), "not a .npy or .npz file"),
    (lambda d: np.save(d / "o.npy", np.array([{"a": 1}], dtype=object)) or str(d / "o.npy"), "Python objects"),
    (lambda d: (d / "z.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40) and str(d / "z.npz"), "not a readable .npz"),
])
def test_bad_input_files_are_named_and_refused(model, tmp_path, capsys, setup, message):
    path, _ = model
    code, _, err = _run(capsys, "run", path, "--task", "0", "--input", setup(tmp_path))
    assert code == 2 and message in err and "allow_pickle" not in err, err


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 1, 8, 8), np.float32), "input has shape (4, 1, 8, 8); expected (batch, 1, 4, 4)"),
    (np.zeros((4, 1, 4, 4), np.int64), "input has dtype int64"),
    (np.full((2, 1, 4, 4), np.nan, np.float32), "input has 32 NaN/inf values"),
])
def test_an_input_array_the_task_cannot_take_names_the_file_and_task(model, tmp_path, capsys, array, message):
    """'input has shape ...' named neither the file nor the task it was fed to."""
    path, _ = model
    np.save(tmp_path / "batch.npy", array)
    code, _, err = _run(capsys, "run", path, "--task", "2", "--input", str(tmp_path / "batch.npy"))
    assert code == 2 and f"--input {tmp_path / 'batch.npy'} for task 2 (" in err and message in err, err


def test_a_text_file_as_artifact_is_not_an_artifact(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a model\n" * 3)
    for argv in (["inspect", str(text)], ["audit", str(text), "--budget", "1GiB"],
                 ["run", str(text), "--task", "0", "--benchmark", "1"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "not an edgecl artifact (no safetensors header" in err, err
        assert "declares" not in err


def test_a_missing_stream_file_is_not_found(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--method", "lps", "--stream", str(tmp_path / "mine.npz"), "--out",
                        str(tmp_path / "out"))
    assert code == 2 and "stream file" in err and "not found" in err and "unknown stream" not in err


@pytest.mark.parametrize("argv", [["audit", "{path}", "--budget", "-5MiB"],
                                  ["run", "{path}", "--task", "0", "--benchmark", "1", "--budget", "-5MiB"],
                                  ["run", "{path}", "--task", "0", "--benchmark", "-3"]])
def test_negative_values_reach_the_commands_own_check(model, capsys, argv):
    code, _, err = _run(capsys, *[a.format(path=model[0]) for a in argv])
    assert code == 2 and "expected one argument" not in err
    assert "must be a positive size" in err or "must be in [0, " in err, err


# ---------------------------------------------------------------- item 2: what is computed on, and what comes out

def test_masked_arrays_are_refused_even_when_the_masked_values_are_nan(model):
    _, packed = model
    rt = TaskRuntime(packed)
    hidden = np.ma.masked_array(X.copy(), mask=np.zeros(X.shape, bool))
    hidden.data[0, 0, 0, 0] = np.nan
    hidden.mask[0, 0, 0, 0] = True
    assert np.isfinite(hidden).all()  # what the old check looked at
    for x in (hidden, np.ma.masked_array(X)):
        with pytest.raises(UsageError, match="masked array"):
            rt.infer(x, task=0)


@pytest.mark.parametrize("strategy", ["inplace", "sessions"])
def test_inputs_that_overflow_inside_the_model_are_refused_not_returned(model, tmp_path, capsys, strategy):
    path, packed = model
    rt = TaskRuntime(path, strategy=strategy)
    huge = np.full((2, 1, 4, 4), 3e38, np.float32)
    assert np.isfinite(huge).all()
    with pytest.raises(UsageError, match="not finite.*overflows float32"):
        rt.infer(huge, task=1)
    mixed = np.concatenate([X[:1], huge[:1]])
    with pytest.raises(UsageError, match="1 of 2 inputs.*input 1"):
        rt.infer(mixed, task=1)
    assert np.isfinite(rt.infer(X, task=1)).all()  # the runtime still serves good inputs
    np.save(tmp_path / "huge.npy", huge)
    code, _, err = _run(capsys, "run", path, "--task", "1", "--input", str(tmp_path / "huge.npy"))
    assert code == 2 and "overflows" in err


# ---------------------------------------------------------------- item 12: labels and a benchmark

def test_run_prints_labels_and_writes_logits(model, tmp_path, capsys):
    path, packed = model
    np.save(tmp_path / "x.npy", X)
    labels = " ".join(str(c) for c in TaskRuntime(packed).infer(X, task=2).argmax(1))
    code, out, _ = _run(capsys, "run", path, "--task", "2", "--input", str(tmp_path / "x.npy"))
    assert code == 0 and out.strip() == labels
    code, out, _ = _run(capsys, "run", path, "--task", "2", "--input", str(tmp_path / "x.npy"), "--output",
                        str(tmp_path / "y"), "--labels")
    assert code == 0 and out.strip().splitlines()[-1] == labels and "written to" in out
    assert (tmp_path / "y.npy").exists()


def test_run_benchmark_reports_latency_percentiles(model, capsys):
    code, out, err = _run(capsys, "run", model[0], "--task", "task-1", "--benchmark", "30", "--batch", "4")
    assert code == 0, err
    assert "30 runs at batch 4" in out and all(f" {p} " in out for p in ("p50", "p90", "p99")) and "samples/s" in out
    code, _, err = _run(capsys, "run", model[0], "--task", "0")
    assert code == 2 and "--benchmark" in err
