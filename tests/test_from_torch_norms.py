"""ConvNeXt's forms in a user's network: LayerNorm over channels (after ``permute(0, 2, 3, 1)``, or on features),
``nn.Linear`` on channels-last maps (1×1 convolutions whose weights read as the module stores them), layer scales
(``x * gamma``); their torch forward and ONNX graph equal the module; compaction keeps every channel a LayerNorm
normalises; what edgecl cannot follow is refused naming op and source line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.errors import UsageError
from edgecl.graph.compact import compact_task
from edgecl.train.initial import starting_weights
from edgecl.train.models import forward, from_numpy, init_params
from torch_nets import TinyConvNeXt, check_parity, randomise_batchnorm


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_tiny_convnext_equals_the_module(shape):
    torch.manual_seed(0)
    module = TinyConvNeXt(in_channels=shape[0]).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, shape)
    check_parity(module, spec, shape)
    ops = [n["op"] for n in spec["nodes"]]
    assert ops.count("layer_norm") == 5 and ops.count("layer_scale") == 2 and "linear" not in ops
    nodes = node_by_name(spec)
    assert nodes["mlp1.0"]["op"] == "conv" and nodes["mlp1.0"]["k"] == [1, 1]
    assert nodes["mlp1.0"]["module_shape"] == [32, 8]  # nn.Linear's (out, in), read as a 1×1 kernel
    assert nodes["layer_scale"]["module_shape"] == [8, 1, 1] and "module_shape" not in nodes["gamma"]
    keys, stored = state_keys(spec), state_shapes(spec)
    assert keys["layer_scale.weight"] == "layer_scale" and keys["gamma.weight"] == "gamma"
    assert keys["norm1.weight"] == "norm1.weight" and stored["mlp1.0.weight"] == (32, 8)
    # the LayerNorm on the pooled features feeds the heads; named apart from them, its tensors keep their keys
    assert spec["output"] == "n_head_norm" and nodes["n_head_norm"]["module"] == "head_norm"
    assert keys["n_head_norm.weight"] == "head_norm.weight"


def test_layer_scales_start_where_the_module_starts_them():
    """ConvNeXt starts γ at 1e-6 so that each block begins near the identity; from ones, HALRP's first task on
    timm convnext_atto stayed at chance (0.505 against 1.0 after 4 epochs, 3×32×32 digits)."""
    import timm

    spec = from_torch(timm.create_model("convnext_atto", num_classes=2), (3, 32, 32))
    scales = [n for n in spec["nodes"] if n["op"] == "layer_scale"]
    assert len(scales) == 12 and all(n["init"] == pytest.approx(1e-6) for n in scales)
    params = init_params(spec)
    assert all(torch.equal(params[f"{n['name']}.weight"], torch.full((n["ch"],), n["init"])) for n in scales)
    tiny = from_torch(TinyConvNeXt(), (1, 8, 8))
    assert node_by_name(tiny)["layer_scale"]["init"] == 0.5 and "init" in node_by_name(tiny)["gamma"]
    trained = TinyConvNeXt()
    trained.gamma.data[0] = 2.0  # values that differ: no common start to keep, the default 1 is used
    assert node_by_name(from_torch(trained, (1, 8, 8)))["gamma"]["init"] == 1.0
    with pytest.raises(UsageError, match="init"):
        validate({**tiny, "nodes": [{**n, "init": "small"} if n["name"] == "gamma" else n for n in tiny["nodes"]]})


def test_starting_weights_read_linear_and_layer_scale_as_the_module_stores_them(tmp_path):
    module = TinyConvNeXt()
    randomise_batchnorm(module)
    spec = from_torch(module, (1, 8, 8))
    want = tensors_of(module, spec)
    path = tmp_path / "start.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in module.state_dict().items()})
    for source in (module, str(path), starting_weights(module, spec)):
        got = starting_weights(source, spec).values
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert got["mlp1.0.weight"].shape == (32, 8, 1, 1) and got["layer_scale.weight"].shape == (8,)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    state["mlp1.0.weight"] = state["mlp1.0.weight"].reshape(32, 8, 1, 1)  # the spec's shape is not the module's
    with pytest.raises(UsageError, match=r"'mlp1.0.weight' has shape \(32, 8, 1, 1\), the architecture needs "
                                         r"\(32, 8\)"):
        starting_weights(state, spec)


def test_layer_norm_without_affine_and_on_features():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(2, 6, 3), nn.LayerNorm(6, elementwise_affine=False)
            self.fc1, self.post, self.fc = nn.Linear(6 * 16, 12), nn.LayerNorm(12, eps=1e-3), nn.Linear(12, 3)

        def forward(self, x):
            x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.fc(F.gelu(self.post(self.fc1(torch.flatten(x, 1)))))

    module = Net()
    randomise_batchnorm(module)
    spec = from_torch(module, (2, 6, 6))
    nodes = node_by_name(spec)
    assert nodes["norm"]["affine"] is False and "norm.weight" not in tensors_of(module, spec)
    assert nodes["post"]["eps"] == 1e-3
    check_parity(module, spec, (2, 6, 6))


class _ScaleForms(nn.Module):
    """Layer scales as people write them: indexed, viewed, on a channels-last map, on features."""

    def __init__(self):
        super().__init__()
        self.conv, self.lin, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4), nn.Linear(4, 2)
        self.g1, self.g2, self.g3, self.g4 = (nn.Parameter(torch.rand(4) + 0.5) for _ in range(4))

    def forward(self, x):
        x = self.g1[:, None, None] * self.conv(x)
        x = x * self.g2.view(-1, 1, 1)
        x = (self.lin(x.permute(0, 2, 3, 1)) * self.g3).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) * self.g4)


def test_layer_scale_forms_equal_the_module():
    module = _ScaleForms()
    spec = from_torch(module, (3, 4, 4))
    assert [n["op"] for n in spec["nodes"]].count("layer_scale") == 4
    check_parity(module, spec, (3, 4, 4))


class _ShapeFromForward(nn.Module):
    """timm-style LayerNorm2d that takes its normalized_shape from the tensor."""

    def __init__(self, affine: bool = True):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3), nn.LayerNorm(4, elementwise_affine=affine), nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, y.shape[-1:], self.norm.weight, self.norm.bias, 1e-6).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_normalized_shape_computed_in_forward_is_the_weights():
    module = _ShapeFromForward()
    randomise_batchnorm(module)
    check_parity(module, from_torch(module, (3, 6, 6)), (3, 6, 6))
    # without a weight too: the shape is folded into numbers at the import shape (`fx_shape_flow`)
    plain = _ShapeFromForward(affine=False)
    spec = from_torch(plain, (3, 6, 6))
    assert next(n for n in spec["nodes"] if n["op"] == "layer_norm")["affine"] is False
    check_parity(plain, spec, (3, 6, 6))


def test_one_weight_cannot_become_two():
    """A layer's own parameter reused as a layer scale, a spec whose `module` fields name one key twice, and starting
    weights checked for one spec then handed to another of other shapes: each refused."""
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x) * self.conv.bias.view(-1, 1, 1)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    with pytest.raises(UsageError, match="'conv.bias' of layer Conv2d is used again in forward"):
        from_torch(Reuse(), (3, 6, 6))
    spec = _ln_spec("layer_scale")
    twice = {**spec, "nodes": [dict(n) for n in spec["nodes"]]}
    twice["nodes"][1]["module"] = "a.weight"
    with pytest.raises(UsageError, match="both name the module's 'a.weight'"):
        validate(twice)
    first = starting_weights({"a.weight": np.ones((4, 1, 3, 3)), "a.bias": np.zeros(4), "n": np.ones(4),
                              "b.weight": np.ones((3, 4, 1, 1)), "b.bias": np.zeros(3)}, spec)
    assert starting_weights(first, spec).values.keys() == first.values.keys()  # the same spec: accepted again

    def one_conv(c_in: int, c_out: int) -> dict:
        return validate({"input_shape": [c_in, 2, 2], "nodes": [
            {"name": "a", "op": "conv", "inputs": ["input"], "in": c_in, "out": c_out, "k": 1, "bias": False},
            {"name": "f", "op": "flatten", "inputs": ["a"]}]})

    narrow = starting_weights({"a.weight": np.ones((2, 4, 1, 1))}, one_conv(4, 2))
    with pytest.raises(UsageError, match=r"'a.weight' has shape \(2, 4, 1, 1\), the architecture needs \(4, 2, 1, 1\)"):
        starting_weights(narrow, one_conv(2, 4))  # as many values, another shape: not reshaped to fit


def _ln_spec(op: str) -> dict:
    return validate({"name": "ln", "input_shape": [1, 4, 4], "nodes": [
        {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 3, "pad": 1},
        {"name": "n", "op": op, "inputs": ["a"], "ch": 4},
        {"name": "b", "op": "conv", "inputs": ["n"], "in": 4, "out": 3, "k": 1},
        {"name": "g", "op": "gap", "inputs": ["b"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]})


@pytest.mark.parametrize("op", ["layer_norm", "grn", "layer_scale", "bn"])
def test_compaction_keeps_every_channel_a_layer_norm_normalises(op):
    """Channel 2 of `a` is read by nobody (b's column is zero): removable after a layer scale or BatchNorm, but a
    LayerNorm's mean and variance run over it, so there it stays — and the logits are the dense ones either way."""
    spec = _ln_spec(op)
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in
              {"a.weight": (4, 1, 3, 3), "a.bias": (4,), "b.weight": (3, 4, 1, 1), "b.bias": (3,),
               "n.weight": (4,), "head.weight": (2, 3), "head.bias": (2,)}.items()}
    if op in ("layer_norm", "grn", "bn"):
        params["n.bias"] = rng.standard_normal(4).astype(np.float32)
    if op == "bn":
        params.update({"n.running_mean": np.zeros(4, np.float32), "n.running_var": np.ones(4, np.float32)})
    params["b.weight"][:, 2] = 0
    pinned = op in ("layer_norm", "grn")  # statistics over the channels
    assert channel_map(spec).pinned == ({"a"} if pinned else set())
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    assert node_by_name(small)["a"]["out"] == (4 if pinned else 3)
    x = torch.from_numpy(rng.standard_normal((5, 1, 4, 4)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5


def test_global_response_norm_in_either_layout():
    """timm's GlobalResponseNorm built for channels-first maps goes in on one; built for channels-last, it must read
    a channels-last value. It starts (and is held by RGO's identity rule) at weight 0: the identity map."""
    from timm.layers.grn import GlobalResponseNorm

    from edgecl.train.batchnorm import identity

    class Net(nn.Module):
        def __init__(self, channels_last: bool):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
            self.grn = GlobalResponseNorm(4, channels_last=channels_last)

        def forward(self, x):
            return self.fc(self.grn(self.conv(x)).mean((2, 3)))

    module = Net(channels_last=False)
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 6, 6))
    assert node_by_name(spec)["grn"]["op"] == "grn"
    check_parity(module, spec, (3, 6, 6))
    with pytest.raises(UsageError, match="GlobalResponseNorm at 'grn' .* is built for channels-last tensors"):
        from_torch(Net(channels_last=True), (3, 6, 6))
    params = init_params(spec)
    assert not params["grn.weight"].any() and not identity(spec, params)["grn.weight"].any()


