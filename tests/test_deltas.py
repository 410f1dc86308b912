"""materialize(): each delta kind against arithmetic written out by hand."""
import numpy as np
import pytest

from edgecl.arch import preset, validate
from edgecl.deltas import PackedModel, TaskInfo, check_consistent, materialize, task_permutation
from edgecl.errors import UsageError

ARCH = validate({"name": "tiny", "input_shape": [3], "layers": [{"op": "linear", "name": "fc", "in": 3, "out": 2}]})
RNG = np.random.default_rng(0)
W = RNG.normal(size=(2, 3)).astype(np.float32)
B = RNG.normal(size=2).astype(np.float32)


def _packed(weight_spec, base, tasks, infos=None):
    heads = [{"head.weight": np.ones((2, 2), np.float32), "head.bias": np.zeros(2, np.float32)} for _ in tasks]
    params = {"fc.weight": weight_spec, "fc.bias": {"kind": "shared"}, "head.weight": {"kind": "task"},
              "head.bias": {"kind": "task"}}
    return PackedModel(ARCH, "x", {}, params, {"fc.bias": B, **base},
                       infos or [TaskInfo(f"t{i}", 2) for i in range(len(tasks))], [{**h, **t} for h, t in
                                                                                    zip(heads, tasks)])


def test_lps_keep_is_own_plus_shared_earlier():
    owner = np.array([[1, 2, 0], [2, 1, 1]], np.uint8)
    share1 = np.array([True, False, True])  # over elements owned by task 0, C order: (0,0), (1,1), (1,2)
    p = _packed({"kind": "lps", "unit": "element"}, {"fc.weight": W, "fc.weight:owner": owner},
                [{}, {"fc.weight:share": share1}])
    check_consistent(p)
    np.testing.assert_array_equal(materialize(p, 0)["fc.weight"], W * (owner == 1))
    expect = W * np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    np.testing.assert_array_equal(materialize(p, 1)["fc.weight"], expect)


def test_lps_column_units_expand_to_whole_columns():
    p = _packed({"kind": "lps", "unit": "column"}, {"fc.weight": W, "fc.weight:owner": np.array([1, 0, 1], np.uint8)},
                [{}])
    np.testing.assert_array_equal(materialize(p, 0)["fc.weight"], W * np.array([1, 0, 1], np.float32))


def test_lps_share_of_wrong_length_is_an_error():
    p = _packed({"kind": "lps"}, {"fc.weight": W, "fc.weight:owner": np.ones((2, 3), np.uint8)},
                [{}, {"fc.weight:share": np.ones(2, bool)}])
    with pytest.raises(UsageError, match="sharing mask"):
        check_consistent(p)


def test_node_masks_zero_rows_and_columns():
    spec = {"kind": "node", "rows": "fc", "cols": None}
    p = _packed(spec, {"fc.weight": W}, [{"nodes:fc": np.array([True, False])}])
    np.testing.assert_array_equal(materialize(p, 0)["fc.weight"], W * np.array([[1], [0]], np.float32))


def test_lowrank_matches_formula_for_linear_and_conv():
    r, s = np.array([2.0, 0.5], np.float32), np.array([1.0, -1.0, 3.0], np.float32)
    u, v = RNG.normal(size=(2, 1)).astype(np.float32), RNG.normal(size=(3, 1)).astype(np.float32)
    p = _packed({"kind": "lowrank"}, {"fc.weight": W},
                [{}, {"fc.weight:r": r, "fc.weight:s": s, "fc.weight:u": u, "fc.weight:v": v}])
    np.testing.assert_array_equal(materialize(p, 0)["fc.weight"], W)
    np.testing.assert_allclose(materialize(p, 1)["fc.weight"], np.diag(r) @ W @ np.diag(s) + u @ v.T, rtol=1e-6)


