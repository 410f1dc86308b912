"""Structural compaction: hand-built cases with known answers, real delta kinds (LPS columns/rows, AGS-CL-style node
masks), BatchNorm, residual groups, concatenations, depthwise and grouped convolutions, gates, torchvision networks,
and a property test over random sequential specs. Every compacted graph is run in ONNX Runtime against the dense
folded graph (the issue's bound: 1e-4) and its spec passes `validate`."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from edgecl.arch import param_shapes, preset, validate
from edgecl.deltas import PackedModel, TaskInfo, check_consistent, materialize
from edgecl.export import compact_task, count_params
from edgecl.export.onnx_export import run_onnx
from edgecl.graph.builder import build_onnx
from edgecl.synthetic import group_node_masks, structured_lps_model
from random_weights import random_params

TOL = 1e-4


def compact(arch, params):
    """Exact removal counts: no rounding of convolution channel groups (tested on its own below)."""
    return compact_task(arch, params, channel_multiple=1)


def _inputs(arch, n=16, seed=0):
    shape = arch.get("input_select_from", arch["input_shape"])  # the input a compacted graph still takes
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _assert_same_logits(arch, params, c_arch, c_params, seed=0):
    x = _inputs(arch, seed=seed)
    dense = run_onnx(build_onnx(arch, params), x)
    small = run_onnx(build_onnx(c_arch, c_params), x)
    assert np.abs(dense - small).max() <= TOL * max(1.0, np.abs(dense).max())




def _mlp(sizes, n_in):
    layers, prev = [], n_in
    for i, n in enumerate(sizes):
        layers += [{"op": "linear", "name": f"l{i}", "in": prev, "out": n}, {"op": "relu"}]
        prev = n
    return validate({"name": "tiny", "input_shape": [n_in], "layers": layers})


def test_hand_built_mlp_removes_exactly_the_dead_units():
    arch = _mlp([5, 4], 6)
    p = random_params(arch)
    p["l0.weight"][0] = 0; p["l0.bias"][0] = -1.0     # constant 0 after ReLU → removed
    p["l0.weight"][1] = 0; p["l0.bias"][1] = 0.5      # constant 0.5 → folded into l1.bias, removed
    p["l1.weight"][:, 2] = 0                          # unit 2 of l0 unread → removed
    p["l0.weight"][:, 3] = 0                          # input 3 unread → gathered away
    p["l1.weight"][3] = 0; p["l1.bias"][3] = 0.2      # constant 0.2 → folded into the head bias
    c_arch, c_params, report = compact(arch, p)
    assert report.layers == {"l0": [5, 2], "l1": [4, 3]}
    assert c_arch["input_select"] == [0, 1, 2, 4, 5] and report.inputs_kept == [5, 6]
    assert report.folded_units == 2
    assert c_params["l1.weight"].shape == (3, 2) and c_params["head.weight"].shape == (3, 3)
    assert report.params_compact == count_params(c_params) < report.params_dense == count_params(p)
    _assert_same_logits(arch, p, c_arch, c_params)


def test_a_dead_unit_shifted_by_scale_is_folded_not_dropped():
    arch = validate({"name": "scaled", "input_shape": [6], "nodes": [
        {"name": "l0", "op": "linear", "inputs": ["input"], "in": 6, "out": 5},
        {"name": "r0", "op": "relu", "inputs": ["l0"]},
        {"name": "s0", "op": "scale", "inputs": ["r0"], "factor": -2.0, "offset": 0.5},
        {"name": "l1", "op": "linear", "inputs": ["s0"], "in": 5, "out": 4}]})
    p = random_params(arch)
    p["l0.weight"][0] = 0; p["l0.bias"][0] = -1.0     # 0 after ReLU, 0.5 after the scale: folded into l1.bias
    c_arch, c_params, report = compact(arch, p)
    assert report.layers["l0"] == [5, 4] and report.folded_units == 1
    _assert_same_logits(arch, p, c_arch, c_params)


def test_a_constant_unit_through_leaky_relu_is_folded_with_its_slope():
    arch = validate({"name": "leaky", "input_shape": [6], "nodes": [
        {"name": "l0", "op": "linear", "inputs": ["input"], "in": 6, "out": 5},
        {"name": "a0", "op": "leaky_relu", "inputs": ["l0"], "slope": 0.2},
        {"name": "l1", "op": "linear", "inputs": ["a0"], "in": 5, "out": 4}]})
    p = random_params(arch)
    p["l0.weight"][0] = 0; p["l0.bias"][0] = -1.5     # −0.3 after the leaky ReLU: folded into l1.bias
    p["l0.weight"][1] = 0; p["l0.bias"][1] = 0.0      # 0: dropped
    c_arch, c_params, report = compact(arch, p)
    assert report.layers["l0"] == [5, 3] and report.folded_units == 1
    _assert_same_logits(arch, p, c_arch, c_params)


def _sliced():
    """A ghost module cut to width by a slice, then a conv split in two halves that meet in an add, and a slice of
    the second half beside it: every slice cuts a channel group (`channel_map` splits it there)."""
    return validate({"name": "sliced", "input_shape": [2, 4, 4], "nodes": [
        {"name": "c0", "op": "conv", "inputs": ["input"], "in": 2, "out": 5, "k": 1},
        {"name": "r0", "op": "relu", "inputs": ["c0"]},
        {"name": "dw", "op": "conv", "inputs": ["r0"], "in": 5, "out": 5, "k": 3, "pad": 1, "groups": 5},
        {"name": "r1", "op": "relu", "inputs": ["dw"]},
        {"name": "ghost", "op": "cat", "inputs": ["r0", "r1"]},
        {"name": "cut", "op": "slice", "inputs": ["ghost"], "stop": 7},
        {"name": "c1", "op": "conv", "inputs": ["cut"], "in": 7, "out": 8, "k": 1},
        {"name": "r2", "op": "relu", "inputs": ["c1"]},
        {"name": "a", "op": "slice", "inputs": ["r2"], "stop": 4},
        {"name": "b", "op": "slice", "inputs": ["r2"], "start": 4, "stop": 8},
        {"name": "sum", "op": "add", "inputs": ["a", "b"]},
        {"name": "part", "op": "slice", "inputs": ["b"], "start": 1, "stop": 3},
        {"name": "both", "op": "cat", "inputs": ["sum", "part"]},
        {"name": "pool", "op": "gap", "inputs": ["both"]},
        {"name": "flat", "op": "flatten", "inputs": ["pool"]}]})


def test_slices_move_with_the_channels_compaction_removes():
    arch = _sliced()
    p = random_params(arch)
    p["c0.weight"][1] = 0; p["c0.bias"][1] = -1.0   # r0 channel 1 is 0, r1's a constant: both copies go, one folded
    for row in (1, 5):                              # c1 units 1 and 5 meet in the add and are dead in both
        p["c1.weight"][row] = 0; p["c1.bias"][row] = -1.0
    c_arch, c_params, report = compact(arch, p)
    assert report.layers["c0"] == [5, 4] and report.layers["c1"] == [8, 6]
    slices = {n["name"]: (n["start"], n["stop"]) for n in c_arch["nodes"] if n["op"] == "slice"}
    assert slices == {"cut": (0, 5), "a": (0, 3), "b": (3, 6), "part": (1, 2)}  # b: c1 units 4, 6, 7
    _assert_same_logits(arch, p, c_arch, c_params)


def test_an_upsampled_constant_channel_is_folded():
    arch = validate({"name": "up", "input_shape": [2, 3, 3], "nodes": [
        {"name": "c0", "op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1},
        {"name": "r0", "op": "relu", "inputs": ["c0"]},
        {"name": "up", "op": "upsample", "inputs": ["r0"], "scale": [2, 3]},
        {"name": "c1", "op": "conv", "inputs": ["up"], "in": 4, "out": 3, "k": 1},
        {"name": "pool", "op": "gap", "inputs": ["c1"]}, {"name": "flat", "op": "flatten", "inputs": ["pool"]}]})
    p = random_params(arch)
    p["c0.weight"][1] = 0; p["c0.bias"][1] = 0.7     # 0.7 everywhere, repeated: folded into c1's bias
    p["c0.weight"][2] = 0; p["c0.bias"][2] = -1.0    # 0: dropped
    c_arch, c_params, report = compact(arch, p)
    assert report.layers["c0"] == [4, 2] and report.folded_units == 1
    _assert_same_logits(arch, p, c_arch, c_params)


def test_removal_cascades_to_a_fixed_point():
    arch = _mlp([4, 3], 5)
    p = random_params(arch)
    p["head.weight"][:, 1] = 0          # l1 unit 1 unread by the head …
    p["l1.weight"][:, 2] = 0            # … and l0 unit 2 is read only by l1 unit 1
    p["l1.weight"][1, 2] = 1.0
    c_arch, c_params, report = compact(arch, p)
    assert report.layers == {"l0": [4, 3], "l1": [3, 2]}
    assert report.rounds >= 3  # second round finds l0 unit 2, third finds nothing
    _assert_same_logits(arch, p, c_arch, c_params)


def test_dense_task_is_left_alone():
    arch = preset("mlp")
    p = random_params(arch, 10)
    c_arch, c_params, report = compact(arch, p)
    assert report.params_compact == report.params_dense and "input_select" not in c_arch


def test_conv_units_before_padded_conv_stay_unless_constant_zero():
    arch = preset("lenet")
    p = random_params(arch, 10)
    p["conv1.weight"][0] = 0; p["conv1.bias"][0] = 0.7   # constant 0.7 into conv2 with pad 1: must stay
    p["conv1.weight"][1] = 0; p["conv1.bias"][1] = -0.3  # ReLU makes it 0: removed
    p["conv2.weight"][:, 5] = 0                         # conv1 channel 5 unread: removed
    p["conv2.weight"][3] = 0; p["conv2.bias"][3] = 0.4  # constant into flatten → fc1: folded
    p["fc1.weight"][:, 4 * 7:4 * 8] = 0                 # conv2 channel 7 unread through the flatten repeat (2×2)
    c_arch, c_params, report = compact(arch, p)
    assert report.layers["conv1"] == [20, 18] and report.layers["conv2"] == [50, 48]
    assert c_params["conv2.weight"].shape == (48, 18, 3, 3) and c_params["fc1.weight"].shape == (256, 48 * 4)
    assert report.folded_units >= 1
    _assert_same_logits(arch, p, c_arch, c_params)


def test_batchnorm_channels_fold_through_unpadded_conv():
    arch = validate({"name": "bnnet", "input_shape": [2, 6, 6], "layers": [
        {"op": "conv", "name": "c1", "in": 2, "out": 6, "k": 3, "pad": 1, "bias": False},
        {"op": "bn", "name": "bn1", "ch": 6}, {"op": "relu"},
        {"op": "conv", "name": "c2", "in": 6, "out": 5, "k": 3, "pad": 0, "bias": False},
        {"op": "bn", "name": "bn2", "ch": 5}, {"op": "relu"}, {"op": "gap"},
        {"op": "linear", "name": "fc", "in": 5, "out": 4}, {"op": "relu"}]})
    p = random_params(arch)
    p["bn1.running_mean"][[1, 4]] = 0; p["bn1.bias"][[1, 4]] = [0.5, 0.8]  # BN of a zero filter: constant > 0
    p["c1.weight"][[1, 4]] = 0                      # → folded into a new c2 bias (c2 has no padding)
    p["bn2.running_mean"][2] = 0; p["bn2.bias"][2] = 0.3
    p["c2.weight"][2] = 0                           # → constant through bn2/relu/gap, folded into fc.bias
    c_arch, c_params, report = compact(arch, p)
    assert report.layers["c1"] == [6, 4] and report.layers["c2"] == [5, 4]
    assert c_params["bn1.running_mean"].shape == (4,) and c_arch["nodes"][1]["ch"] == 4
    assert "c2.bias" in c_params and report.folded_units == 3
    _assert_same_logits(arch, p, c_arch, c_params)


def _check(arch, p, c_arch, c_params, report, seed=0):
    """The compacted spec is valid, its tensors have the shapes it says, it is not bigger, and it computes the same
    logits as the dense graph in ONNX Runtime."""
    spec = validate(c_arch)
    assert {k: v.shape for k, v in c_params.items()} == param_shapes(spec, p["head.bias"].shape[0])
    assert report.params_compact == count_params(c_params) <= report.params_dense == count_params(p)
    _assert_same_logits(arch, p, c_arch, c_params, seed)


def test_residual_group_channel_goes_only_when_every_reader_skips_it():
    """resnet preset: the stem, block 1's second conv (through the identity add) and their BatchNorms are one channel
    group; its readers are b1.conv1, b2.conv1 and b2.short. A channel none of them reads leaves all four producers;
    one that a single reader still reads stays."""
    arch = preset("resnet")
    p = random_params(arch, 10)
    for reader in ("b1.conv1", "b2.conv1", "b2.short"):
        p[f"{reader}.weight"][:, 3] = 0
    p["b1.conv1.weight"][:, 5] = 0; p["b2.conv1.weight"][:, 5] = 0   # b2.short still reads channel 5
    c_arch, c_params, report = compact(arch, p)
    assert report.groups["stem"] == [16, 15]
    assert report.layers["stem"] == report.layers["b1.conv2"] == [16, 15]
    assert c_params["stembn.running_mean"].shape == c_params["b1.bn2.weight"].shape == (15,)
    assert c_params["b2.short.weight"].shape == (32, 15, 1, 1) and c_params["b1.conv1.weight"].shape == (16, 15, 3, 3)
    _check(arch, p, c_arch, c_params, report)


def test_constant_channel_folds_through_a_residual_add():
    """A channel dead in both branches of an add carries the sum of their constants; the unpadded 1×1 shortcut
    absorbs it into a new bias, the padded convs read none of it: the channel goes."""
    arch = preset("resnet")
    p = random_params(arch, 10)
    p["stem.weight"][5] = 0; p["stembn.running_mean"][5] = 0; p["stembn.bias"][5] = 0.5   # relu → 0.5
    p["b1.conv2.weight"][5] = 0; p["b1.bn2.running_mean"][5] = 0; p["b1.bn2.bias"][5] = 0.3  # add → 0.8
    p["b1.conv1.weight"][:, 5] = 0; p["b2.conv1.weight"][:, 5] = 0
    c_arch, c_params, report = compact(arch, p)
    assert report.groups["stem"][1] == 15 and report.folded_units >= 1
    assert "b2.short.bias" in c_params and c_arch["nodes"][[n["name"] for n in c_arch["nodes"]].index("b2.short")][
        "bias"]
    _check(arch, p, c_arch, c_params, report)
    p["b2.short.weight"][:, 5] = 0.1  # … but a padded conv reading the constant keeps it
    p["b2.conv1.weight"][:, 5] = 0.1
    assert compact(arch, p)[2].groups["stem"][1] == 16


def test_unread_input_channels_are_gathered_in_front_of_a_graph():
    arch = preset("resnet", input_shape=(3, 8, 8))
    p = random_params(arch, 10)
    p["stem.weight"][:, 1] = 0
    c_arch, c_params, report = compact(arch, p)
    assert c_arch["input_select"] == [0, 2] and c_arch["input_select_from"] == [3, 8, 8]
    assert c_arch["input_shape"] == [2, 8, 8] and report.inputs_kept == [2, 3]
    _check(arch, p, c_arch, c_params, report)


def test_compacting_a_compacted_graph_keeps_its_input_selection():
    """A second pass starts from the first one's input selection (here on the MLP's flattened pixels) and changes
    nothing the first left; a further unread input composes with it."""
    packed = structured_lps_model(preset("mlp"), 0.5, unit="column", seed=1)
    p = materialize(packed, 0)
    c_arch, c_params, report = compact(packed.arch, p)
    assert c_arch["input_shape"] == [report.inputs_kept[0]] and c_arch["input_select_from"] == [1, 8, 8]
    again_arch, again_params, again = compact(c_arch, c_params)
    assert again_arch == c_arch and again.params_compact == report.params_compact
    c_params["fc1.weight"][:, 0] = 0  # one more pixel unread
    again_arch, again_params, again = compact(c_arch, c_params)
    assert again_arch["input_select"] == c_arch["input_select"][1:] and again.inputs_kept[1] == 64
    _assert_same_logits(c_arch, c_params, again_arch, again_params)


def test_grouped_conv_keeps_equal_channels_per_group():
    """groups=2: input channels 0, 1 (group 0) and 4 (group 1) are unread; only one per group can go. Output rows 0,
    1 (group 0) and 3 (group 1) are unread: one of group 0's stays so both groups keep two."""
    arch = validate({"name": "grouped", "input_shape": [2, 6, 6], "nodes": [
        {"name": "c0", "op": "conv", "inputs": ["input"], "in": 2, "out": 8, "k": 1},
        {"name": "r0", "op": "relu", "inputs": ["c0"]},
        {"name": "g", "op": "conv", "inputs": ["r0"], "in": 8, "out": 6, "k": 3, "pad": 1, "groups": 2},
        {"name": "r1", "op": "relu", "inputs": ["g"]},
        {"name": "pool", "op": "gap", "inputs": ["r1"]}, {"name": "flat", "op": "flatten", "inputs": ["pool"]}]})
    p = random_params(arch)
    p["g.weight"][:3, [0, 1]] = 0; p["g.weight"][3:, 0] = 0   # inputs 0, 1 of group 0 and 4 of group 1 unread
    p["head.weight"][:, [0, 1, 3]] = 0
    c_arch, c_params, report = compact(arch, p)
    g = next(n for n in c_arch["nodes"] if n["name"] == "g")
    assert (g["in"], g["out"], g["groups"]) == (6, 4, 2) and report.layers["c0"] == [8, 6]
    _check(arch, p, c_arch, c_params, report)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("masks", ["rows and columns", "rows only"])
