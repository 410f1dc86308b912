"""The in-place runtime's switched convolutions in ONNX Runtime's blocked (NCHWc) layout (`edgecl.runtime.blocked_convs`,
`edgecl.runtime.blocked_plans`): real sessions, compared with `materialize` + a folded dense session per task.

Tolerance: the blocked graph folds BatchNorm into the convolution (as ONNX Runtime does in a dense session) and sums in
a blocked order, so logits agree with the folded reference within float rounding: 1e-5 absolute on logits of
magnitude ~1 (measured up to 8e-7 on resnet18)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgecl.arch import from_torch, preset
from edgecl.deltas import materialize
from edgecl.graph.builder import build_onnx
from edgecl.runtime import TaskRuntime, costs
from edgecl.runtime.blocked_convs import (BLOCKS, LAYOUTS, Candidate, derive, find_candidates, padded_shape,
                                          reorder, reorder_index, unblock)
from edgecl.runtime.blocked_plans import BlockedPlan
from edgecl.runtime.plan import read_plans
from edgecl.runtime.providers import ALIGN, aligned_zeros
from edgecl.source import open_model
from edgecl.synthetic import random_packed

TOL = 1e-5


class Net(nn.Module):
    """Every case the derivation meets: a first conv on 3 input channels, channel counts not a multiple of any block
    (padding), a depthwise conv, a conv with a bias and no BatchNorm, and a conv whose output a BatchNorm and a
    residual add both read (the BatchNorm must not be folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 20, 3, padding=1, bias=False), nn.BatchNorm2d(20)
        self.dw, self.b1 = nn.Conv2d(20, 20, 3, padding=1, groups=20, bias=False), nn.BatchNorm2d(20)
        self.c2 = nn.Conv2d(20, 24, 1, bias=True)
        self.c3, self.b3 = nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b0(self.c0(x)))
        h = torch.relu(self.b1(self.dw(h)))
        h = torch.relu(self.c2(h))
        y = self.c3(h)
        h = torch.relu(self.b3(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.fixture(scope="module")
def net():
    return from_torch(Net().eval(), (3, 8, 8))


def references(packed, x):
    return [ort.InferenceSession(build_onnx(packed.arch, materialize(packed, t)).SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for t in range(packed.n_tasks)]


def check_parity(packed, runtime, x, order=(0, 1, 2, 0, 2, 1)):
    refs = references(packed, x)
    for t in order:
        np.testing.assert_allclose(runtime.infer(x, task=t), refs[t], atol=TOL, rtol=0)


def nchwc_available() -> bool:
    """Whether this CPU's ONNX Runtime has NCHWc kernels (x86-64 with AVX2 or AVX-512)."""
    return bool(derive(preset("lenet"), read_plans(open_model(random_packed(preset("lenet"), 2, "lps"))).plans, {}))


needs_nchwc = pytest.mark.skipif(not nchwc_available(), reason="no NCHWc kernels on this CPU")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_reorder_index_and_unblock_invert_reorder(layout, block):
    w = np.random.default_rng(0).standard_normal((20, 13, 3, 3)).astype(np.float32)
    blocked = reorder(w, block, layout)
    assert blocked.shape == padded_shape(w.shape, block, layout)
    flat = np.append(w.reshape(-1), np.float32(0))
    assert np.array_equal(flat[reorder_index(w.shape, block, layout)], blocked.reshape(-1))
    assert np.array_equal(unblock(blocked, w.shape, block, layout), w)
    assert not blocked.reshape(-1)[:w.size].tolist() == w.reshape(-1).tolist()  # a real permutation


@needs_nchwc
def test_every_accepted_conv_reproduces_onnx_runtimes_bytes(net):
    """The derivation accepts only what it reproduced; the test reproduces it again from the runtime's own buffers:
    the blocked buffer mapped back (`unblock`) is the task's materialised weight times its BatchNorm scale."""
    packed = random_packed(net, 3, "lps", bn="task")
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=3, threads=1)
    strategy = runtime._strategy
    assert set(strategy.blocked_convs) == {"c0", "dw", "c2", "c3"}
    convs = strategy._blocked.convs
    assert convs["c0"].layout == "OIHWBo" and convs["dw"].layout == "OIHWBo" and convs["c2"].layout == "OIHWBiBo"
    assert convs["c0"].shape[0] > 20 and convs["c0"].fold and not convs["c3"].fold and not convs["c2"].fold
    assert all(f"{bn}.weight" not in {p.name for p in strategy.plans} for bn in ("b0", "b1"))
    assert "b3.weight" in {p.name for p in strategy.plans}  # read by the graph: not folded
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    check_parity(packed, runtime, x)
    for t in range(3):
        dense = materialize(packed, t)
        with strategy.cache.use(t) as slot:
            for plan in strategy.varying:
                if not isinstance(plan, BlockedPlan):
                    continue
                bc = convs[plan.conv]
                got = unblock(slot.buffers.host[plan.name], bc.shape, bc.block, bc.layout)
                o, i = bc.cand.shape[:2]
                assert not got[o:].any() and not got[:, i:].any()  # padding is zero
                _, scale = bc.cand.vectors(dense, bc.fold)
                want = dense[bc.cand.weight] * scale[:, None, None, None]
                np.testing.assert_allclose(got[:o, :i], want, rtol=1e-6, atol=0)
    assert "switched convs blocked" in runtime.describe()
    assert runtime.memory_report(measure=False)["blocked_convs"] == ["c0", "dw", "c2", "c3"]


@needs_nchwc
@pytest.mark.parametrize("shape", ["lps", "node", "lowrank", "permute", "mixed"])
@pytest.mark.parametrize("bn", ["shared", "task"])
def test_every_delta_kind_matches_materialize(net, shape, bn):
    packed = random_packed(net, 3, shape, bn=bn)
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=2, threads=1)
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    check_parity(packed, runtime, x)
    assert runtime._strategy.blocked_convs  # something ran blocked (the 3-channel first conv at least)


@needs_nchwc
@pytest.mark.parametrize("shape", ["lps", "node"])
def test_what_mlas_reads_in_place_starts_on_a_cache_line(net, shape):
    """Slot buffers (LPS: blocked filters written at a switch) and the derived graph's external constants (node
    masks: ONNX Runtime's reordered shared filters) are read by MLAS where they lie; numpy's 16-byte alignment made
    its 64-byte loads straddle cache lines (resnet18 LPS convs 1.15× dense at batch 64, tools/profile_inplace.py)."""
    packed = random_packed(net, 3, shape, bn="task")
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=2, threads=1)
    strategy = runtime._strategy
    runtime.switch(1)
    host = [a for slot in strategy.cache.slots for a in slot.buffers.host.values()]
    constants = list(strategy._blocked.constants.values())
    assert host and (shape == "lps" or constants)
    assert all(a.ctypes.data % ALIGN == 0 and a.flags.c_contiguous for a in host + constants)
    check_parity(packed, runtime, np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32))


