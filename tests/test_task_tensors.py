"""Task tensors (heads, per-task biases, STL trunks) read from the artifact into a cache slot on a miss
(``TaskRuntime(task_tensors="cached")``, the default for a file whose switches write weights anyway) instead of kept
for every task: same outputs as keeping them, less resident, and a clear error when the file's bytes go bad."""
from __future__ import annotations

import os

import numpy as np
import pytest

from edgecl import artifact
from edgecl.arch import preset
from edgecl.errors import ArtifactError, UsageError
from edgecl.runtime import TaskRuntime
from edgecl.runtime import plan as plan_module
from edgecl.synthetic import random_packed

CLASSES = (10, 3, 7)


@pytest.fixture(scope="module")
def lps_file(tmp_path_factory):
    packed = random_packed(preset("mlp"), n_tasks=7, shape="lps", classes=CLASSES)
    path = tmp_path_factory.mktemp("lazy") / "lps.edgecl"
    artifact.save(packed, path)
    return packed, path


def x_batch(n: int = 4) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((n, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("shape", ["lps", "mixed"])
def test_cached_task_tensors_equal_resident_ones_over_random_switches(tmp_path, shape):
    """300 random switches over 2 slots: every output bit-identical to the runtime that keeps every task's tensors
    (both run the same graph on the same values). `mixed` also holds per-task trunk layers (kind "task")."""
    packed = random_packed(preset("mlp"), n_tasks=6, shape=shape, classes=CLASSES)
    path = tmp_path / "m.edgecl"
    artifact.save(packed, path)
    cached = TaskRuntime(path, strategy="inplace", cache_tasks=2, task_tensors="cached")
    resident = TaskRuntime(path, strategy="inplace", cache_tasks=2, task_tensors="resident")
    task_names = {n for n, spec in packed.params.items() if spec["kind"] == "task"}
    assert {p.name for p in cached.plans if p.plan == "read"} == task_names
    assert not any(p.plan == "read" for p in resident.plans)
    assert [rt.memory_report(measure=False)["task_tensors"] for rt in (cached, resident)] == ["cached", "resident"]
    x, rng = x_batch(), np.random.default_rng(7)
    for _ in range(300):
        t = int(rng.integers(packed.n_tasks))
        y = cached.infer(x, task=t)
        assert y.shape == (4, packed.tasks[t].n_classes)
        np.testing.assert_array_equal(y, resident.infer(x, task=t))
    assert cached.misses > 100


def test_cached_heads_leave_the_model_tensors_and_ride_in_the_slots(lps_file):
    """The ledger's "model tensors" are the base weights alone; each slot holds the largest task's head, not every
    task's; `task_bytes` (what grows with the task count) loses the heads."""
    packed, path = lps_file
    cached = TaskRuntime(path, strategy="inplace", cache_tasks=2, task_tensors="cached")
    resident = TaskRuntime(path, strategy="inplace", cache_tasks=2, task_tensors="resident")
    heads = [sum(tt[n].nbytes for n in ("head.weight", "head.bias")) for tt in packed.task_tensors]
    weights = sum(a.nbytes for n, a in packed.base.items() if not n.endswith(":owner"))
    assert cached.ledger.items["model tensors"] == weights
    assert resident.ledger.items["model tensors"] == weights + sum(heads)
    assert cached.slot_bytes == resident.slot_bytes + max(heads)
    assert resident.task_bytes - cached.task_bytes == sum(heads)
    assert not [a for p in cached.plans if p.plan == "read" for a in p.task_arrays()]


def test_auto_keeps_task_tensors_where_a_switch_only_rebinds(tmp_path, lps_file, monkeypatch):
    """A model whose switches write nothing (every layer factored) keeps its heads, so its switch stays a rebind;
    an in-memory model keeps references to the caller's arrays."""
    monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", 0)  # this small MLP's node layers factored
    packed = random_packed(preset("mlp"), n_tasks=3, shape="node")
    path = tmp_path / "node.edgecl"
    artifact.save(packed, path)
    runtime = TaskRuntime(path, strategy="inplace", cache_tasks=1)
    assert runtime.varying == [] and runtime.slot_bytes == 0
    assert {p.name for p in runtime.plans if p.plan == "own"} >= {"head.weight", "head.bias"}
    lps_packed, _ = lps_file
    assert not any(p.plan == "read" for p in TaskRuntime(lps_packed, strategy="inplace").plans)
    forced = TaskRuntime(path, strategy="inplace", cache_tasks=1, task_tensors="cached")
    assert {p.name for p in forced.plans if p.plan == "read"} == {"head.weight", "head.bias"}
    for t in (2, 0, 1, 2):
        np.testing.assert_array_equal(forced.infer(x_batch(), task=t), runtime.infer(x_batch(), task=t))


@pytest.mark.parametrize("width,n_tasks,cached", [(1, 10, True), (4, 3, False)])
def test_auto_caches_heads_where_they_are_a_large_share_of_the_model(tmp_path, width, n_tasks, cached):
    """The demo's shape (10 tasks of the default MLP): every head would be ~14 % of the resident model, so they are
    read on a miss; a 4× wider MLP with 3 tasks: ~1 %, kept (a read would slow its switch for nothing)."""
    packed = random_packed(preset("mlp", width=width), n_tasks=n_tasks, shape="lps")
    path = tmp_path / "m.edgecl"
    artifact.save(packed, path)
    runtime = TaskRuntime(path, strategy="inplace", cache_tasks=1)
    heads = sum(tt[n].nbytes for tt in packed.task_tensors for n in ("head.weight", "head.bias"))
    resident = TaskRuntime(path, strategy="inplace", cache_tasks=1, task_tensors="resident")
    share = heads / (resident.ledger.items["model tensors"] + resident.ledger.items["task masks"])
    assert (share >= 0.10) == cached
    assert any(p.plan == "read" for p in runtime.plans) == cached


@pytest.mark.parametrize("kwargs,match", [
    ({"task_tensors": "lazy"}, "task_tensors 'lazy' unknown"),
    ({"task_tensors": "cached", "strategy": "sessions"}, "in-place strategy's host cache slots"),
    ({"task_tensors": "cached", "resident": "device"}, "device path keeps every task"),
])
def test_bad_task_tensor_choices_are_usage_errors(lps_file, kwargs, match):
    with pytest.raises(UsageError, match=match):
        TaskRuntime(lps_file[1], **kwargs)


def test_cached_needs_a_file(lps_file):
    with pytest.raises(UsageError, match="not an in-memory model"):
        TaskRuntime(lps_file[0], strategy="inplace", task_tensors="cached")


def test_a_file_replaced_while_serving_changes_nothing(tmp_path, lps_file):
    """`save` / `append_task` rename a new file over the old one: the runtime keeps reading the bytes it opened."""
    packed, source = lps_file
    path = tmp_path / "m.edgecl"
    path.write_bytes(source.read_bytes())
    runtime = TaskRuntime(path, strategy="inplace", cache_tasks=1)
    x = x_batch()
    before = [runtime.infer(x, task=t) for t in range(packed.n_tasks)]
    artifact.save(random_packed(preset("mlp"), n_tasks=7, shape="lps", classes=CLASSES, seed=5), path)
    for t in reversed(range(packed.n_tasks)):  # every one a miss: heads read again
        np.testing.assert_array_equal(runtime.infer(x, task=t), before[t])


def test_bytes_damaged_in_place_fail_the_miss_with_the_blob_named(tmp_path, lps_file):
    """Someone writes into the open file: the miss that reads the damaged head raises ArtifactError naming its blob
    (checksum), the slot is left free, and tasks whose bytes are intact still run."""
    packed, source = lps_file
    path = tmp_path / "m.edgecl"
    path.write_bytes(source.read_bytes())
    with artifact.load(path) as art:
        start, stop = art.blob_range("task3::head.weight")
    runtime = TaskRuntime(path, strategy="inplace", cache_tasks=1)
    x = x_batch()
    expected = runtime.infer(x, task=1)
    with open(path, "r+b") as f:  # same inode: the runtime's handle sees this
        f.seek(start + (stop - start) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"task3::head\.weight.*checksum"):
        runtime.infer(x, task=3)
    np.testing.assert_array_equal(runtime.infer(x, task=1), expected)


def test_closing_the_runtime_closes_the_file(lps_file):
    runtime = TaskRuntime(lps_file[1], strategy="inplace", cache_tasks=1)
    (reader,) = {p.reader for p in runtime.plans if p.plan == "read"}
    runtime.close()
    with pytest.raises(UsageError, match="closed"):
        reader.read(0, "head.weight")


def test_task_blobs_scan_for_nan_until_a_blob_is_known_finite(tmp_path, lps_file):
    """A forged head (NaN, checksum fixed) is refused on its first read by a fresh `TaskBlobs`; a runtime refuses
    the file when it builds its plans, before any miss."""
    import artifact_models as am

    packed, source = lps_file
    head = packed.task_tensors[2]["head.weight"].copy()
    head[0, 0] = np.nan
    path = tmp_path / "forged.edgecl"
    path.write_bytes(am.forge_tensor(source.read_bytes(), "task2::head.weight", head))
    with artifact.load(path) as art:
        blobs = art.task_blobs({"head.weight"})
    np.testing.assert_array_equal(blobs.read(1, "head.weight"), packed.task_tensors[1]["head.weight"])
    with pytest.raises(ArtifactError, match=r"task2::head\.weight.*NaN/inf"):
        blobs.read(2, "head.weight")
    blobs.close()
    with pytest.raises(ArtifactError, match=r"task2::head\.weight.*NaN/inf"):
        TaskRuntime(path, strategy="inplace", task_tensors="cached")


def test_an_opened_artifact_can_be_closed_by_its_owner(lps_file):
    """Given an `Artifact` the caller opened, the runtime reads heads through its own duplicate of the handle, so
    the caller may close theirs."""
    packed, path = lps_file
    reference = TaskRuntime(path, strategy="inplace", cache_tasks=1, task_tensors="resident")
    with artifact.load(path) as art:
        runtime = TaskRuntime(art, strategy="inplace", cache_tasks=1, task_tensors="cached")
    for t in (4, 1, 6, 0):
        np.testing.assert_array_equal(runtime.infer(x_batch(), task=t), reference.infer(x_batch(), task=t))
