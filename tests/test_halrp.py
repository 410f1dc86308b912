"""HALRP: each piece of Algorithm 1 against an independent reference, then real training on permuted digits."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecl.arch import preset
from edgecl.deltas import check_consistent, lowrank_weight, materialize
from edgecl.errors import UsageError
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.methods.halrp import (diag_scalings, gradient_importance, lowrank_torch, prune_threshold,
                                        residual_matrix, select_ranks)
from edgecl.train.models import forward, from_numpy, init_head, init_params
from edgecl.train.protocol import TrainContext

RNG = np.random.default_rng(7)


def _lstsq_scalings(wf: np.ndarray, wb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eqs. 16–17 solved as vectorised least squares: r with S = I, then s with that r."""
    j, i = wb.shape[:2]
    rest = wb[0, 0].size
    rows = np.repeat(np.arange(j), i * rest)
    cols = np.tile(np.repeat(np.arange(i), rest), j)
    a_r = np.zeros((wb.size, j))
    a_r[np.arange(wb.size), rows] = wb.ravel()
    r = np.linalg.lstsq(a_r, wf.ravel(), rcond=None)[0]
    a_s = np.zeros((wb.size, i))
    a_s[np.arange(wb.size), cols] = (r.reshape((j,) + (1,) * (wb.ndim - 1)) * wb).ravel()
    s = np.linalg.lstsq(a_s, wf.ravel(), rcond=None)[0]
    return r, s


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 3, 3)])
def test_scalings_match_a_direct_least_squares_solver(shape):
    wb = RNG.normal(size=shape)
    wf = 1.3 * wb + 0.2 * RNG.normal(size=shape)
    r, s = diag_scalings(torch.tensor(wf), torch.tensor(wb))
    r_ref, s_ref = _lstsq_scalings(wf, wb)
    np.testing.assert_allclose(r.numpy(), r_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-5, atol=1e-6)
    # more alternations never increase the Eq. 3 residual (B excluded)
    res = [np.linalg.norm(wf - np.einsum("j,ji...,i->ji...", *(x.double().numpy() for x in (rr, torch.tensor(wb), ss))))
           for rr, ss in (diag_scalings(torch.tensor(wf), torch.tensor(wb), k) for k in (1, 2, 5))]
    assert res[0] >= res[1] - 1e-9 >= res[2] - 2e-9


def test_conv_residual_is_averaged_over_kernel_positions():
    wb, wf = RNG.normal(size=(2, 5, 3, 3, 3))
    r, s = RNG.normal(size=5), RNG.normal(size=3)
    b = residual_matrix(*(torch.tensor(x) for x in (wf, wb, r, s))).numpy()
    expect = (wf - r[:, None, None, None] * wb * s[None, :, None, None]).mean(axis=(2, 3))
    np.testing.assert_allclose(b, expect, rtol=1e-12)


def _brute_force_eq11(sigmas, importance, alpha):
    """All prefix-rank tuples reaching alpha of the total score; the fewest ranks, ties to the highest score."""
    names = list(sigmas)
    score = {n: importance[n] * np.asarray(sigmas[n], np.float64) ** 2 for n in names}
    total = sum(s.sum() for s in score.values())
    best = None
    for ks in itertools.product(*(range(len(sigmas[n]) + 1) for n in names)):
        kept = sum(score[n][:k].sum() for n, k in zip(names, ks))
        if kept >= alpha * total:
            key = (sum(ks), -kept)
            if best is None or key < best[0]:
                best = (key, dict(zip(names, ks)))
    return best[1]


@pytest.mark.parametrize("seed", range(12))
def test_rank_selection_matches_brute_force_eq11(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=rng.integers(2, 4))
    sigmas = {f"l{i}": np.sort(rng.gamma(1.0, size=n))[::-1] for i, n in enumerate(sizes)}
    importance = {n: float(rng.gamma(0.5) * 10 ** rng.uniform(-2, 2)) for n in sigmas}
    alpha = float(rng.choice([0.3, 0.6, 0.9, 0.99]))
    assert select_ranks(sigmas, importance, alpha) == _brute_force_eq11(sigmas, importance, alpha)