@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 3, 7, 7), (0, 4)])
def test_aligned_zeros(shape):
    a = aligned_zeros(shape)
    assert a.shape == shape and a.dtype == np.float32 and not a.any() and a.flags.writeable
    assert a.size == 0 or a.ctypes.data % ALIGN == 0
    a[...] = 1  # its own memory: writing it touches nothing else
    assert a.sum() == a.size


@needs_nchwc
def test_from_a_file_with_heads_and_batchnorm_read_on_miss(net, tmp_path):
    from edgecl import artifact

    packed = random_packed(net, 3, "lps", bn="task")
    path = tmp_path / "m.edgecl"
    artifact.save(packed, str(path))
    runtime = TaskRuntime(str(path), strategy="inplace", cache_tasks=1, threads=2, task_tensors="cached")
    assert runtime._strategy.blocked_convs
    check_parity(packed, runtime, np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32))


@needs_nchwc
def test_a_conv_that_would_bake_a_placeholder_is_excluded(net):
    """Forced as a candidate with the BatchNorm that a residual add also reads: ONNX Runtime does not fold that
    BatchNorm into the conv, so its placeholders survive (or are baked into a derived initializer); the conv must
    not be blocked with its BatchNorm, and the runtime built without it still matches."""
    packed = random_packed(net, 3, "lps", bn="task")
    plans = read_plans(open_model(packed), factored=True).plans
    by_name = {p.name: p for p in plans}
    cands = find_candidates(net, by_name)
    assert {c.conv: c.bn for c in cands} == {"c0": "b0", "dw": "b1", "c2": None, "c3": None}
    forced = [Candidate(c.conv, c.shape, c.bias, "b3", 1e-5) if c.conv == "c3" else c for c in cands]
    blocked = derive(net, plans, {}, candidates=forced)
    assert blocked is not None and "c3" not in blocked.convs and {"c0", "dw", "c2"} <= set(blocked.convs)
    graph_inputs = {i.name for i in blocked.model.graph.input}
    assert {"c3.weight", "b3.weight", "b3.running_var"} <= graph_inputs  # left as today's inputs
    assert not any(i.name.startswith(("c3.", "b3.")) for i in blocked.model.graph.initializer)


