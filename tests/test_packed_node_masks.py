"""Format 3 stores a task's node masks as one blob (`task<t>::nodes`, laid out by the manifest's `node_groups`): every
AGS-CL-shaped graph round-trips bit-identically and reads back as the same `nodes:GROUP` tensors; forged layouts are
ArtifactErrors naming the field; the writer refuses what one layout cannot hold; `inspect` still reports node masks
per task."""
from __future__ import annotations

import artifact_models as am
import numpy as np
import pytest
from test_agscl_graphs import GROUPED as GROUPED_CONV
from test_node_segments import CAT, GROUPED
from test_node_segments import _packed as agscl_like
from torch_nets import GhostSplit, ResCat, TinyConvNeXt, module_and_spec, shuffle_spec

from edgecl import artifact
from edgecl.arch import from_torch, preset
from edgecl.deltas import materialize
from edgecl.errors import ArtifactError, UsageError
from edgecl.runtime import TaskRuntime

GRAPHS = {"cat": lambda: CAT, "grouped": lambda: GROUPED, "grouped-conv": lambda: GROUPED_CONV,
          "lenet": lambda: preset("lenet"), "resnet": lambda: preset("resnet"),
          "rescat": lambda: from_torch(ResCat(), (3, 8, 8)),
          "ghost": lambda: from_torch(GhostSplit(width=16), (3, 8, 8)),
          "convnext": lambda: from_torch(TinyConvNeXt(in_channels=3, width=16), (3, 8, 8)),
          "shuffle": lambda: shuffle_spec((1, 8, 8))}


def _saved(tmp_path, packed, name: str = "m.edgecl") -> str:
    path = str(tmp_path / name)
    artifact.save(packed, path)
    return path


def _masks(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith("nodes:")}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_every_graph_round_trips_with_one_mask_blob_per_task(tmp_path, graph):
    packed = agscl_like(GRAPHS[graph](), n_tasks=3)
    path = _saved(tmp_path, packed)
    with artifact.load(path) as art:
        assert art.manifest["format_version"] == artifact.FORMAT_VERSION == 3
        groups = [k[len("nodes:"):] for k in packed.task_tensors[0] if k.startswith("nodes:")]
        assert [g for g, _ in art.node_groups] == groups
        assert [e["name"] for e in art.blobs.values()].count("nodes") == 3
        assert not any(e["name"].startswith("nodes:") for e in art.blobs.values())
        loaded = art.to_packed()
        for t in range(3):
            assert am.same_weights(loaded.task_tensors[t], packed.task_tensors[t])
            assert am.same_weights(art.read_task(t), packed.task_tensors[t])
            assert am.same_weights(art.materialize(t), materialize(packed, t))


@pytest.mark.slow
def test_torchvision_shufflenet_masks_pack_into_one_blob_per_task(tmp_path):
    """The case that asked for packing: ~1,000 channel groups (shuffled groups cut into single channels)."""
    _, spec = module_and_spec("torchvision shufflenet_v2_x0_5")
    packed = agscl_like(spec, n_tasks=2)
    path = _saved(tmp_path, packed)
    with artifact.load(path) as art:
        # format 2 held ~2,500 blobs and a ~975 KB header here (1,050 mask blobs a task); the rest is node specs
        assert len(art.node_groups) > 900 and len(art.blobs) < 400 and art.header_bytes < 400_000
        for t in range(2):
            assert am.same_weights(art.materialize(t), materialize(packed, t))


def test_runtime_and_inspect_read_packed_masks(tmp_path):
    packed = agscl_like(CAT, n_tasks=2)
    path = _saved(tmp_path, packed)
    x = np.random.default_rng(0).standard_normal((3, *CAT["input_shape"])).astype(np.float32)
    with TaskRuntime(path) as rt, TaskRuntime(packed) as mem:
        for t in (1, 0):
            np.testing.assert_array_equal(rt.infer(x, task=t), mem.infer(x, task=t))
    info = artifact.inspect(path)
    rows = [r for r in info["blobs"] if r["component"] == "node masks"]
    bits = sum(m.size for m in _masks(packed.task_tensors[0]).values())
    assert [(r["key"], r["task"], r["params"]) for r in rows] == [(f"task{t}::nodes", t, bits) for t in range(2)]
    assert "node masks" in [c["component"] for c in info["components"]]


def _rename_blob(raw: bytes, old: str, new: str) -> bytes:
    manifest, table, data = am.split_file(raw)
    manifest["blobs"][new] = manifest["blobs"].pop(old)
    table[new] = table.pop(old)
    return am.build_file(manifest, table, data)


def _edit(fn):
    return lambda raw: am.forge_manifest(raw, fn)


