"""LPS on real digits streams: no forgetting (bit-identical predictions), disjoint supports, a feasible ADMM point,
structured (column/filter) partitions, the packed contract, and resuming from a packed model."""
import copy

import numpy as np
import pytest
import torch

from edgecl.arch import gemm_shape, preset
from edgecl.deltas import check_consistent, lps_keep, lps_owner_elements, materialize
from edgecl.errors import UsageError
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext

SHORT = {"epochs": 1, "admm_epochs": 8, "final_epochs": 1, "seed": 3}
CTX = TrainContext(progress=False)


def _snapshot(method, stream, t):
    packed = method.pack()
    return {"packed": packed, "preds": [engine.predict(packed, j, stream.tasks[j].x_test) for j in range(t + 1)],
            "weights": [materialize(packed, j) for j in range(t + 1)],
            "trace": copy.deepcopy(method.admm_trace),
            "admm": {k: [x.detach().clone() for x in v] for k, v in method.admm_state.items() if k != "layers"},
            "layers": [(lay.k_alpha, lay.k_beta, lay.free_units.clone(), lay.earlier.clone(), lay.w.detach().clone(),
                        lay.m.detach().clone()) for lay in method.admm_state["layers"]]}


def _learn(arch, config, stream, n):
    method = registry.create("lps", arch, config)
    snaps = []
    for t in range(n):
        method.learn_task(t, stream.tasks[t], CTX)
        snaps.append(_snapshot(method, stream, t))
    return method, snaps


@pytest.fixture(scope="module")
def stream():
    return make_stream("permuted-digits", 3, seed=0)


@pytest.fixture(scope="module")
def run3(stream):
    return _learn(preset("mlp"), SHORT, stream, 3)


def test_old_tasks_predictions_and_weights_are_bit_identical(run3, stream):
    _, snaps = run3
    for later in range(1, 3):
        for j in range(later):
            assert np.array_equal(snaps[later]["preds"][j], snaps[j]["preds"][j]), (later, j)
            for name, tensor in snaps[j]["weights"][j].items():
                assert np.array_equal(snaps[later]["weights"][j][name], tensor), (later, j, name)


def test_tasks_learn(run3, stream):
    _, snaps = run3
    final = snaps[-1]["packed"]
    accs = [engine.accuracy(final, j, stream.tasks[j]) for j in range(3)]
    assert min(accs) > 0.85, accs


def test_supports_are_disjoint_and_never_reassigned(run3):
    method, snaps = run3
    packed = snaps[-1]["packed"]
    for name in method.names:
        owner = lps_owner_elements(packed, name)
        size = owner.size
        own = [owner == t + 1 for t in range(3)]
        for a in range(3):
            assert own[a].sum() == round(0.1 * size)  # α = 10 % of the layer, exactly
            for b in range(a + 1, 3):
                assert not (own[a] & own[b]).any()
            # what task a runs on never includes a later task's weights
            assert not (lps_keep(packed, a, name) & (owner > a + 1)).any()
        for t in range(2):  # earlier owners and their W̄ values survive every later task untouched
            before = snaps[t]["packed"]
            held = lps_owner_elements(before, name) > 0
            assert np.array_equal(lps_owner_elements(before, name)[held], owner[held])
            assert np.array_equal(before.base[name][held], packed.base[name][held])
        # W̄ is zero wherever nobody owns the weight
        assert not packed.base[name][owner == 0].any()


def test_sharing_mask_hits_beta_over_the_earlier_support(run3):
    method, snaps = run3
    packed = snaps[-1]["packed"]
    assert not any(k.endswith(":share") for k in packed.task_tensors[0])
    for t in (1, 2):
        for name in method.names:
            owner = lps_owner_elements(packed, name)
            bits = packed.task_tensors[t][f"{name}:share"]
            earlier = int(((owner >= 1) & (owner <= t)).sum())
            assert bits.dtype == bool and bits.shape == (earlier,)
            assert bits.sum() == round(0.9 * earlier)
            assert packed.extra["beta"][t][name] == pytest.approx(0.9, abs=1e-3)


def test_admm_reaches_a_feasible_point(run3):
    _, snaps = run3
    snap = snaps[1]  # task 2: both weights and sharing masks are constrained
    for (k_alpha, k_beta, free_units, earlier, w, m), z, y in zip(snap["layers"], snap["admm"]["z"],
                                                                   snap["admm"]["y"]):
        assert (z != 0).sum() <= k_alpha and not z[~free_units.reshape(z.shape)].any()  # Z ∈ S, inside free pool
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0} and int(y.sum()) == k_beta  # Y ∈ S', binary
        assert not y[~earlier].any()
    trace = snap["trace"]
    assert trace["rho"][0] == pytest.approx(1e-3) and trace["rho"][-1] == pytest.approx(1.0)
    assert trace["w_residual"][-1] < 0.1 and trace["w_residual"][-1] < trace["w_residual"][0]
    assert trace["m_residual"][-1] < 0.05