@needs_nchwc
def test_fallback_when_the_transformer_does_nothing(net):
    packed = random_packed(net, 3, "lps", bn="task")
    plans = read_plans(open_model(packed), factored=True).plans
    assert derive(net, plans, {}, disabled=("GemmTransposeFusion", "NchwcTransformer", "ConvBNFusion",
                                            "ConvAddFusion", "ConvActivationFusion")) is None
    mlp = random_packed(preset("mlp"), 3, "lps")
    runtime = TaskRuntime(mlp, strategy="inplace", threads=1)
    assert runtime._strategy.blocked_convs == [] and runtime._strategy._blocked is None
    unblocked = TaskRuntime(packed, strategy="inplace", threads=1, blocked_convs=False)
    assert unblocked._strategy.blocked_convs == []
    check_parity(packed, unblocked, np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32))


@needs_nchwc
def test_threads_and_fewer_slots_than_tasks(net):
    from concurrent.futures import ThreadPoolExecutor

    packed = random_packed(net, 4, "lps", bn="task")
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=2, threads=1)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    refs = references(packed, x)
    order = np.random.default_rng(6).integers(0, 4, 120)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda t: (t, runtime.infer(x, task=int(t))), order))
    for t, y in outs:
        np.testing.assert_allclose(y, refs[t], atol=TOL, rtol=0)
    assert runtime.cache_info()["misses"] > 2


@needs_nchwc
def test_parallel_masked_fill_of_a_blocked_weight(net):
    """A blocked weight of several fill chunks is written by many threads, then scaled: same as one thread."""
    from edgecl.runtime import maskfill

    arch = from_torch(nn.Sequential(nn.Conv2d(3, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                                    nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)).eval(), (3, 8, 8))
    packed = random_packed(arch, 3, "lps", bn="task")
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=4)
    big = [p for p in runtime._strategy.varying if isinstance(p, BlockedPlan) and p.splits]
    assert big and int(np.prod(big[0].shape)) >= 2 * maskfill.CHUNK
    check_parity(packed, runtime, np.random.default_rng(7).standard_normal((2, 3, 8, 8)).astype(np.float32))


@needs_nchwc
def test_derived_graph_reads_no_placeholder(net):
    """No initializer of the session's graph is a candidate tensor: each became an input or was folded away."""
    packed = random_packed(net, 3, "lps", bn="task")
    plans = read_plans(open_model(packed), factored=True).plans
    blocked = derive(net, plans, {})
    names = {t for c in find_candidates(net, {p.name: p for p in plans}) for t in c.tensors}
    assert not names & {i.name for i in blocked.model.graph.initializer}
    assert any(n.domain == "com.microsoft.nchwc" for n in blocked.model.graph.node)
    onnx.checker.check_model(blocked.model)  # external constants: structure only


@needs_nchwc
def test_reorder_and_bn_fold_equal_onnx_runtimes_own_on_a_dense_graph(net):
    """Independently of the derivation: a dense graph of task 0's weights optimised by ONNX Runtime holds, for each
    conv, exactly `reorder(bn_fold(W))` in one of the layouts and blocks tried (the first conv and the depthwise one
    OIHWBo, the others OIHWBiBo)."""
    from edgecl.runtime.blocked_convs import _initializers, _optimise

    packed = random_packed(net, 2, "lps", bn="task")
    dense = materialize(packed, 0)
    model = _optimise(net, dense, {}, ["GemmTransposeFusion"])
    inits = _initializers(model)
    weights = [inits[n.input[1]] for n in model.graph.node if n.domain == "com.microsoft.nchwc" and n.op_type == "Conv"]
    cands = find_candidates(net, {p.name: p for p in read_plans(open_model(packed), factored=True).plans})
    for c in cands:
        w, _, _ = c.folded(dense, c.bn is not None)
        found = [(layout, block) for layout in LAYOUTS for block in BLOCKS for got in weights
                 if got.shape == padded_shape(w.shape, block, layout)
                 and np.allclose(got, reorder(w, block, layout), rtol=1e-6, atol=0)]
        assert found, c.conv
        assert found[0][0] == ("OIHWBo" if c.conv in ("c0", "dw") else "OIHWBiBo"), (c.conv, found)


