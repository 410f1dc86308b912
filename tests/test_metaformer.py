"""MetaFormer v2 (timm's PoolFormerV2, ConvFormer, CAFormer) through `from_torch`: bias-less norms (a ``layer_norm``
with ``bias`` false: LayerNorm2dNoBias over the channels, GroupNorm1NoBias over the map, LayerNormNoBias on tokens),
StarReLU (``relu``, ``square``, ``scalar_affine``), squared ReLU, MetaFormer's own Attention, res and layer scales —
each equal to the module in torch and ONNX Runtime; the field's rules, stored form and compaction; powers other than
x ** 2 refused by name. The full timm models are checked at 64×64 (slow)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from layer_nets_meta import TinyCAFormer, TinyMetaFormer
from torch import nn
from test_runtime import references
from torch_nets import check_parity, randomise_batchnorm

from edgecl.arch import channel_map, from_torch, node_by_name, validate
from edgecl.arch.later_fields import stored_form
from edgecl.arch.spec import param_shapes
from edgecl.deltas import materialize
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.graph.compact import compact_task
from edgecl.runtime import TaskRuntime
from edgecl.synthetic import random_packed
from edgecl.train.models import forward, from_numpy


def test_tiny_metaformer_goes_in_with_parity_and_its_norms_have_no_bias():
    net = TinyMetaFormer(in_channels=3).eval()
    spec = from_torch(net, (3, 8, 8))
    nodes = node_by_name(spec)
    norms = {n["name"]: (n.get("over"), n.get("bias")) for n in spec["nodes"] if n["op"] == "layer_norm"}
    assert norms == {"stem_norm": (None, False), "pool_block.norm1": ("map", False),
                     "pool_block.norm2": ("map", False), "down.norm": (None, False),
                     "conv_block.norm1": (None, False), "conv_block.norm2": (None, False)}
    assert not any(k.endswith("norm.bias") or k.endswith("norm1.bias") for k in param_shapes(spec))
    # StarReLU: s · relu(x)² + b, its two numbers the module's scale and bias (drawn at random)
    star = nodes["pool_block.mlp.act"]
    assert star["op"] == "scalar_affine" and nodes[star["inputs"][0]]["op"] == "square"
    assert star["init"] == pytest.approx(float(net.pool_block.mlp.act.scale.detach())) and \
        star["init_bias"] == pytest.approx(float(net.pool_block.mlp.act.bias.detach()))
    assert [n["op"] for n in spec["nodes"][-2:]] == ["relu", "square"]  # SquaredReLU: torch.square(relu(x))
    assert {n["op"] for n in spec["nodes"] if "scale" in n["name"]} == {"layer_scale"}  # res and layer scales
    check_parity(net, spec, (3, 8, 8))
    # stored: bias false written, as every later field off its default; read back as the same spec
    stored = stored_form(spec)
    assert all(n["bias"] is False for n in stored["nodes"] if n["op"] == "layer_norm")
    assert validate(stored) == spec
    onnx_norms = [n for n in build_onnx(spec, {k: np.ones(s, np.float32) for k, s in param_shapes(spec, 3).items()})
                  .graph.node if n.op_type == "LayerNormalization"]
    assert len(onnx_norms) == 4 and all(len(n.input) == 2 for n in onnx_norms)  # x and scale: no bias input


def test_caformer_attention_on_tokens_goes_in_with_parity():
    net = TinyCAFormer(in_channels=3).eval()
    spec = from_torch(net, (3, 8, 8))
    attention = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert len(attention) == 1 and attention[0]["heads"] == 2 and attention[0]["scale"] == pytest.approx(8 ** -0.5)
    assert [n.get("bias") for n in spec["nodes"] if n["op"] == "layer_norm"] == [False, False]
    check_parity(net, spec, (3, 8, 8))


def _norm_spec(**fields) -> dict:
    return {"name": "ln", "input_shape": [1, 4, 4], "nodes": [
        {"name": "a", "op": "conv", "inputs": ["input"], "in": 1, "out": 4, "k": 3, "pad": 1},
        {"name": "n", "op": "layer_norm", "inputs": ["a"], "ch": 4, **fields},
        {"name": "b", "op": "conv", "inputs": ["n"], "in": 4, "out": 3, "k": 1},
        {"name": "g", "op": "gap", "inputs": ["b"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]}


def test_bias_field_rules_and_normal_form():
    assert "bias" not in node_by_name(validate(_norm_spec(bias=True)))["n"]  # its default: left out
    assert node_by_name(validate(_norm_spec(bias=False)))["n"]["bias"] is False
    assert "n.bias" not in param_shapes(validate(_norm_spec(bias=False)))
    with pytest.raises(UsageError, match="layer_norm bias false needs affine"):
        validate(_norm_spec(bias=False, affine=False))
    for hostile in ("no", 0, None, 1):
        with pytest.raises(UsageError, match="bias"):
            validate(_norm_spec(bias=hostile))


@pytest.mark.parametrize("node", [{"op": "bn", "ch": 4, "bias": False}, {"op": "grn", "ch": 4, "bias": False},
                                  {"op": "layer_scale", "ch": 4, "bias": False}, {"op": "relu", "bias": False},
                                  {"op": "square", "bias": False}, {"op": "square", "exponent": 3}])
def test_bias_on_other_ops_and_a_squares_exponent_are_refused_by_name(node):
    spec = _norm_spec()
    spec["nodes"][1] = {"name": "n", "inputs": ["a"], **node}
    field = "bias" if "bias" in node else "exponent"
    with pytest.raises(UsageError, match=rf"node 1 \(n\): unknown fields \['{field}'\] for op '{node['op']}'"):
        validate(spec)


@pytest.mark.parametrize("over", ["channels", "map"])
def test_a_bias_less_norm_pins_its_channels_and_compacts_to_the_dense_logits(over):
    spec = validate(_norm_spec(bias=False, over=over))
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(spec, 2).items()}
    params["b.weight"][:, 2] = 0  # channel 2 read by nobody after the norm, whose statistics still run over it
    assert channel_map(spec).pinned == {"a"}
    small, kept, _ = compact_task(spec, params, channel_multiple=1)
    assert node_by_name(small)["a"]["out"] == 4 and "n.bias" not in kept
    x = torch.from_numpy(rng.standard_normal((5, 1, 4, 4)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(spec, from_numpy(params), x), forward(small, from_numpy(kept), x)
    assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5
    session = ort.InferenceSession(build_onnx(spec, params).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x.numpy()})[0] - dense.numpy()).max() < 1e-5


def test_a_constant_unit_through_square_is_folded():
    arch = validate({"name": "sq", "input_shape": [6], "nodes": [
        {"name": "l0", "op": "linear", "inputs": ["input"], "in": 6, "out": 5},
        {"name": "a0", "op": "square", "inputs": ["l0"]},
        {"name": "l1", "op": "linear", "inputs": ["a0"], "in": 5, "out": 4}]})
    rng = np.random.default_rng(1)
    p = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(arch, 3).items()}
    p["l0.weight"][0], p["l0.bias"][0] = 0, -1.5  # 2.25 after the square: folded into l1's bias
    p["l0.weight"][1], p["l0.bias"][1] = 0, 0.0  # 0: dropped
    small, kept, report = compact_task(arch, p, channel_multiple=1)
    assert node_by_name(small)["l0"]["out"] == 3
    x = torch.from_numpy(rng.standard_normal((7, 6)).astype(np.float32))
    with torch.no_grad():
        dense, compact = forward(arch, from_numpy(p), x), forward(small, from_numpy(kept), x)
    assert np.abs(dense.numpy() - compact.numpy()).max() < 1e-5


class _Power(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.conv, self.fc = kind, nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h, k = self.conv(x), self.kind
        if k == "cube":
            h = h ** 3
        elif k == "number base":
            h = 2 ** h
        elif k == "tensor exponent":
            h = torch.pow(h, h)
        elif k == "float two":
            h = h ** 2.0
        elif k == "method":
            h = h.pow(2)
        elif k == "square":
            h = torch.square(h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("kind", ["float two", "method", "square"])
def test_squares_go_in(kind):
    module = _Power(kind).eval()
    spec = from_torch(module, (3, 6, 6))
    assert [n["op"] for n in spec["nodes"]].count("square") == 1
    check_parity(module, spec, (3, 6, 6))


@pytest.mark.parametrize("kind, words", [("cube", "exponent 3"), ("number base", "exponent"),
                                         ("tensor exponent", "exponent 'conv'")])
def test_other_powers_are_refused_by_name(kind, words):
    with pytest.raises(UsageError, match=rf"'pow' .*test_metaformer.py:\d+.*a power with {words}"):
        from_torch(_Power(kind).eval(), (3, 6, 6))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["poolformerv2_s12", "convformer_s18", "caformer_s18"])
def test_timm_metaformer_v2_models_go_in_with_parity(name):
    import timm

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval()
    randomise_batchnorm(module)  # norms, StarReLU's numbers and res scales off their fresh values
    spec = from_torch(module, (3, 64, 64))
    assert {"square", "scalar_affine", "layer_norm"} <= {n["op"] for n in spec["nodes"]}
    check_parity(module, spec, (3, 64, 64), batch=2)


@pytest.mark.parametrize("net", ["metaformer", "caformer"])
@pytest.mark.parametrize("shape", ["lps", "mixed", "node", "lowrank", "permute"])
def test_runtime_host_and_device_twin_equal_training_on_bias_less_norms_and_squares(net, shape):
    """Every delta kind on the tiny MetaFormer / CAFormer (bias-less LayerNorm, GroupNorm1 and token LayerNorm,
    StarReLU's square, a squared ReLU): random switches over 3 tasks with 2 slots, the host runtime and the device
    path (its numpy twin, with and without the CUDA-graph layout) against training's forward of `materialize` and
    the exporter's per-task sessions."""
    module = TinyMetaFormer() if net == "metaformer" else TinyCAFormer()
    arch = validate(from_torch(module.eval(), (1, 8, 8)))
    packed = random_packed(arch, n_tasks=3, shape=shape, classes=(5, 3))
    refs = references(packed)
    runtimes = [TaskRuntime(packed, cache_tasks=2), TaskRuntime(packed, resident="device", cache_tasks=2),
                TaskRuntime(packed, resident="device", cache_tasks=2, cuda_graph=True)]
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(24):
        t = int(rng.integers(3))
        x = rng.standard_normal((int(rng.choice([1, 3])), 1, 8, 8)).astype(np.float32)
        with torch.no_grad():
            trained = forward(packed.arch, from_numpy(materialize(packed, t)), torch.from_numpy(x)).numpy()
        want = refs[t].run(None, {"x": x})[0]
        assert np.abs(want - trained).max() < 1e-4
        for rt in runtimes:
            worst = max(worst, float(np.abs(rt.infer(x, task=t) - want).max()))
    for rt in runtimes:
        rt.close()
    assert worst <= 1e-5, worst