FORGERIES = {
    "sizes-not-summing": (_edit(lambda m: m["node_groups"][0].__setitem__(1, 3)), "blob 'task0::nodes'.shape"),
    "unknown-group": (_edit(lambda m: m["node_groups"][0].__setitem__(0, "zz")), "manifest.node_groups"),
    "duplicate-group": (_edit(lambda m: m["node_groups"].append(m["node_groups"][0])), "manifest.node_groups"),
    "missing": (_edit(lambda m: m.pop("node_groups")), "manifest.node_groups"),
    "not-pairs": (_edit(lambda m: m.update(node_groups=[["a", 2, 0]])), "manifest.node_groups"),
    "negative-size": (_edit(lambda m: m["node_groups"][0].__setitem__(1, -1)), "manifest.node_groups"),
    "bool-size": (_edit(lambda m: m["node_groups"][0].__setitem__(1, True)), "manifest.node_groups"),
    "path-group": (_edit(lambda m: m["node_groups"][0].__setitem__(0, "../x")), "manifest.node_groups"),
    "not-a-list": (_edit(lambda m: m.update(node_groups={"a": 2})), "manifest.node_groups"),
    "packed-blob-missing": (lambda raw: _rename_blob(raw, "task1::nodes", "task1::nodez"), "blob 'task1::nodes'"),
    "per-group-blob": (lambda raw: _rename_blob(raw, "task1::nodes", "task1::nodes:a"), "blob 'task1::nodes:a'"),
    "wrong-dtype": (lambda raw: am.forge_tensor(raw, "task0::nodes", np.ones(5, np.uint8)),
                    "blob 'task0::nodes'.dtype"),
    "two-dims": (_edit(lambda m: m["blobs"]["task0::nodes"].update(shape=[1, 10])), "blob 'task0::nodes'.shape"),
    "empty-layout": (_edit(lambda m: m.update(node_groups=[])), "blob 'task0::nodes'"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_layouts_are_refused_naming_the_field(tmp_path, case):
    forge, field = FORGERIES[case]
    path = tmp_path / "forged.edgecl"
    path.write_bytes(forge(open(_saved(tmp_path, agscl_like(CAT, n_tasks=2)), "rb").read()))
    with pytest.raises(ArtifactError) as info:
        artifact.load(path)
    assert field in str(info.value), str(info.value)


def test_node_groups_mean_nothing_in_a_format_2_file(tmp_path):
    """Format 2 stores masks per group: a `node_groups` there is an unknown top-level field, ignored."""
    raw = open("tests/data/v2-cat-node.edgecl", "rb").read()
    path = tmp_path / "v2.edgecl"
    path.write_bytes(am.forge_manifest(raw, lambda m: m.update(node_groups=[["zz", 1]])))
    with artifact.load(path) as art, artifact.load("tests/data/v2-cat-node.edgecl") as ref:
        assert art.node_groups is None and "node_groups" not in art.manifest
        assert am.same_weights(art.materialize(1), ref.materialize(1))


def test_node_masks_need_the_same_groups_in_every_task(tmp_path):
    """(Masks a spec reads are checked by `check_consistent` first; a group no spec names must agree too.)"""
    packed = agscl_like(CAT, n_tasks=2)
    packed.task_tensors[1]["nodes:extra"] = np.ones(3, bool)
    with pytest.raises(UsageError, match="node masks of task 1 differ"):
        _saved(tmp_path, packed)
    packed.task_tensors[0]["nodes:extra"] = np.ones(2, bool)
    with pytest.raises(UsageError, match="node masks of task 1 differ"):
        _saved(tmp_path, packed)
    packed = agscl_like(CAT, n_tasks=2)
    packed.task_tensors[0]["nodes:zz"] = np.ones(2, np.uint8)
    with pytest.raises(UsageError, match="'nodes:zz' of task 0 is uint8"):
        _saved(tmp_path, packed)
    packed = am.make("lps", n_tasks=2)
    packed.task_tensors[1]["nodes"] = np.ones(2, bool)
    with pytest.raises(UsageError, match="'nodes' is reserved"):
        _saved(tmp_path, packed)


def test_a_model_without_node_masks_has_an_empty_layout(tmp_path):
    packed = am.make("lps", n_tasks=2)
    with artifact.load(_saved(tmp_path, packed)) as art:
        assert art.node_groups == [] and not any(e["name"] == "nodes" for e in art.blobs.values())
        assert am.same_weights(art.materialize(1), materialize(packed, 1))


def _with_empty_groups(packed, n: int):
    for tt in packed.task_tensors:
        tt.update({f"nodes:g{i}": np.zeros(0, bool) for i in range(n)})
    return packed


def test_groups_times_tasks_count_against_the_decode_bound(tmp_path):
    """Every task reads as one `nodes:GROUP` view per group: groups × tasks objects from two lists the file holds once
    each. Empty groups cost the blobs nothing, so only the decode bound, counting the views, keeps that small."""
    with pytest.raises(UsageError, match="decoded bytes"):
        _saved(tmp_path, _with_empty_groups(am.make("node", n_tasks=40), 8_000))
    raw = open(_saved(tmp_path, am.make("node", n_tasks=40)), "rb").read()
    forged = tmp_path / "forged.edgecl"
    forged.write_bytes(am.forge_manifest(raw, lambda m: m["node_groups"].extend([f"g{i}", 0] for i in range(65_534))))
    with pytest.raises(ArtifactError, match="manifest.blobs.*decoded bytes"):
        artifact.load(forged)
    with artifact.load(_saved(tmp_path, _with_empty_groups(am.make("node", n_tasks=3), 1_000))) as art:
        assert len(art.read_task(2)) > 1_000  # real layouts (ShuffleNet: ~1,000 groups) stay far below it