@needs_nchwc
@pytest.mark.slow
@pytest.mark.parametrize("shape", ["lps", "lowrank"])
def test_torchvision_resnet18_runs_every_switched_conv_blocked(shape):
    """torchvision resnet18 at 3×32×32, per-task BatchNorm: every conv whose weight a switch writes runs blocked
    (all 20 for LPS), and logits match the folded references (measured ≤ 8e-7)."""
    from edgecl.arch.factories import ensure_torchvision_imports

    ensure_torchvision_imports()
    import torchvision

    arch = from_torch(torchvision.models.resnet18(num_classes=10).eval(), (3, 32, 32))
    packed = random_packed(arch, 3, shape, bn="task")
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=2, threads=1)
    switched = {p.name.rsplit(".", 1)[0] for p in read_plans(open_model(packed), factored=True).plans
                if p.varies and p.name.endswith(".weight") and len(p.shape) == 4}
    assert set(runtime._strategy.blocked_convs) == switched and (shape != "lps" or len(switched) == 20)
    check_parity(packed, runtime, np.random.default_rng(8).standard_normal((2, 3, 32, 32)).astype(np.float32),
                 order=(0, 1, 2, 0))


@needs_nchwc
@pytest.mark.slow
def test_a_trained_lps_resnet_with_per_task_batchnorm():
    """Real LPS training (the resnet preset, per-task BatchNorm: LPS's default) on split digits: the blocked
    runtime's logits match the folded references and its predictions the training engine's."""
    from edgecl.train.data import make_stream
    from edgecl.train.engine import predict, run
    from edgecl.train.protocol import TrainContext
    from edgecl.train.registry import create

    torch.manual_seed(0)
    stream = make_stream("split-digits", 2, 0)
    method = create("lps", preset("resnet"), {"epochs": 1})
    packed = run(method, stream, TrainContext(progress=False), log=lambda *a: None).packed
    assert any(spec.get("kind") == "task" and name.endswith("running_var") for name, spec in packed.params.items())
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=1)
    assert runtime._strategy.blocked_convs
    for t, task in enumerate(stream.tasks):
        x = task.x_test[:64]
        np.testing.assert_allclose(runtime.infer(x, task=t), references(packed, x)[t], atol=TOL, rtol=0)
        assert np.mean(runtime.infer(x, task=t).argmax(1) == predict(packed, t, x)) >= 0.98


@needs_nchwc
def test_no_usable_temp_dir_falls_back_to_the_unblocked_graph_with_a_warning(net, tmp_path, monkeypatch):
    """The derivation reads ONNX Runtime's optimised graph back from a temporary file; on a device whose temp dir is
    unusable (read-only root, a path that is a file) the runtime must still start, unblocked — it needs no file
    otherwise — say why in an EdgeclWarning and its memory report, and match the references; no file is left."""
    import tempfile

    from edgecl.errors import EdgeclWarning

    packed = random_packed(net, 3, "lps", bn="task")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_dir))
    with pytest.warns(EdgeclWarning, match="blocked layout unavailable.*Not a directory"):
        runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=2, threads=1)
    assert runtime._strategy.blocked_convs == [] and runtime._strategy._blocked is None
    assert "Not a directory" in runtime.memory_report(measure=False)["blocked_fallback"]
    check_parity(packed, runtime, np.random.default_rng(9).standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


class Wide(nn.Module):
    """Weights large next to its activations at batch 1: the derivation's moment outweighs the rest."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


def _budget_runtimes(packed, **kw):
    """The unblocked and blocked runtimes' ledgers without a budget (charge_environment=False: ONNX Runtime's
    environment is charged only to a process's first runtime), closed."""
    kw = dict(strategy="inplace", cache_tasks=1, threads=1, charge_environment=False, **kw)
    unblocked = TaskRuntime(packed, blocked_convs=False, **kw)
    blocked = TaskRuntime(packed, **kw)
    assert blocked._strategy.blocked_convs and not unblocked._strategy.blocked_convs
    peaks = unblocked.ledger.peak, blocked.ledger.peak, blocked._strategy.blocked_convs
    unblocked.close()
    blocked.close()
    return peaks, kw


@needs_nchwc
@pytest.mark.parametrize("wide", [False, True])
def test_a_budget_the_unblocked_runtime_fits_is_never_exceeded_by_the_blocked_layout(net, wide):
    """The blocked layout needs more than the unblocked graph: a moment at start-up (the derivation, charged while it
    runs: `costs.BLOCKED_DERIVE_FACTOR` × the weights) and a little after (channels padded to the block). A budget
    that fits the unblocked runtime gets it — refused before deriving where that moment does not fit (`wide`: big
    weights, batch 1), else when the blocked one runs out — never a BudgetError, never a reservation past it, and
    its memory report says why; a budget with room for the blocked layout gets it."""
    from edgecl.runtime.inplace import DERIVING

    arch = from_torch(Wide().eval(), (3, 8, 8), classifier=False) if wide else net
    packed = random_packed(arch, 3, "lps", bn="task")
    (unblocked_peak, blocked_peak, convs), kw = _budget_runtimes(packed, max_batch=1 if wide else 64)
    assert blocked_peak > unblocked_peak
    tight = TaskRuntime(packed, budget=unblocked_peak, **kw)
    assert tight._strategy.blocked_convs == [] and tight.ledger.peak <= unblocked_peak
    assert DERIVING not in tight.ledger.items
    why = tight.memory_report(measure=False)["blocked_fallback"]
    assert ("no room for deriving it" if wide else "the budget does not fit it") in why
    check_parity(packed, tight, np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32))
    roomy = TaskRuntime(packed, budget=blocked_peak, **kw)
    assert roomy._strategy.blocked_convs == convs and DERIVING not in roomy.ledger.items
    # what the process keeps of the derivation (3.1-4.0 MB measured, unseen by the ledger before) stays charged
    assert roomy.ledger.items["blocked layout (what deriving it leaves)"] == costs.BLOCKED_FIXED
    assert "blocked layout (what deriving it leaves)" not in tight.ledger.items
    tight.close()
    roomy.close()