def test_module_shape_must_hold_the_same_values():
    spec = _ln_spec("layer_scale")
    nodes = spec["nodes"]
    for node, value in ((2, [4, 3]), (2, [3, 4, 1, 1, 1]), (1, [4, 2]), (1, "4")):
        bad = {**spec, "nodes": [dict(n) for n in nodes]}
        bad["nodes"][node]["module_shape"] = value
        with pytest.raises(UsageError, match="module_shape"):
            validate(bad)
    ok = {**spec, "nodes": [dict(n) for n in nodes]}
    ok["nodes"][1]["module_shape"] = [4, 1, 1]
    assert state_shapes(validate(ok))["n.weight"] == (4, 1, 1)
    relu = {**spec, "nodes": [*nodes[:1], {"name": "n", "op": "relu", "inputs": ["a"], "module_shape": [4]},
                              *nodes[2:]]}
    with pytest.raises(UsageError, match="unknown fields"):
        validate(relu)


class _Refused(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.conv = kind, nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.fc1, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)
        self.shift = nn.Parameter(torch.zeros(4, 1, 1))
        self.full = nn.Parameter(torch.ones(4, 4, 4))
        self.register_buffer("fixed", torch.ones(4, 1, 1))

    def forward(self, x):
        x, k = self.conv(x), self.kind
        if k == "permute back first":
            x = x.permute(0, 3, 1, 2)
        elif k == "pool channels-last":
            x = F.max_pool2d(x.permute(0, 2, 3, 1), 1).permute(0, 3, 1, 2)
        elif k == "returns channels-last":
            return self.fc(self.fc1(x.permute(0, 2, 3, 1)))
        elif k == "norm over the map":
            x = F.layer_norm(x, (4, 4, 4))
        elif k == "parameter added":
            x = x + self.shift
        elif k == "full-size factor":
            x = x * self.full
        elif k == "buffer factor":
            x = x * self.fixed
        elif k == "norm twice":
            x = self.norm(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        elif k == "bias alone":  # a weight alone is MetaFormer v2's bias-less norm; a bias alone has no spec form
            x = F.layer_norm(x.permute(0, 2, 3, 1), (4,), None, self.norm.bias).permute(0, 3, 1, 2)
        elif k == "mixed add":  # a channels-last tensor plus a channels-first one (equal shapes here)
            x = (x.permute(0, 2, 3, 1) + x).permute(0, 3, 1, 2)
        elif k == "indexed parameter":
            x = x * self.shift[:, None, 0]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("kind, match", [
    ("permute back first", r"permute \[0, 3, 1, 2\]; edgecl follows only permute\(0, 2, 3, 1\)"),
    ("pool channels-last", r"max_pool2d.*reads a channels-last tensor"),
    ("returns channels-last", r"returns a channels-last tensor"),
    ("norm over the map", r"layer_norm over .* only over the channels"),
    ("parameter added", r"the parameter 'shift' is used directly in forward"),
    ("full-size factor", r"parameter 'full' of shape \(4, 4, 4\); only one factor per channel"),
    ("buffer factor", r"'fixed' is a tensor attribute that is no parameter"),
    ("norm twice", r"'norm' is used twice"),
    ("bias alone", r"LayerNorm with a bias but no weight"),
    ("mixed add", r"'add' .* reads a channels-last tensor"),
    ("indexed parameter", r"the parameter 'shift' is used directly in forward"),
])
def test_what_edgecl_cannot_follow_is_refused_by_name(kind, match):
    with pytest.raises(UsageError, match=match) as err:
        from_torch(_Refused(kind), (3, 4, 4))  # every axis 4 long: any permute runs
    if kind not in ("returns channels-last", "norm twice"):
        assert "test_from_torch_norms.py" in str(err.value)  # the user's source line


@pytest.mark.parametrize("fields", [{}, {"affine": False}, {"bias": False}])
def test_layer_norm_over_the_channels_of_a_rank_2_map(fields):
    """A layer_norm on a (C, L) map (validate takes one: a rank-2 input, as layer_scale and affine run on) normalises
    each position over the channels in torch and ONNX alike; both forms assumed (C, H, W) and failed to run."""
    from random_weights import random_params
    from torch_nets import spec_logits

    spec = validate({"name": "x", "input_shape": [4, 3], "output": "f", "nodes": [
        {"name": "n", "op": "layer_norm", "inputs": ["input"], "ch": 4, **fields},
        {"name": "f", "op": "flatten", "inputs": ["n"]}]})
    weights = random_params(spec, 3, 0)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    got = spec_logits(spec, weights, x)
    w, b = (torch.from_numpy(weights[f"n.{k}"]) if f"n.{k}" in weights else None for k in ("weight", "bias"))
    normed = F.layer_norm(x.transpose(1, 2), (4,), w, b, 1e-5).transpose(1, 2).reshape(2, -1)
    want = normed @ torch.from_numpy(weights["head.weight"]).T + torch.from_numpy(weights["head.bias"])
    assert np.abs(got - want.numpy()).max() < 1e-5