def test_rank_selection_follows_the_gradient_term():
    sig = {"a": np.array([1.0, 0.5]), "b": np.array([1.0, 0.5])}
    assert select_ranks(sig, {"a": 100.0, "b": 1.0}, 0.9) == {"a": 2, "b": 0}
    assert select_ranks(sig, {"a": 1.0, "b": 100.0}, 0.9) == {"a": 0, "b": 2}
    assert select_ranks(sig, {"a": 1.0, "b": 100.0}, 0.9, min_rank=1, max_rank=1) == {"a": 1, "b": 1}


def test_gradient_importance_is_the_mean_squared_minibatch_gradient_norm():
    """G_l against nn.Module autograd on the same mini-batches (a LeNet: conv and linear layers)."""
    stream = make_stream("permuted-digits", 1, seed=0)
    task, arch = stream.tasks[0], preset("lenet")
    params = {**init_params(arch, generator=torch.Generator().manual_seed(1)), **init_head(arch, 10)}
    names = ["conv1.weight", "conv2.weight", "fc1.weight"]
    got = gradient_importance(arch, params, names, task, 256, torch.Generator().manual_seed(3))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 20, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(20, 50, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(200, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    keys = ["conv1", "conv2", "fc1", "head"]
    with torch.no_grad():
        for k, m in zip(keys, [net[0], net[3], net[7], net[9]]):
            m.weight.copy_(params[f"{k}.weight"])
            m.bias.copy_(params[f"{k}.bias"])
    x, y = torch.from_numpy(task.x_train), torch.from_numpy(task.y_train)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    sums, n = np.zeros(3), 0
    for i in range(0, len(x), 256):
        idx = order[i:i + 256]
        net.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        sums += [float((m.weight.grad.double() ** 2).sum()) for m in (net[0], net[3], net[7])]
        n += 1
    np.testing.assert_allclose([got[k] for k in names], sums / n, rtol=1e-4)


def _unfolded(x, base, r, s, u, v, bias, stride=1, pad=0):
    """The reference's two-path forward: r·(W * (s·x)) plus the low-rank branch u(sum over the k×k window of vᵀx)."""
    if base.ndim == 2:
        return F.linear(x * s, base) * r + (x @ v) @ u.T + bias
    k = base.shape[-1]
    main = F.conv2d(x * s.view(1, -1, 1, 1), base, None, stride, pad) * r.view(1, -1, 1, 1)
    low = F.conv2d(x, v.T.reshape(v.shape[1], -1, 1, 1))
    low = F.avg_pool2d(low, k, stride, pad, count_include_pad=True) * (k * k)
    return main + F.conv2d(low, u.reshape(u.shape[0], -1, 1, 1)) + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("shape,xshape,stride,pad", [((9, 6), (5, 6), 1, 0), ((8, 4, 3, 3), (2, 4, 7, 7), 1, 1),
                                                     ((8, 4, 3, 3), (2, 4, 9, 9), 2, 0)])
def test_folded_weight_equals_the_unfolded_low_rank_branch(shape, xshape, stride, pad):
    base, r, s, u, v, bias, x = (RNG.normal(size=sz).astype(np.float32) for sz in
                                 (shape, shape[0], shape[1], (shape[0], 3), (shape[1], 3), shape[0], xshape))
    w = torch.from_numpy(lowrank_weight(base, r, s, u, v))
    xt, bt = torch.from_numpy(x), torch.from_numpy(bias)
    folded = F.linear(xt, w, bt) if len(shape) == 2 else F.conv2d(xt, w, bt, stride, pad)
    ref = _unfolded(xt, *(torch.from_numpy(a) for a in (base, r, s, u, v)), bt, stride, pad)
    np.testing.assert_allclose(folded.numpy(), ref.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lowrank_torch(*(torch.from_numpy(a) for a in (base, r, s, u, v))).numpy(),
                               w.numpy(), atol=1e-6)


def test_prune_thresholds():
    vals = np.array([0.5, -0.4, 3e-6, -2e-6, 0.1, 0.2], np.float32)
    assert prune_threshold(vals, "absolute", 1e-5, 0) == 1e-5
    keep = np.abs(vals) > prune_threshold(vals, "percentile", 1e-5, 3)
    assert keep.tolist() == [True, True, False, False, False, True]
    assert prune_threshold(vals, "mixed", 1e-5, 100) == 1e-5
    assert prune_threshold(vals, "mixed", 1e-5, 2) == pytest.approx(0.2)


def test_bad_config_names_the_field():
    with pytest.raises(UsageError, match="prune"):
        registry.create("halrp", preset("mlp"), {"prune": "sometimes"})
    with pytest.raises(UsageError, match="warmup_epochs"):
        registry.create("halrp", preset("mlp"), {"epochs": 2, "warmup_epochs": 2})


@pytest.fixture(scope="module")
def mlp_run():
    """Three permuted-digit tasks with the MLP; the model is packed after every task."""
    stream = make_stream("permuted-digits", 3, seed=0)
    method = registry.create("halrp", preset("mlp"), {"epochs": 4, "lr": 3e-3, "prune": "percentile",
                                                      "prune_budget": 0.05})
    ctx = TrainContext(progress=False)
    packs = []
    for t, task in enumerate(stream.tasks):
        method.learn_task(t, task, ctx)
        packs.append(method.pack())
    return stream, method, packs


def test_old_tasks_are_bit_identical_after_later_tasks(mlp_run):
    stream, _, packs = mlp_run
    for later in range(1, len(packs)):
        for t in range(later):
            before, after = materialize(packs[t], t), materialize(packs[later], t)
            assert all(np.array_equal(before[k], after[k]) for k in before)
            x = stream.tasks[t].x_test
            assert np.array_equal(engine.predict(packs[t], t, x), engine.predict(packs[later], t, x))


def test_packed_form_and_learning(mlp_run):
    stream, method, packs = mlp_run
    packed = packs[-1]
    check_consistent(packed)
    assert {packed.params[n]["kind"] for n in ("fc1.weight", "fc2.weight")} == {"lowrank"}
    assert {packed.params[n]["kind"] for n in ("fc1.bias", "fc2.bias", "head.weight")} == {"task"}
    assert not any(":" in k for k in packed.task_tensors[0])             # task 0 is the base itself
    np.testing.assert_array_equal(materialize(packed, 0)["fc2.weight"], packed.base["fc2.weight"])
    for t in (1, 2):
        tt, ranks = packed.task_tensors[t], packed.extra["ranks"][t]
        for n, (j, i) in (("fc1.weight", (256, 64)), ("fc2.weight", (256, 256))):
            assert tt[f"{n}:r"].shape == (j,) and tt[f"{n}:s"].shape == (i,)
            assert tt[f"{n}:u"].shape == (j, ranks[n]) and tt[f"{n}:v"].shape == (i, ranks[n])
        fac = sum(np.count_nonzero(tt[f"{n}:{f}"]) for n in ("fc1.weight", "fc2.weight") for f in "uv")
        assert fac <= 0.05 * (256 * 64 + 256 * 256)                         # the percentile budget holds
        assert packed.extra["task_params"][t]["factors"] == fac
        acc = engine.accuracy(packed, t, stream.tasks[t])
        assert acc > 0.8, f"task {t} accuracy {acc}"
    growth = packed.extra["growth"]
    assert growth[0] == 0 and 0 < growth[1] < growth[2] < 1


def test_training_forward_is_the_deployed_forward():
    """LeNet (convolutions): the fine-tuned parametrisation evaluated in torch equals materialize, and learns —
    also when Eq. 11 gives a layer rank 0 (a low alpha makes sure some layer gets it)."""
    stream = make_stream("permuted-digits", 2, seed=1)
    method = registry.create("halrp", preset("lenet"), {"epochs": 3, "lr": 3e-3, "alpha": 0.5})
    ctx = TrainContext(progress=False)
    for t, task in enumerate(stream.tasks):
        method.learn_task(t, task, ctx)
    packed = method.pack()
    tt = packed.task_tensors[1]
    for n in ("conv1.weight", "conv2.weight", "fc1.weight"):
        torch_w = lowrank_torch(*(torch.from_numpy(a) for a in
                                  (packed.base[n], tt[f"{n}:r"], tt[f"{n}:s"], tt[f"{n}:u"], tt[f"{n}:v"])))
        np.testing.assert_allclose(torch_w.numpy(), materialize(packed, 1)[n], atol=1e-6)
        assert tt[f"{n}:u"].shape[1] == tt[f"{n}:v"].shape[1] == packed.extra["ranks"][1][n]
    assert min(packed.extra["ranks"][1].values()) == 0
    x = torch.from_numpy(stream.tasks[1].x_test)
    logits = forward(packed.arch, from_numpy(materialize(packed, 1)), x)
    assert float((logits.argmax(1).numpy() == stream.tasks[1].y_test).mean()) > 0.5  # chance: 0.1


def test_penalty_gradient_is_the_gradient_of_eq12():
    method = registry.create("halrp", preset("mlp"), {"lambda0": 1e-3, "lambda1": 5e-3})
    gen = torch.Generator().manual_seed(0)
    factors = {f"{n}:{f}": torch.randn(shape, generator=gen).requires_grad_(True)
               for n, j, i, k in (("fc1.weight", 256, 64, 3), ("fc2.weight", 256, 256, 0))
               for f, shape in (("r", (j,)), ("s", (i,)), ("u", (j, k)), ("v", (i, k)))}
    auto = torch.autograd.grad(method.penalty(factors), list(factors.values()), allow_unused=True,
                               materialize_grads=True)
    method.add_penalty_grad(factors)
    for a, p in zip(auto, factors.values()):
        if p.numel():                                   # rank-0 factors have nothing to regularise
            np.testing.assert_allclose(p.grad.numpy(), a.numpy(), rtol=1e-6, atol=1e-9)


def test_resume_appends_without_touching_earlier_tasks(mlp_run):
    stream, method, packs = mlp_run
    resumed = registry.create("halrp", preset("mlp"), method.config.to_json())
    resumed.resume(packs[1])
    resumed.learn_task(2, stream.tasks[2], TrainContext(progress=False))
    after = resumed.pack()
    for t in (0, 1):
        before, now = materialize(packs[1], t), materialize(after, t)
        assert all(np.array_equal(before[k], now[k]) for k in before)
    assert after.n_tasks == 3 and len(after.extra["ranks"]) == 3 and len(packs[1].extra["ranks"]) == 2
    with pytest.raises(UsageError, match="finetune"):
        resumed.resume(registry.create("finetune", preset("mlp"), {}).pack())


def test_a_task_that_keeps_no_residual_factor_still_trains():
    """At a learning rate too small to move anything, no rank survives selection: the penalty step has no factor to
    touch and must skip, not crash (torch's foreach ops refuse empty lists)."""
    stream = make_stream("split-digits", 2, seed=0)
    method = registry.create("halrp", preset("mlp"), {"epochs": 2, "warmup_epochs": 1, "lr": 1e-30})
    result = engine.run(method, stream, TrainContext(progress=False), log=lambda *_: None)
    assert len(result.acc_matrix) == 2
    assert sum(method.ranks[1].values()) == 0