def test_node_masks_on_residual_concat_depthwise_and_gates(seed, masks):
    """Random AGS-CL-shaped group masks on the resnet preset and on ResCat (residual add, concatenation of a group
    with its own depthwise copy, SE gate): dead rows and columns go; rows only leave constants, folded where exact."""
    from torch_nets import spec_and_weights

    for arch, dense in ((preset("resnet"), random_params(preset("resnet"), 10, seed)),
                        spec_and_weights("custom residual + concat", (3, 16, 16))):
        p, alive = group_node_masks(arch, dense, 0.5, seed, columns=masks == "rows and columns")
        c_arch, c_params, report = compact(arch, p)
        assert report.params_compact < report.params_dense
        if masks == "rows and columns":  # every dead channel of every group goes (at most one kept per group)
            kept = {g: after for g, (_, after) in report.groups.items()}
            assert all(kept[g] <= max(1, int(a.sum())) for g, a in alive.items())
        _check(arch, p, c_arch, c_params, report, seed)


@pytest.mark.parametrize("make", ["swin_spec", "tiny_vit_spec", "mobilevit_spec", "maxvit_spec",
                                  "efficientformer_spec", "swinv2_spec"])
def test_node_masks_on_window_attention(make):
    """Swin's shifted windows, TinyViT's windows, MobileViT's and MaxViT's grids, EfficientFormerV2's talking heads
    and bilinear up-sampling: half of every channel group dead; the MLPs shrink, the attention keeps its heads,
    windows, shift, grid, bias and talking heads (its q, k, v channels are pinned), and the logits stay the same."""
    import layer_nets

    arch = getattr(layer_nets, make)((3, 16, 16))
    p, _ = group_node_masks(arch, random_params(arch, 3, 0), 0.5, 0)
    c_arch, c_params, report = compact(arch, p)
    assert report.params_compact < report.params_dense
    kept = ("name", "heads", "window", "shift", "dilated", "bias_table", "bias_index", "talking_heads", "cosine")
    assert [[n.get(k) for k in kept] for n in c_arch["nodes"] if n["op"] == "attention"] == \
        [[n.get(k) for k in kept] for n in arch["nodes"] if n["op"] == "attention"]
    _check(arch, p, c_arch, c_params, report)


