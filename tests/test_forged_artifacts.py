"""Resealed forgeries (issue 17): files that pass every container and manifest check, forged to reach code that used
to compute on them. Each is refused by every entry point — the library calls, the runtime (factored and folded, in
place and per-task sessions), the audit, inspect, export and the CLI (exit 2) — or, where a file is valid, gives the
outputs `materialize` defines."""
from __future__ import annotations

import re

import numpy as np
import pytest

import artifact_models as am
from edgecl import artifact
from edgecl.cli import main as cli_main
from edgecl.deltas import lps_keep, materialize, task_permutation
from edgecl.errors import ArtifactError, UsageError
from edgecl.runtime import TaskRuntime
from edgecl.runtime import plan as runtime_plan

RUNTIMES = {"in place, factored": dict(strategy="inplace"), "in place, folded": dict(strategy="inplace", factor=False),
            "per-task sessions": dict(strategy="sessions")}


def _written(tmp_path, raw: bytes, name: str = "forged.edgecl") -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def _saved_bytes(tmp_path, packed) -> bytes:
    path = tmp_path / "valid.edgecl"
    artifact.save(packed, path)
    return path.read_bytes()


def _library_entry_points(path: str, task: int, out_dir) -> dict:
    """Every library call that reads tensors of `path`, by name."""
    from edgecl.export import export_onnx
    from edgecl.runtime.audit import audit

    calls = {"verify": lambda: artifact.load(path).verify(),
             "materialize": lambda: artifact.load(path).materialize(task),
             "to_packed": lambda: artifact.load(path).to_packed(),
             "inspect": lambda: artifact.inspect(path),
             "audit": lambda: audit(path, "1GiB"),
             "export": lambda: export_onnx(path, out_dir / "onnx", progress=False)}
    for name, kw in RUNTIMES.items():
        calls[f"runtime, {name}"] = lambda kw=kw: TaskRuntime(path, **kw).infer(np.zeros((1, 1, 4, 4), np.float32),
                                                                                   task=task)
    return calls


def _cli_calls(path: str, task: int, tmp_path) -> list[list[str]]:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 1, 4, 4), np.float32))
    return [["run", path, "--task", str(task), "--input", str(x)], ["audit", path, "--budget", "1GiB"],
            ["inspect", path], ["export", path, "--out", str(tmp_path / "cli-onnx"), "--quiet"]]


def _assert_refused_everywhere(path: str, task: int, tmp_path, capsys, match: str, error=ArtifactError) -> None:
    for name, call in _library_entry_points(path, task, tmp_path).items():
        with pytest.raises(error, match=match):
            call()
            pytest.fail(f"{name} accepted the forgery")
    for argv in _cli_calls(path, task, tmp_path):
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, (argv, err)


# ---------------------------------------------------------------- item 1: non-finite values, even where masked out

def _masked_nonfinite(kind: str, value: float):
    """(valid model, task, base tensor, the base with `value` where that task masks the element out)."""
    packed = am.make(kind, seed=1, n_tasks=3)
    t = 1
    if kind == "node":
        name = "fc.weight"
        row = int(np.flatnonzero(~packed.task_tensors[t]["nodes:fc"])[0])
        where = (row, 0)
    elif kind == "lps":
        name = "fc1.weight"
        where = tuple(np.argwhere(~lps_keep(packed, t, name))[0])
    else:  # a zero low-rank row: r[0] = 0 scales row 0 of W_base away
        name = "fc.weight"
        packed.task_tensors[t][f"{name}:r"][0] = 0.0
        where = (0, 0)
    forged = packed.base[name].copy()
    forged[where] = value
    return packed, t, name, forged


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["node", "lps", "lowrank"])
def test_nonfinite_base_under_a_mask_is_refused_by_every_entry_point(tmp_path, capsys, monkeypatch, kind, value):
    monkeypatch.setattr(runtime_plan, "FACTOR_MIN_ELEMENTS", 0)  # small layers take the factored path too
    packed, t, name, forged = _masked_nonfinite(kind, value)
    raw = am.forge_tensor(_saved_bytes(tmp_path, packed), f"base::{name}", forged)
    path = _written(tmp_path, raw)
    artifact.load(path)  # header and manifest are fine: only the decoded values give it away
    _assert_refused_everywhere(path, t, tmp_path, capsys, rf"base::{name}.*NaN/inf")