def test_pack_contract(run3):
    method, snaps = run3
    packed = snaps[-1]["packed"]
    check_consistent(packed)
    for name in method.names:
        assert packed.params[name] == {"kind": "lps", "unit": "element"}
        assert packed.base[f"{name}:owner"].dtype == np.uint8
        assert packed.base[f"{name}:owner"].shape == packed.base[name].shape
    assert packed.params["fc1.bias"]["kind"] == "shared" and packed.params["head.weight"]["kind"] == "task"
    assert packed.extra["capacity"] == pytest.approx([0.1, 0.2, 0.3], abs=1e-3)


@pytest.mark.parametrize("pruning,arch_name,unit", [("column", "mlp", "column"), ("filter", "lenet", "row")])
def test_structured_pruning_owns_whole_columns_or_rows(pruning, arch_name, unit):
    stream = make_stream("permuted-digits", 2, seed=1)
    config = {"epochs": 1, "admm_epochs": 4, "final_epochs": 1, "batch_size": 128, "pruning": pruning}
    method, snaps = _learn(preset(arch_name), config, stream, 2)
    packed = snaps[-1]["packed"]
    check_consistent(packed)
    for name in method.names:
        assert packed.params[name]["unit"] == unit
        p, q = gemm_shape(packed.base[name].shape)
        owner = packed.base[f"{name}:owner"]
        assert owner.shape == ((q,) if unit == "column" else (p,))
        for t in range(2):
            assert (owner == t + 1).sum() == round(0.1 * owner.size)
        # task 1's own trained weights are nonzero only on whole owned columns/rows of the GEMM view
        nz = packed.base[name].reshape(p, q) != 0
        axis = 0 if unit == "column" else 1
        touched = nz.any(axis)
        assert set(np.flatnonzero(touched)) <= set(np.flatnonzero(owner > 0))
        # and task 1 runs on its own whole units plus shared elements of task 0's units only
        keep = lps_keep(packed, 1, name).reshape(p, q)
        assert not keep[(lps_owner_elements(packed, name) == 0).reshape(p, q)].any()
    assert np.array_equal(snaps[1]["preds"][0], snaps[0]["preds"][0])


def test_resume_continues_without_touching_earlier_tasks(run3, stream):
    _, snaps = run3
    method = registry.create("lps", preset("mlp"), SHORT)
    method.resume(snaps[1]["packed"])
    method.learn_task(2, stream.tasks[2], CTX)
    packed = method.pack()
    check_consistent(packed)
    assert packed.n_tasks == 3 and len(packed.extra["capacity"]) == 3
    for j in range(2):
        assert np.array_equal(engine.predict(packed, j, stream.tasks[j].x_test), snaps[1]["preds"][j])
    assert engine.accuracy(packed, 2, stream.tasks[2]) > 0.85


def test_resume_refuses_other_methods_and_architectures(run3):
    _, snaps = run3
    finetune = registry.create("finetune", preset("mlp"), {"epochs": 1})
    finetune.learn_task(0, make_stream("permuted-digits", 1).tasks[0], CTX)
    with pytest.raises(UsageError, match="finetune"):
        registry.create("lps", preset("mlp"), SHORT).resume(finetune.pack())
    with pytest.raises(UsageError, match="architecture"):
        registry.create("lps", preset("mlp", width=2), SHORT).resume(snaps[0]["packed"])
    with pytest.raises(UsageError, match="column"):
        registry.create("lps", preset("mlp"), {**SHORT, "pruning": "column"}).resume(snaps[0]["packed"])
    broken = copy.copy(snaps[0]["packed"])
    broken.base = {k: v for k, v in broken.base.items() if k != "fc2.weight:owner"}
    with pytest.raises(UsageError, match="fc2.weight:owner"):
        registry.create("lps", preset("mlp"), SHORT).resume(broken)
    broken.base = {**snaps[0]["packed"].base, "fc2.weight:owner": np.zeros(7, np.uint8)}
    with pytest.raises(UsageError, match="fc2.weight:owner"):
        registry.create("lps", preset("mlp"), SHORT).resume(broken)


@pytest.mark.parametrize("bad,match", [({"pruning": "diagonal"}, "pruning"), ({"alpha": 0.0}, "alpha"),
                                       ({"beta": 1.5}, "beta"), ({"gamma": 1}, "gamma")])
def test_bad_config_is_a_usage_error(bad, match):
    with pytest.raises(UsageError, match=match):
        registry.create("lps", preset("mlp"), bad)


def test_tasks_must_come_in_order(stream):
    method = registry.create("lps", preset("mlp"), SHORT)
    with pytest.raises(UsageError, match="task 0"):
        method.learn_task(1, stream.tasks[1], CTX)


@pytest.mark.gpu
def test_lps_trains_on_cuda_and_packs_the_same_contract():
    stream = make_stream("permuted-digits", 2, seed=0)
    method = registry.create("lps", preset("mlp"), SHORT)
    ctx = TrainContext(device="cuda", progress=False)
    method.learn_task(0, stream.tasks[0], ctx)
    before = engine.predict(method.pack(), 0, stream.tasks[0].x_test)
    method.learn_task(1, stream.tasks[1], ctx)
    packed = method.pack()
    check_consistent(packed)
    assert np.array_equal(engine.predict(packed, 0, stream.tasks[0].x_test), before)
    assert min(engine.accuracy(packed, j, stream.tasks[j]) for j in range(2)) > 0.85
