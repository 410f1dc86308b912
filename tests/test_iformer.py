"""iFormer (timm's ``timm.models.iformer``) through `from_torch`: its single-head modulation attention (``SHMA``)
kept whole — q and k ConvNorms, the sigmoid-gated v_gate split into v and the gate, one head over every position,
the gate's product and the proj ConvNorm — and the stages around it (conv blocks, RepCPE, FFN, layer scales, the
BatchNorm1d-then-Linear head, distilled heads averaged) traced, against the module (torch form and ONNX); the
windowed form and other layers in its places refused by name; iformer_t at 64 and 224 (slow, a few seconds each)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_nets import iformer_graph, tiny_iformer
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


def _randomised(module: nn.Module) -> nn.Module:
    randomised_all(module)
    randomise_batchnorm(module)
    return module.eval()


@pytest.mark.parametrize("kwargs,image", [
    ({}, 16), ({}, 24), ({"attn_ratio": 2}, 16), ({"attn_head_dim_reduction": (0, 4)}, 16),
    ({"layer_scale_init_value": 1e-6}, 16), ({"distillation": True}, 16), ({"depths": (1, 4)}, 16)],
    ids=["2x2_map", "3x3_map", "v_twice_dim", "dim_attn_4", "layer_scales", "distilled", "conv_suffix"])
def test_tiny_iformer_parity(kwargs, image):
    module = _randomised(tiny_iformer(**kwargs))
    spec = from_torch(module, (1, image, image))
    check_parity(module, spec, (1, image, image))


def test_single_head_gate_and_scale_are_recorded():
    module = _randomised(tiny_iformer(attn_ratio=2))
    nodes = {n["name"]: n for n in from_torch(module, (1, 16, 16))["nodes"]}
    attn = "stages.1.blocks.1.mixer.module"
    assert nodes[f"{attn}.gate_act"]["op"] == "sigmoid"
    assert [(nodes[f"{attn}.{p}"]["start"], nodes[f"{attn}.{p}"]["stop"]) for p in ("v", "gate")] == \
        [(0, 32), (32, 64)]
    assert nodes[f"{attn}.attend"]["inputs"] == [f"{attn}.q.bn", f"{attn}.k.bn", f"{attn}.v"]
    assert nodes[f"{attn}.attend"]["heads"] == 1 and nodes[f"{attn}.attend"]["scale"] == pytest.approx(8 ** -0.5)
    assert nodes[f"{attn}.gated"]["inputs"] == [f"{attn}.attend", f"{attn}.gate"]
    assert nodes[f"{attn}.proj.c"]["in"] == 32


def test_windowed_shma_and_other_layers_are_refused_by_name():
    module = tiny_iformer()
    module.stages[1].blocks[1].mixer.module.window_size = 2
    assert_refused(module, "SHMA", "stages.1.blocks.1.mixer.module", "window_size 2", input_shape=(1, 16, 16))
    module = tiny_iformer()
    module.stages[1].blocks[1].mixer.module.q = nn.Conv2d(16, 8, 1)
    assert_refused(module, "stages.1.blocks.1.mixer.module.q", "ConvNorm", input_shape=(1, 16, 16))
    module = tiny_iformer()
    module.stages[1].blocks[1].mixer.module.gate_act = nn.Softmax(dim=1)
    assert_refused(module, "stages.1.blocks.1.mixer.module.gate_act", input_shape=(1, 16, 16))


@pytest.mark.slow
@pytest.mark.parametrize("image", [64, 224])
def test_library_iformer_t(image):
    torch.manual_seed(0)
    module = build_module("timm:iformer_t", {"num_classes": 10}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, image, image))
    check_parity(module, spec, (3, image, image), batch=2)


@pytest.mark.parametrize("fused", [True, False])
def test_the_scale_the_forward_applies(fused):
    """timm's fused path scales by dim_attn^-0.5 whatever `scale` says; the unfused one multiplies by `scale`."""
    module = _randomised(tiny_iformer())
    module.stages[1].blocks[1].mixer.module.fused_attn = fused
    module.stages[1].blocks[1].mixer.module.scale = 0.9
    spec = from_torch(module, (1, 16, 16))
    check_parity(module, spec, (1, 16, 16))


def test_methods_graph_net_matches():
    """The network every method trains on (test_methods_on_graphs): SHMA over the 2×2 map of an 8×8 input."""
    module = _randomised(iformer_graph())
    spec = from_torch(module, (1, 8, 8))
    assert any(n["op"] == "attention" for n in spec["nodes"])
    check_parity(module, spec, (1, 8, 8))