@pytest.mark.parametrize("kind", ["node", "lps", "lowrank"])
def test_save_and_append_refuse_nonfinite_tensors_naming_tensor_and_task(tmp_path, kind):
    packed, t, name, forged = _masked_nonfinite(kind, np.nan)
    valid = tmp_path / "valid.edgecl"
    artifact.save(packed, valid)
    packed.base[name] = forged
    with pytest.raises(UsageError, match=rf"{name}.*shared base.*NaN/inf"):
        artifact.save(packed, tmp_path / "bad.edgecl")
    with pytest.raises(UsageError, match="NaN/inf"):
        TaskRuntime(packed)  # an in-memory model is checked the same way
    grown = am.make(kind, seed=1, n_tasks=3)
    grown.task_tensors[2]["head.bias"][0] = np.inf
    before = valid.read_bytes()
    with pytest.raises(UsageError, match=r"head.bias.*task 2.*NaN/inf"):
        artifact.append_task(valid, grown)
    assert valid.read_bytes() == before
    assert not (tmp_path / "bad.edgecl").exists()


def test_finite_masked_elements_give_what_materialize_defines_on_every_path(tmp_path, monkeypatch):
    """The other side of the policy: any finite value under a mask is harmless on every path."""
    monkeypatch.setattr(runtime_plan, "FACTOR_MIN_ELEMENTS", 0)
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    for kind in ("node", "lps", "lowrank"):
        packed, t, name, forged = _masked_nonfinite(kind, 3e38)
        packed.base[name] = forged
        path = tmp_path / f"{kind}.edgecl"
        artifact.save(packed, path)
        ref = TaskRuntime(packed, strategy="sessions").infer(x, task=t)
        assert np.isfinite(ref).all()
        for kw in RUNTIMES.values():
            np.testing.assert_allclose(TaskRuntime(str(path), **kw).infer(x, task=t), ref, rtol=1e-5, atol=1e-4)
        assert am.same_weights(artifact.load(path).materialize(t), materialize(packed, t))


# ---------------------------------------------------------------- item 5: permutation group names

def test_permutations_of_existing_names_are_unchanged():
    """Values computed by the code before issue 17: the formula must not move for any name that worked."""
    assert task_permutation(1234, "fc1", 12).tolist() == [7, 10, 4, 0, 3, 9, 2, 6, 11, 1, 5, 8]
    assert task_permutation(2 ** 64 - 1, "x" * 255, 7).tolist() == [0, 5, 3, 4, 2, 1, 6]
    assert task_permutation(-5, "", 5).tolist() == [1, 3, 2, 4, 0]
    with pytest.raises(UsageError, match="at most 255"):
        task_permutation(1, "x" * 256, 4)


@pytest.mark.parametrize("length", [256, 5000])
def test_long_permutation_groups_are_refused_at_load_and_save(tmp_path, capsys, length):
    packed = am.make("permute", seed=2, n_tasks=3)
    raw = _saved_bytes(tmp_path, packed)

    def long_group(manifest):
        manifest["params"]["fc1.weight"]["group"] = "g" * length

    path = _written(tmp_path, am.forge_manifest(raw, long_group))
    with pytest.raises(ArtifactError, match=r"params\['fc1.weight'\].group"):
        artifact.load(path)
    _assert_refused_everywhere(path, 1, tmp_path, capsys, "group")
    packed.params["fc1.weight"]["group"] = "g" * length
    with pytest.raises(UsageError, match="group"):
        artifact.save(packed, tmp_path / "long.edgecl")


# ---------------------------------------------------------------- item 3: task names that look like indices

INDEX_LIKE = ["3", "00", "-1", "+2", " 3", "٣", "1_0", "2-5", "a,b", "all", "ALL", " padded", "padded "]