@needs_nchwc
def test_start_up_leaves_no_temporary_file(net, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runtime = TaskRuntime(random_packed(net, 3, "lps", bn="task"), strategy="inplace", cache_tasks=2, threads=1)
    assert runtime._strategy.blocked_convs and list(tmp_path.iterdir()) == []
    assert runtime.memory_report(measure=False)["blocked_fallback"] is None


@needs_nchwc
def test_derivation_holds_no_copy_of_every_initializer_per_run():
    """Start-up's derivation held, per run, a numpy copy of every initializer of ONNX Runtime's optimised graph, and
    both runs' models and placeholders at once: its numpy allocations peaked at 5.5× the conv weights (tracemalloc,
    which numpy reports to). One optimised model at a time, read tensor by tensor, stays under 3.5×: the
    placeholders of one run and a few tensors in flight."""
    import tracemalloc

    layers = [m for _ in range(8) for m in (nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())]
    arch = from_torch(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                    *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval(),
                      (3, 8, 8))
    plans = read_plans(open_model(random_packed(arch, 2, "lps", bn="task")), factored=True).plans
    weights = sum(4 * int(np.prod(p.shape)) for p in plans if p.name.endswith(".weight") and len(p.shape) == 4)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        blocked = derive(arch, plans, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blocked is not None and len(blocked.convs) == 9
    assert peak < 3.5 * weights, peak / weights


@needs_nchwc
def test_a_layer_scale_folded_into_a_conv_excludes_that_conv_not_the_model():
    """ONNX Runtime folds a constant per-channel Mul after a conv (MetaFormer's layer scale) into the conv's weight:
    a derived initializer that is the placeholder times that scale, whose first element matches nothing. It used to
    block nothing at all (0 of 9 convs); it is recognised as that conv's weight scaled per output channel, only that
    conv stays a graph input, and the rest run blocked with logits equal to the references."""
    from layer_nets_meta import metaformer_spec

    arch = metaformer_spec((3, 16, 16))
    packed = random_packed(arch, 3, "lps", bn="task", classes=(4, 7))
    runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=2, threads=1)
    blocked = set(runtime._strategy.blocked_convs)
    assert len(blocked) >= 6 and "conv_block.mlp.fc2" not in blocked, blocked
    check_parity(packed, runtime, np.random.default_rng(10).standard_normal((2, 3, 16, 16)).astype(np.float32))


@needs_nchwc
def test_the_unblocked_retry_charges_the_environment_once(net):
    """charge_environment=True (the audit's): the blocked build that runs out of budget has charged ONNX Runtime's
    environment already; the unblocked retry keeps that charge instead of reserving it a second time (a budget of
    exactly the unblocked runtime's need raised BudgetError asking for the environment again)."""
    from edgecl.runtime.costs import ENVIRONMENT_ITEM, ORT_ENVIRONMENT

    packed = random_packed(net, 3, "lps", bn="task")
    (unblocked_peak, _, _), kw = _budget_runtimes(packed, max_batch=64)
    kw["charge_environment"] = True
    budget = unblocked_peak + ORT_ENVIRONMENT
    tight = TaskRuntime(packed, budget=budget, **kw)
    assert tight._strategy.blocked_convs == [] and tight.ledger.peak <= budget
    assert tight.ledger.items[ENVIRONMENT_ITEM] == ORT_ENVIRONMENT
    assert "the budget does not fit it" in tight.memory_report(measure=False)["blocked_fallback"]
    check_parity(packed, tight, np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32))
    tight.close()
