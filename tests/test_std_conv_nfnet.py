"""The rest of the weight-standardised family: timm's StdConv2d / StdConv2dSame (BiT, no gain: a standardised conv
with ``std_gain`` false and no gain tensor), NFNet's skipinit gain (``out.mul_(self.skipinit_gain)``: a
``scalar_affine`` without bias, the in-place product rewired so the block reads it), their stored forms, and timm's
dm_nfnet_f0 / nf_regnet_b0 with every gain drawn at random (slow; timm starts skip gains at 0, hiding the branch)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from layer_nets_nf import TinyStdNet
from random_weights import random_params
from torch import nn
from torch_nets import check_parity, classifier_of, randomised_parity, tensors_of

from edgecl.arch import from_torch, validate
from edgecl.arch.factories import build_module
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.arch.spec import param_shapes
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.train.models import forward, from_numpy

CONV = {"name": "c", "op": "conv", "inputs": ["input"], "in": 4, "out": 6, "k": [3, 3], "pad": [1, 1]}
TAIL = [{"name": "g", "op": "gap", "inputs": ["a"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]


def _spec(conv: dict | None = None, affine: dict | None = None) -> dict:
    return validate({"name": "s", "input_shape": [4, 6, 6], "nodes": [
        {**CONV, **(conv or {})}, {"name": "a", "op": "scalar_affine", "inputs": ["c"], **(affine or {})}, *TAIL]})


def _run(model, x: np.ndarray, feeds: dict | None = None) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, **(feeds or {})})[0]


def test_std_conv_and_skipinit_go_in_with_module_parity_and_torch_is_bit_identical():
    net = TinyStdNet().eval()
    spec = randomised_parity(net, (1, 8, 8))  # torch within 1e-5, folded ONNX within 1e-4 of the module
    nodes = {n["name"]: n for n in spec["nodes"]}
    plain = [n for n in spec["nodes"] if n.get("std_gain") is False]
    assert len(plain) == 5 and all(n["standardize"] == 1e-8 and n["gain_scale"] == 1.0 for n in plain)
    assert nodes["block1.conv2.same_pad"]["op"] == "pad"  # StdConv2dSame's dynamic "same" padding
    assert not {f"{n['name']}.gain" for n in plain} & set(param_shapes(spec))  # no made-up gain to learn
    assert "block2.conv1.gain" in param_shapes(spec)  # ScaledStdConv2d's stays
    gain = nodes["block1.skipinit_gain"]
    assert gain["op"] == "scalar_affine" and gain["bias"] is False and gain["module_shape"] == []
    assert gain["init"] == float(net.block1.skipinit_gain.detach())
    assert state_keys(spec)["block1.skipinit_gain.weight"] == "block1.skipinit_gain"
    assert state_shapes(spec)["block1.skipinit_gain.weight"] == ()
    weights = {**tensors_of(net, spec), **classifier_of(net)}
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(forward(spec, from_numpy(weights), x), net(x))  # timm's own F.batch_norm form


class _InPlace(nn.Module):
    """conv, then ``out.mul_(g)`` with its result dropped and ``out`` read after: the product is what is read."""

    def __init__(self, used: bool):
        super().__init__()
        self.conv, self.fc, self.used = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3), used
        self.g = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        out = self.conv(x)
        kept = out.mul_(self.g)
        return self.fc(((kept if self.used else out) * 0.5 + out).mean((2, 3)))


@pytest.mark.parametrize("used", [False, True])
def test_an_in_place_product_is_what_later_reads_of_its_operand_see(used):
    """torch.fx leaves ``out`` after ``out.mul_(g)`` on the conv (pytorch issue 68301); converted as recorded the
    gain would be gone (logits 3× off here). With g = 3 the module computes 1.5·3·conv + 3·conv."""
    torch.manual_seed(0)
    net = _InPlace(used).eval()
    spec = from_torch(net, (2, 5, 5))
    assert [n["op"] for n in spec["nodes"]][:2] == ["conv", "scalar_affine"]
    check_parity(net, spec, (2, 5, 5))


@pytest.mark.parametrize("groups", [1, 2])
def test_folded_and_switchable_graphs_compute_a_gainless_standardisation(groups):
    """No gain: the switchable graph standardises the bound weight and reads no gain; the folded one is a plain conv
    times a plain multiply; both equal torch, and a gain_scale without a gain multiplies each filter alone."""
    for scale in (1.0, 0.3):
        spec = _spec({"standardize": 1e-8, "std_gain": False, "groups": groups, "gain_scale": scale},
                     {"bias": False, "init": 0.0})
        params = random_params(spec, 3, seed=groups)
        assert "c.gain" not in params and "a.bias" not in params
        params["c.weight"][:, :1] = 0.0
        x = np.random.default_rng(0).standard_normal((5, 4, 6, 6)).astype(np.float32)
        with torch.no_grad():
            want = forward(spec, from_numpy(params), torch.from_numpy(x)).numpy()
            w = params["c.weight"].reshape(6, -1).astype(np.float64)
            z = (w - w.mean(1, keepdims=True)) / np.sqrt(w.var(1, keepdims=True) + 1e-8) * scale
            conv = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(z.reshape(6, -1, 3, 3)),
                                              torch.from_numpy(params["c.bias"]).double(), padding=1, groups=groups)
            features = (conv * float(params["a.weight"][0])).mean((2, 3)).numpy()
        by_hand = features @ params["head.weight"].T.astype(np.float64) + params["head.bias"]
        assert np.abs(want - by_hand).max() <= 1e-5
        folded = build_onnx(spec, params)
        assert not {n.op_type for n in folded.graph.node} & {"ReduceMean", "Sqrt"}
        switchable = build_onnx(spec, weights_as_inputs=True)
        assert {i.name for i in switchable.graph.input} == {"x", *params}  # no gain, no affine bias
        assert np.abs(_run(folded, x) - want).max() <= 1e-5
        assert np.abs(_run(switchable, x, params) - want).max() <= 1e-5


def test_fields_stored_form_and_refusals():
    gained, plain = _spec({"standardize": 1e-6, "std_gain": True}), _spec({"standardize": 1e-6, "std_gain": False})
    assert "std_gain" not in gained["nodes"][0] and "bias" not in gained["nodes"][1]  # read as before the fields
    assert stored_form(gained) == gained and param_shapes(gained)["c.gain"] == (6,)
    assert stored_form(plain)["nodes"][0]["std_gain"] is False and validate(stored_form(plain)) == plain
    bare = _spec(affine={"bias": False, "module_shape": []})
    assert stored_form(bare)["nodes"][1]["bias"] is False and validate(stored_form(bare)) == bare
    assert param_shapes(bare)["a.weight"] == (1,) and "a.bias" not in param_shapes(bare)
    refused = [({"std_gain": False}, {}, r"node 0 \(c\): std_gain needs standardize"),
               ({"standardize": 1e-6, "std_gain": "no"}, {}, "std_gain"),
               ({}, {"bias": False, "init_bias": 0.5}, r"node 1 \(a\): init_bias 0.5 needs bias"),
               ({"module_shape": []}, {}, r"module_shape \[\] must be the weight's shape")]
    for conv, affine, message in refused:
        with pytest.raises(UsageError, match=message):
            _spec(conv, affine)


def test_a_subclass_of_std_conv_is_refused_by_name():
    """Known by the defining module and class: a user's subclass may compute something else."""
    from timm.layers import StdConv2d

    class Mine(StdConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(UsageError, match="layer Mine at '0' overrides Conv2d.forward"):
        from_torch(nn.Sequential(Mine(1, 4, 3), nn.Flatten(), nn.Linear(256, 2)), (1, 8, 8))


@pytest.mark.slow
@pytest.mark.parametrize("name, convs, gains", [("dm_nfnet_f0", 57, 12), ("nf_regnet_b0", 54, 0)])
def test_nfnets_have_module_parity_with_random_gains(name, convs, gains):
    """Every conv gain and skipinit gain drawn in [0.5, 1.5) (timm's skip gains start at 0: the branches off)."""
    torch.manual_seed(0)
    net = build_module(f"timm:{name}").eval()
    with torch.no_grad():
        for path, p in net.named_parameters():
            if path.endswith((".gain", "skipinit_gain")):
                p.copy_(torch.rand(p.shape) + 0.5)
    spec = from_torch(net, (3, 64, 64))
    assert sum(bool(n.get("standardize")) for n in spec["nodes"]) == convs
    assert sum(n["op"] == "scalar_affine" and n.get("bias") is False for n in spec["nodes"]) == gains
    check_parity(net, spec, (3, 64, 64), batch=2)


def test_starting_weights_of_a_one_number_parameter_round_trip(tmp_path):
    """NFNet's skipinit gain is stored with shape (): starting weights from the module, again from the checked
    weights, and from the .npz of the module's state give its number (numpy's ascontiguousarray made it (1,) and the
    module was refused; `to_module_state` raised a TypeError on its len())."""
    from edgecl.arch.module_state import to_module_state
    from edgecl.train.initial import starting_weights

    net = TinyStdNet().eval()
    spec = from_torch(net, (1, 8, 8))
    first = starting_weights(net, spec)
    want = float(net.block1.skipinit_gain.detach())
    assert first.values["block1.skipinit_gain.weight"].tolist() == [want]
    state = to_module_state(spec, first.values)
    assert state["block1.skipinit_gain"].shape == ()
    np.savez(tmp_path / "w.npz", **state)
    for again in (starting_weights(first, spec), starting_weights(str(tmp_path / "w.npz"), spec)):
        assert again.sha256 == first.sha256