@pytest.mark.parametrize("name", INDEX_LIKE)
def test_save_refuses_names_that_cannot_select_their_task(tmp_path, name):
    packed = am.make("shared", n_tasks=3)
    packed.tasks[1].name = name
    with pytest.raises(UsageError, match=re.escape(f"task 1 name {name!r}")):
        artifact.save(packed, tmp_path / "m.edgecl")
    assert not (tmp_path / "m.edgecl").exists()


def test_save_refuses_duplicate_names_and_keeps_good_ones(tmp_path):
    packed = am.make("shared", n_tasks=3)
    packed.tasks[2].name = packed.tasks[0].name
    with pytest.raises(UsageError, match="task 2 name 'task-0' duplicates task 0"):
        artifact.save(packed, tmp_path / "m.edgecl")
    for i, name in enumerate(["3a", "task 3", "v1.2"]):
        packed.tasks[i].name = name
    artifact.save(packed, tmp_path / "m.edgecl")
    assert artifact.load(tmp_path / "m.edgecl").task_index("task 3") == 1


def _old_file_with_names(tmp_path, names: list[str]) -> tuple[str, object]:
    """A file as an older edgecl could write it: task names that read as indices, or repeated."""
    packed = am.make("shared", n_tasks=len(names))
    raw = _saved_bytes(tmp_path, packed)

    def rename(manifest):
        for task, name in zip(manifest["tasks"], names):
            task["name"] = name

    return _written(tmp_path, am.forge_manifest(raw, rename), "old.edgecl"), packed


def test_old_files_with_such_names_load_with_a_warning_and_select_by_index(tmp_path, capsys):
    path, packed = _old_file_with_names(tmp_path, ["2", "dup", "dup"])
    with pytest.warns(Warning, match=r"task 0 '2' reads as a task index.*task 2 'dup' duplicates task 1"):
        art = artifact.load(path)
    assert art.task_index("2") == 2 and art.task_index(0) == 0  # "2" is index 2, not the task named "2"
    with pytest.raises(UsageError, match="'dup' is ambiguous: tasks \\[1, 2\\]"):
        art.task_index("dup")
    x = np.random.default_rng(1).standard_normal((2, 1, 4, 4)).astype(np.float32)
    with pytest.warns(Warning):
        rt = TaskRuntime(path)
    ref = TaskRuntime(packed)
    np.testing.assert_allclose(rt.infer(x, task="2"), ref.infer(x, task=2), rtol=1e-6)
    np.testing.assert_allclose(rt.infer(x, task="0"), ref.infer(x, task=0), rtol=1e-6)
    npy = tmp_path / "x.npy"
    np.save(npy, x)
    assert cli_main(["run", path, "--task", "dup", "--input", str(npy)]) == 2
    assert "ambiguous" in capsys.readouterr().err
    assert cli_main(["run", path, "--task", "1", "--input", str(npy)]) == 0
    assert "warning:" in capsys.readouterr().err


def test_appending_to_an_old_file_keeps_its_names_and_checks_the_new_ones(tmp_path):
    path, _ = _old_file_with_names(tmp_path, ["2", "dup", "dup"])
    with pytest.warns(Warning):
        old = artifact.load(path).to_packed()
    grown = am.make("shared", n_tasks=4)
    grown.base, grown.tasks[:3], grown.task_tensors[:3] = old.base, old.tasks, old.task_tensors
    grown.tasks[3].name = "dup"
    with pytest.warns(Warning), pytest.raises(UsageError, match="task 3 name 'dup' duplicates task 1"):
        artifact.append_task(path, grown)
    grown.tasks[3].name = "new"
    with pytest.warns(Warning):
        artifact.append_task(path, grown)
    with pytest.warns(Warning):
        assert [t.name for t in artifact.load(path).tasks] == ["2", "dup", "dup", "new"]


@pytest.mark.parametrize("task, expect", [("٣", 3), (" 1 ", 1), (np.int64(2), 2), ("task-0", 0)])
def test_resolution_reads_any_integer_text_as_an_index(task, expect):
    packed = am.make("shared", n_tasks=4)
    assert packed.task_index(task) == expect


