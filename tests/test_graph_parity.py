"""Export and runtime parity on graphs: for every delta kind, on the resnet preset, the custom ResCat module (residual
add, concatenation, depthwise conv, SE gate) and — slow — torchvision resnet18 and mobilenet_v2, the torch-free
runtime (in place with factored layers, in place folded, per-task sessions) and the exported ONNX (folded and
compacted) give the logits of the training-side evaluation: `materialize` + `edgecl.train.models.forward`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.arch import from_torch, is_depthwise, node_by_name, preset
from edgecl.deltas import materialize
from edgecl.export import export_onnx
from edgecl.export.onnx_export import run_onnx
from edgecl.runtime import TaskRuntime
from edgecl.runtime import plan as plan_module
from edgecl.synthetic import SHAPES, random_packed
from edgecl.train.models import forward, from_numpy
from layer_nets import TinyEfficientFormerV2, TinyLeViT, TinyMobileViT, TinySwin, TinyTF, TinyViT
from torch_nets import TinyConvNeXt, TinyShuffle, spec_and_weights

# LayerNorm, layer scales, a global response norm (TinyConvNeXt); channel shuffles (TinyShuffle); pad nodes (TinyTF);
# class token, position embedding and self-attention (TinyViT); attention biases and strided queries (TinyLeViT);
# shifted window attention and patch merging (TinySwin); talking heads and a bilinear up-sampling
# (TinyEfficientFormerV2); grid attention (TinyMobileViT)
CUSTOM = {"custom ConvNeXt": lambda: TinyConvNeXt(in_channels=3), "custom shuffle": lambda: TinyShuffle(3, 3, 12),
          "custom TF padding": lambda: TinyTF(3, 3, 8), "custom ViT": lambda: TinyViT(3, 3, image=16),
          "custom LeViT": lambda: TinyLeViT(3, 3, image=16), "custom Swin": lambda: TinySwin(3, 3, image=16),
          "custom EfficientFormerV2": lambda: TinyEfficientFormerV2(3, 3, image=16),
          "custom MobileViT": lambda: TinyMobileViT(3, 3, image=16)}

TOL = 1e-4


def _arch(name: str) -> dict:
    if name == "resnet preset":
        return preset("resnet")
    if name in CUSTOM:
        return from_torch(CUSTOM[name](), (3, 16, 16))
    return spec_and_weights(name, (3, 16, 16) if name == "custom residual + concat" else (3, 32, 32))[0]


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and float(np.abs(got - want).max()) <= TOL * max(1.0, float(np.abs(want).max()))


def check_parity(packed, tmp_path, batch: int = 3) -> dict[str, list]:
    """Every serving path against torch on every task; returns the export index of the compacted graphs."""
    x = np.random.default_rng(0).standard_normal((batch, *packed.arch["input_shape"])).astype(np.float32)
    with torch.no_grad():
        want = [forward(packed.arch, from_numpy(materialize(packed, t)), torch.from_numpy(x)).numpy()
                for t in range(packed.n_tasks)]
    order = [packed.n_tasks - 1, *range(packed.n_tasks), 0]  # misses, a repeat, a switch back
    for label, kwargs in (("in place, factored", {"strategy": "inplace"}),
                          ("in place, folded", {"strategy": "inplace", "factor": False}),
                          ("per-task sessions", {"strategy": "sessions"})):
        with TaskRuntime(packed, cache_tasks=1, **kwargs) as runtime:
            for t in order:
                assert _same(runtime.infer(x, task=t), want[t]), (label, t)
    indices = {}
    for compact in (False, True):
        out = tmp_path / ("compacted" if compact else "folded")
        indices[compact] = export_onnx(packed, out, compact=compact, progress=False)
        for entry in indices[compact]["tasks"]:
            assert _same(run_onnx(out / entry["file"], x), want[entry["index"]]), (compact, entry)
            assert not (entry["compaction"] or {}).get("reason", "").startswith("rejected"), entry
    return indices[True]


def _check_factored_forms(packed) -> dict[str, str]:
    """Factored layers are only those whose form is exact (no permute/low rank on grouped convs)."""
    forms = plan_module.factor_forms(packed)
    nodes = node_by_name(packed.arch)
    for layer, form in forms.items():
        node = nodes[layer]
        if node["op"] == "conv" and form != "node":
            assert node["groups"] == 1 and not is_depthwise(node), (layer, form)
    return forms


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["resnet preset", "custom residual + concat", *CUSTOM])
def test_small_graphs_every_delta_kind(name, shape, tmp_path, monkeypatch):
    """Every eligible layer factored (size threshold 0), so the factored forms meet the residual adds, the
    concatenation, the depthwise conv (never factored for permute or low rank) and the gate."""
    monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", 0)
    packed = random_packed(_arch(name), n_tasks=3, shape=shape, classes=(5, 3))
    forms = _check_factored_forms(packed)
    if shape in ("node", "lowrank", "permute"):
        assert forms, "nothing factored: the test would not exercise the factored graph"
    index = check_parity(packed, tmp_path)
    if shape == "node" and name == "custom residual + concat":  # dead rows leave constants or unread channels:
        # every task's graph gets smaller (the preset's 16/32-channel groups stay whole: rounded to 16 channels)
        assert all(e["params_compact"] < e["params_dense"] for e in index["tasks"])


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["mixed", "node", "lowrank", "permute"])
@pytest.mark.parametrize("name", ["torchvision resnet18", "torchvision mobilenet_v2"])
def test_torchvision_graphs_every_delta_kind(name, shape, tmp_path, monkeypatch):
    """resnet18 (11 M parameters) with the default size rule (its large convolutions factored), mobilenet_v2
    (width 0.25) with every eligible layer factored; two tasks each."""
    if name != "torchvision resnet18":
        monkeypatch.setattr(plan_module, "FACTOR_MIN_ELEMENTS", 0)
    packed = random_packed(_arch(name), n_tasks=2, shape=shape, classes=(5, 3))
    forms = _check_factored_forms(packed)
    assert forms
    index = check_parity(packed, tmp_path, batch=2)
    if shape == "node":
        assert all(e["params_compact"] < e["params_dense"] for e in index["tasks"])


@pytest.mark.parametrize("shape", ["node", "permute"])
def test_wide_convs_are_factored_at_any_size(shape, tmp_path):
    """Default rule: node masks and permutations of convolutions reading ≥ 8 channels are factored however small
    (a switched conv weight loses ONNX Runtime's blocked kernels); the one-channel stem is folded; low rank keeps
    the size rule. The default forms equal torch too."""
    arch = preset("resnet")
    packed = random_packed(arch, n_tasks=3, shape=shape, classes=(5, 3))
    convs = [n["name"] for n in arch["nodes"] if n["op"] == "conv"]
    assert set(_check_factored_forms(packed)) == set(convs) - {"stem"}
    assert plan_module.factor_forms(random_packed(arch, n_tasks=2, shape="lowrank")) == {}
    check_parity(packed, tmp_path)