@pytest.mark.parametrize("name,unit", [("mlp", "column"), ("lenet", "row"), ("mlp", "row")])
def test_structured_lps_task_gets_smaller_with_same_logits(name, unit):
    packed = structured_lps_model(preset(name), 0.5, unit=unit, seed=1)
    check_consistent(packed)
    params = materialize(packed, 0)
    c_arch, c_params, report = compact(packed.arch, params)
    assert report.params_compact < 0.6 * report.params_dense
    _assert_same_logits(packed.arch, params, c_arch, c_params)


def test_node_masks_remove_dead_nodes():
    """AGS-CL's deployment form: per-task node bit vectors select a sub-network."""
    arch = preset("lenet")
    base = random_params(arch, 10)
    rng = np.random.default_rng(3)
    alive = {n: rng.random(arch["nodes"][i]["out"]) < 0.6
             for i, n in ((0, "conv1"), (3, "conv2"), (7, "fc1"))}
    params = {"conv1.weight": {"kind": "node", "rows": "conv1"}, "conv1.bias": {"kind": "node", "rows": "conv1"},
              "conv2.weight": {"kind": "node", "rows": "conv2", "cols": "conv1"},
              "conv2.bias": {"kind": "node", "rows": "conv2"},
              "fc1.weight": {"kind": "node", "rows": "fc1", "cols": "conv2", "repeat": 4},
              "fc1.bias": {"kind": "node", "rows": "fc1"},
              "head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}}
    trunk = {k: v for k, v in base.items() if not k.startswith("head")}
    tensors = {"head.weight": base["head.weight"], "head.bias": base["head.bias"],
               **{f"nodes:{n}": m for n, m in alive.items()}}
    packed = PackedModel(arch, "agscl", {}, params, trunk, [TaskInfo("t0", 10)], [tensors])
    check_consistent(packed)
    p = materialize(packed, 0)
    c_arch, c_params, report = compact(arch, p)
    assert report.layers["conv2"][1] <= int(alive["conv2"].sum())
    assert report.layers["fc1"][1] == int(alive["fc1"].sum())
    _assert_same_logits(arch, p, c_arch, c_params)


@st.composite
def _sequential_case(draw):
    """A random small sequential spec (conv stack or MLP, optional BN, pads 0/1) with random structured zeros."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    channels = draw(st.integers(1, 3))
    layers, shape = [], [channels, 6, 6]
    for i in range(draw(st.integers(0, 2))):
        out, pad = draw(st.integers(1, 5)), draw(st.sampled_from([0, 1]))
        layers.append({"op": "conv", "name": f"c{i}", "in": shape[0], "out": out, "k": 3, "pad": pad,
                       "bias": draw(st.booleans())})
        if draw(st.booleans()):
            layers.append({"op": "bn", "name": f"bn{i}", "ch": out})
        layers.append({"op": "relu"})
        shape = [out, shape[1] + 2 * pad - 2, shape[2] + 2 * pad - 2]
    layers.append({"op": draw(st.sampled_from(["flatten", "gap"]))})
    flat = shape[0] * shape[1] * shape[2] if layers[-1]["op"] == "flatten" else shape[0]
    for i in range(draw(st.integers(1, 2))):
        out = draw(st.integers(1, 6))
        layers += [{"op": "linear", "name": f"l{i}", "in": flat, "out": out}, {"op": "relu"}]
        flat = out
    arch = validate({"name": "rand", "input_shape": [channels, 6, 6], "layers": layers})
    p = random_params(arch, seed=seed)
    for name, w in p.items():
        if w.ndim >= 2 and not name.startswith("head"):
            w[rng.random(w.shape[0]) < 0.3] = 0                  # dead rows / filters
            w[:, rng.random(w.shape[1]) < 0.3] = 0               # unread inputs
        elif name.endswith(".bias"):
            w[rng.random(w.shape) < 0.3] = 0                     # some exact-zero biases
    return arch, p


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_sequential_case())
def test_random_sequential_specs_compact_exactly(case):
    arch, p = case
    c_arch, c_params, report = compact(arch, p)
    assert report.params_compact <= report.params_dense  # a removed unit always outweighs a bias it may add
    _assert_same_logits(arch, p, c_arch, c_params)


@pytest.mark.parametrize("name", [pytest.param("torchvision resnet18", marks=pytest.mark.slow),
                                  "torchvision mobilenet_v2", "timm mobilenetv3_small_050"])
@pytest.mark.parametrize("columns", [True, False])
def test_node_masks_on_torchvision_and_timm_networks(name, columns):
    """Real networks (3×32×32): half of every channel group dead. With dead columns too, what remains is the alive
    sub-network (about a quarter of the weights: rows and columns halve); dead rows alone leave BatchNorm constants
    that fold into 1×1 convs and heads."""
    from torch_nets import spec_and_weights

    arch, dense = spec_and_weights(name)
    p, alive = group_node_masks(arch, dense, 0.5, seed=1, columns=columns)
    c_arch, c_params, report = compact(arch, p)
    assert report.params_compact < (0.35 if columns else 0.75) * report.params_dense
    if columns:
        assert all(report.groups[g][1] <= max(1, int(a.sum())) for g, a in alive.items())
    else:
        assert report.folded_units > 0
    _check(arch, p, c_arch, c_params, report)


def test_conv_channel_groups_round_to_the_blocked_layout():
    """By default every group a convolution touches keeps a multiple of 16 channels where it has that many (ONNX
    Runtime's blocked convolutions; dead channels kept are zero), and the logits stay the same."""
    from edgecl.graph.compact import CONV_CHANNEL_MULTIPLE
    from torch_nets import spec_and_weights

    arch, dense = spec_and_weights("torchvision mobilenet_v2")
    p, alive = group_node_masks(arch, dense, 0.45, seed=2)
    c_arch, c_params, report = compact_task(arch, p)
    exact = compact(arch, p)[2]
    assert exact.params_compact < report.params_compact < 0.5 * report.params_dense
    rounded = 0
    for g, (before, after) in report.groups.items():
        want = -(-exact.groups[g][1] // CONV_CHANNEL_MULTIPLE) * CONV_CHANNEL_MULTIPLE
        assert after == (want if want <= before and g != "input" else exact.groups[g][1]), g
        rounded += after > exact.groups[g][1]
    assert rounded > 10
    _check(arch, p, c_arch, c_params, report)


@pytest.mark.parametrize("make", ["layer_nets_vit.volo_spec", "layer_nets_vit.tnt_spec", "hiera_nets.hieradet_spec"])
def test_node_masks_on_channels_last_and_tiled_position_embeddings(make):
    """VOLO's channels-last position embedding (storage only: compaction drops it with the module's shape), TNT's
    embedding tiled over the windows (its window shape kept, with the channels left) and HieraDet's resized grid
    and tiled window (their grids kept): half of every channel group dead, the compacted spec validates and gives the
    same logits (before, a spec with either was left invalid)."""
    import importlib

    module, name = make.split(".")
    arch = getattr(importlib.import_module(module), name)((3, 8, 8))
    p, _ = group_node_masks(arch, random_params(arch, 3, 0), 0.5, 0)
    c_arch, c_params, report = compact(arch, p)
    assert report.params_compact < report.params_dense
    grids = [n for n in c_arch["nodes"] if n["op"] == "pos_embed" and (n.get("tile") or n.get("resize"))]
    assert all(n["module_shape"] == [1, n["ch"], *(n.get("tile") or n["resize"])] for n in grids)
    assert any(n.get("resize") for n in grids) == (name == "hieradet_spec")
    assert not any(n.get("channels_last") for n in c_arch["nodes"])
    _check(arch, p, c_arch, c_params, report)