@pytest.mark.parametrize("task", [True, 1.0, None, "-1", "4", "nope"])
def test_resolution_refuses_what_is_not_a_task(task):
    with pytest.raises(UsageError, match="task"):
        am.make("shared", n_tasks=4).task_index(task)


# ---------------------------------------------------------------- item 6: architectures ONNX Runtime cannot run

def _node_edit(index: int, **fields):
    def edit(nodes):
        nodes[index].update(fields)
    return edit


HOSTILE_ARCHS = {  # (model kind, edit of its normalised nodes): each used to load, verify and even save
    "gap on a flat vector": ("shared", _node_edit(4, op="gap")),
    "maxpool on a flat vector": ("shared", _node_edit(4, op="maxpool", k=[2, 2], stride=[2, 2], pad=[0, 0],
                                                       ceil_mode=False, dilation=[1, 1])),
    "maxpool k=1000": ("node", _node_edit(3, k=[1000, 1000])),
    "ceil_mode window starting in the padding": ("node", _node_edit(3, stride=[3, 3], pad=[1, 1], ceil_mode=True)),
}


@pytest.mark.parametrize("case", list(HOSTILE_ARCHS))
def test_hostile_architectures_are_refused_at_load_by_every_command(tmp_path, capsys, case):
    kind, edit = HOSTILE_ARCHS[case]
    raw = _saved_bytes(tmp_path, am.make(kind, seed=4, n_tasks=2))
    path = _written(tmp_path, am.forge_manifest(raw, lambda manifest: edit(manifest["arch"]["nodes"])))
    with pytest.raises(ArtifactError, match="manifest.arch"):
        artifact.load(path)
    _assert_refused_everywhere(path, 1, tmp_path, capsys, "manifest.arch")


@pytest.mark.parametrize("case", list(HOSTILE_ARCHS))
def test_hostile_architectures_are_refused_at_save(tmp_path, case):
    kind, edit = HOSTILE_ARCHS[case]
    packed = am.make(kind, seed=4, n_tasks=2)
    packed.arch = {**packed.arch, "nodes": [dict(n) for n in packed.arch["nodes"]]}
    edit(packed.arch["nodes"])
    with pytest.raises(UsageError, match="architecture"):
        artifact.save(packed, tmp_path / "m.edgecl")
    assert not (tmp_path / "m.edgecl").exists()


def test_pool_windows_onnx_and_torch_disagree_on_are_refused():
    from edgecl.arch import validate

    def spec(**pool):
        return {"name": "p", "input_shape": [1, 1, 1], "nodes": [
            {"name": "p", "op": "maxpool", "inputs": ["input"], **pool},
            {"name": "f", "op": "flatten", "inputs": ["p"]}]}

    with pytest.raises(UsageError, match="padding only"):  # window elements at -1 and +1 of a 1-pixel input
        validate(spec(k=2, stride=2, pad=1, dilation=2))
    validate(spec(k=1, stride=1))
    wide = {**spec(k=3, stride=2, pad=1, ceil_mode=True), "input_shape": [1, 5, 5]}
    assert validate(wide)["feature_dim"] == 9  # ceil mode where both agree stays valid



# ---------------------------------------------------------------- item 8: inspect verifies every byte