def test_permutation_is_deterministic_and_a_permutation():
    a = task_permutation(3, "fc1", 100)
    np.testing.assert_array_equal(a, task_permutation(3, "fc1", 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, task_permutation(4, "fc1", 100))
    assert not np.array_equal(a, task_permutation(3, "fc2", 100))
    # pinned values: a deployed artifact's permutations must never change between releases
    assert task_permutation(1, "fc1", 8).tolist() == PINNED


PINNED = [7, 1, 2, 3, 0, 6, 5, 4]


def test_permute_kind_rows():
    p = _packed({"kind": "permute", "group": "fc"}, {"fc.weight": W}, [{}], [TaskInfo("t0", 2, seed=5)])
    np.testing.assert_array_equal(materialize(p, 0)["fc.weight"], W[task_permutation(5, "fc", 2)])


def test_task_lookup_errors_name_the_task():
    p = _packed({"kind": "shared"}, {"fc.weight": W}, [{}])
    with pytest.raises(UsageError, match="out of range"):
        materialize(p, 3)
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        materialize(p, "nope")
    assert p.task_index("t0") == 0


def test_consistency_catches_wrong_shapes():
    p = _packed({"kind": "shared"}, {"fc.weight": W.T.copy()}, [{}])
    with pytest.raises(UsageError, match="fc.weight"):
        check_consistent(p)


def test_presets_validate():
    for name in ("mlp", "lenet", "resnet"):
        assert preset(name)["feature_dim"] > 0
    with pytest.raises(UsageError):
        preset("vgg")


@pytest.mark.parametrize("shape", [(300, 70), (6, 5, 3, 3)])
@pytest.mark.parametrize("parts", ["rsuv", "uv", "rs", "r", "s", "rsu0"])
def test_lowrank_written_in_place_has_the_same_bits(shape, parts):
    """The runtime writes low-rank weights into its buffers (blocks of rows, residual first); `materialize` and the
    per-element formula ((r·W)·s) + UVᵀ must agree with it bit for bit, whichever factors a task has."""
    from edgecl.deltas import lowrank_weight

    rng = np.random.default_rng(1)
    base = rng.normal(size=shape).astype(np.float32)
    j, i = shape[:2]
    rank = 0 if "u0" in parts else 4
    r = rng.normal(size=j).astype(np.float32) if "r" in parts else None
    s = rng.normal(size=i).astype(np.float32) if "s" in parts else None
    u, v = (rng.normal(size=(j, rank)).astype(np.float32), rng.normal(size=(i, rank)).astype(np.float32)) \
        if "u" in parts else (None, None)
    extra = (1,) * (len(shape) - 2)
    expected = base.copy()
    if r is not None:
        expected = r.reshape((-1, 1) + extra) * expected
    if s is not None:
        expected = expected * s.reshape((1, -1) + extra)
    if u is not None and rank:
        expected = expected + (u @ v.T).reshape((j, i) + extra)
    out = np.full(shape, np.nan, np.float32)
    assert lowrank_weight(base, r, s, u, v, out=out) is out
    for got in (out, lowrank_weight(base, r, s, u, v)):
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_node_segments_of_the_wrong_width_are_refused_before_allocating(axis):
    """An artifact's segment repeat is checked against the tensor before its mask is built: a repeat of 10^7 made
    the loader allocate 954 MB (lenet's fc1) before refusing the width; 10^9 would have been ~100 GB."""
    import tracemalloc

    group = "fc" if axis == "rows" else "input"
    p = _packed({"kind": "node", "rows": "fc", axis: [[group, 10 ** 7]]}, {"fc.weight": W},
                [{"nodes:fc": np.array([True, False])}])
    tracemalloc.start()
    try:
        with pytest.raises(UsageError, match=f"node {axis}.* cover {2 if axis == 'rows' else 3}0000000 "):
            check_consistent(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 ** 20, peak
    bad = _packed({"kind": "node", "rows": "fc", axis: [[group, -1]]}, {"fc.weight": W},
                  [{"nodes:fc": np.array([True, False])}])
    with pytest.raises(UsageError, match="repeats -1 times"):
        check_consistent(bad)