@pytest.mark.parametrize("key", ["base::fc2.weight", "task0::head.weight", "task1::head.bias"])
def test_inspect_refuses_a_damaged_weight_byte(tmp_path, capsys, key):
    path = tmp_path / "m.edgecl"
    artifact.save(am.make("shared", seed=6, n_tasks=2), path)
    start, stop = artifact.load(path).blob_range(key)
    raw = bytearray(path.read_bytes())
    raw[(start + stop) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli_main(["inspect", str(path)]) == 2
    assert f"blob {key!r}: checksum mismatch" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        artifact.inspect(path)


# ---------------------------------------------------------------- item 9: small files, huge work

def _wide_head_model(classes: int, features: int = 512, filler: int = 450):
    """One task whose zero head compresses to nothing, and a random layer large enough for the decode bound."""
    from edgecl.arch import validate
    from edgecl.deltas import PackedModel, TaskInfo

    rng = np.random.default_rng(0)
    arch = validate({"name": "wide-head", "input_shape": [filler], "nodes": [
        {"name": "fc", "op": "linear", "inputs": ["input"], "in": filler, "out": features}]})
    return PackedModel(arch, "finetune", {}, {"fc.weight": {"kind": "shared"}, "fc.bias": {"kind": "shared"},
                                              "head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}},
                       {"fc.weight": rng.standard_normal((features, filler)).astype(np.float32),
                        "fc.bias": np.zeros(features, np.float32)}, [TaskInfo("wide", classes)],
                       [{"head.weight": np.zeros((classes, features), np.float32),
                         "head.bias": np.zeros(classes, np.float32)}])


@pytest.mark.parametrize("strategy", ["inplace", "sessions"])
def test_a_budget_the_manifest_rules_out_is_refused_before_reading(tmp_path, strategy):
    import tracemalloc

    from edgecl.errors import BudgetError

    path = tmp_path / "wide.edgecl"
    artifact.save(_wide_head_model(60_000), path)  # a 120 MB head in a < 1 MB file
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(BudgetError, match="refused before reading any tensor"):
            TaskRuntime(str(path), budget="100MiB", strategy=strategy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # nothing model-sized was allocated (it was 2 GB for a 1M-class head)


def test_size_bounds_are_refused_at_load_and_save(tmp_path):
    from edgecl.artifact.limits import MAX_CLASSES

    with pytest.raises(UsageError, match="classes"):
        artifact.save(_wide_head_model(MAX_CLASSES + 1, features=4, filler=4), tmp_path / "many.edgecl")
    raw = _saved_bytes(tmp_path, am.make("shared", n_tasks=2))

    def many_classes(manifest):
        manifest["tasks"][0]["n_classes"] = 1_000_000

    with pytest.raises(ArtifactError, match=r"tasks\[0\].n_classes"):
        artifact.load(_written(tmp_path, am.forge_manifest(raw, many_classes)))
    with pytest.raises(UsageError, match="decoded bytes, beyond the bound"):  # 250 MB decoded from ~0.1 MB
        artifact.save(_wide_head_model(60_000, filler=16), tmp_path / "bomb.edgecl")

    def junk(manifest):
        manifest["extra"]["junk"] = [{}] * 300_000  # 1 MB of header, 300,000 objects to parse

    with pytest.raises(ArtifactError, match="JSON objects/arrays"):
        artifact.load(_written(tmp_path, am.forge_manifest(raw, junk)))


@pytest.mark.parametrize("spec, match", [
    ({"nodes": [{"name": "f", "op": "flatten", "inputs": ["input"]}]
      + [{"name": f"a{i}", "op": "add", "inputs": ["f"] * 256} for i in range(100)]}, "node inputs in all"),
    ({"nodes": [{"name": "c1", "op": "cat", "inputs": ["input"] * 256},
                {"name": "c2", "op": "cat", "inputs": ["c1"] * 256},
                {"name": "c3", "op": "cat", "inputs": ["c2"] * 2},  # 2³⁰ floats per sample from no weights
                {"name": "f", "op": "flatten", "inputs": ["c3"]}]}, "elements per sample"),
])
def test_specs_that_cost_more_than_their_size_are_refused(tmp_path, spec, match):
    from edgecl.arch import validate

    with pytest.raises(UsageError, match=match):
        validate({"name": "bomb", "input_shape": [64, 8, 8], **spec})
    raw = _saved_bytes(tmp_path, am.make("shared", n_tasks=2))

    def hostile(manifest):
        manifest["arch"] = {"name": "bomb", "input_shape": [64, 8, 8], **spec}

    with pytest.raises(ArtifactError, match="manifest.arch"):
        artifact.load(_written(tmp_path, am.forge_manifest(raw, hostile)))
