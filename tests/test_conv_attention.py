"""CPUBone's and LowFormer's conv-projected attention (timm's ``ConvAttention``) through `from_torch`: kept whole —
a strided depthwise projection (CPUBone's 2×2 kernels with their pads), each head's packed q, k, v, softmax
attention, the output projection, CPUBone's nearest upsampling and the crop back to the input's size — against the
module (torch form and ONNX); LowFormer's and CPUBone's learned ConvTranspose2d upsampling (a ``conv_transpose``,
depthwise or fused with the output projection, at strides 1 to 4); other layers refused by name; cpubone_nano,
cpubone_s0, the attention-free lowformer_e1 and lowformer_b0 at 64 (slow, a few seconds each)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_nets import TinyConvAttention, conv_attention_graph
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module


def _randomised(module: nn.Module) -> nn.Module:
    randomised_all(module)
    randomise_batchnorm(module)
    return module.eval()


@pytest.mark.parametrize("kwargs,image", [
    ({}, 8), ({}, 10), ({"att_stride": 1}, 10), ({"fuse_out_proj": False}, 12), ({"small_kernels": False}, 10),
    ({"small_kernels": False, "att_stride": 1, "att_kernel": 3}, 8), ({"dim": 120}, 8), ({"att_stride": 4}, 14)],
    ids=["2x2_kernel_4x4", "odd_map_pad_and_crop", "stride1_zeropad", "o_proj", "5x5_kernel_odd_crop",
         "3x3_stride1", "two_heads", "stride4_crop"])
def test_cpubone_conv_attention_parity(kwargs, image):
    dim = kwargs.pop("dim", 16)
    module = _randomised(TinyConvAttention("cpubone", dim, **kwargs))
    spec = from_torch(module, (1, image, image))
    check_parity(module, spec, (1, image, image))


def test_heads_scale_pads_and_crop_are_recorded():
    module = _randomised(TinyConvAttention("cpubone", 120))
    attn = module.attn
    assert (attn.num_heads, attn.head_dim) == (2, 30)
    nodes = {n["name"]: n for n in from_torch(module, (1, 10, 10))["nodes"]}
    assert nodes["attn.pad"]["pads"] == [0, 0, 1, 1]  # the 5×5 map padded to 6×6 for the 2×2, stride-2 projection
    assert nodes["attn.attend"]["heads"] == 2 and nodes["attn.attend"]["scale"] == pytest.approx(30 ** -0.5)
    # head h's q, k, v are channels [90h, 90h + 30), [90h + 30, 90h + 60), [90h + 60, 90h + 90) of pwise
    assert [(nodes[f"attn.part1.head{h}"]["start"], nodes[f"attn.part1.head{h}"]["stop"]) for h in (0, 1)] == \
        [(30, 60), (120, 150)]
    assert nodes["attn.upsampling.1"]["scale"] == [2, 2]
    assert nodes["attn.crop"]["pads"] == [0, 0, -1, -1]  # the 6×6 upsampled map cropped back to 5×5


@pytest.mark.parametrize("family,kwargs,image", [
    ("lowformer", {}, 8), ("lowformer", {"fuse_out_proj": False}, 10), ("lowformer", {"att_stride": 1}, 8),
    ("lowformer", {"att_stride": 3, "fuse_out_proj": False}, 14), ("lowformer", {"att_stride": 4}, 16),
    ("cpubone", {"upsample_mode": "transpose"}, 10), ("cpubone", {"upsample_mode": "transpose", "att_stride": 3}, 8)],
    ids=["fused_stride2", "depthwise_stride2", "fused_stride1", "depthwise_stride3_crop", "fused_stride4",
         "cpubone_transpose", "cpubone_transpose_stride3_crop"])
def test_transposed_upsampling_parity(family, kwargs, image):
    """The learned ConvTranspose2d upsampling (fused: o_proj's outputs to the input's channels; else depthwise) is a
    conv_transpose with the module's weight, cropped back to the input's side where it overshoots."""
    module = _randomised(TinyConvAttention(family, **kwargs))
    spec = from_torch(module, (1, image, image))
    node = next(n for n in spec["nodes"] if n["name"] == "attn.upsampling")
    assert node["op"] == "conv_transpose" and node["groups"] == (1 if kwargs.get("fuse_out_proj", True) else 16)
    check_parity(module, spec, (1, image, image))


def test_other_layers_are_refused_by_name():
    module = TinyConvAttention("cpubone")
    module.attn.conv_proj.act = nn.ReLU()
    assert_refused(module, "attn.conv_proj", "no activation")
    module = TinyConvAttention("cpubone")
    module.attn.upsampling[1] = nn.Upsample(scale_factor=2, mode="bilinear")
    assert_refused(module, "attn.upsampling", "nearest")
    module = TinyConvAttention("cpubone", att_stride=1)
    module.attn.conv_proj.conv[0] = nn.ZeroPad2d((2, -1, 2, -1))  # runs: 1 row and column more, as (1, 0, 1, 0)
    assert_refused(module, "attn.conv_proj.conv", "ZeroPad2d (no crop)")
    module = TinyConvAttention("cpubone", small_kernels=False, att_stride=1, att_kernel=3)
    module.attn.conv_proj.norm = nn.GroupNorm(1, 16)
    assert_refused(module, "attn.conv_proj.norm", "GroupNorm", "BatchNorm2d")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cpubone_nano", "cpubone_s0", "lowformer_e1", "lowformer_b0"])
def test_library_models_at_64(name):
    torch.manual_seed(0)
    module = build_module(f"timm:{name}", {"num_classes": 10}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)


@pytest.mark.slow
def test_cpubone_with_transposed_upsampling_at_64():
    """CPUBone's attn_upsample='transpose' (its class default; the registered models pass 'nearest')."""
    torch.manual_seed(0)
    module = build_module("timm:cpubone_nano", {"num_classes": 10, "attn_upsample": "transpose"}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    assert any(n["op"] == "conv_transpose" for n in spec["nodes"])
    check_parity(module, spec, (3, 64, 64), batch=2)


@pytest.mark.parametrize("fused", [True, False])
def test_the_scale_the_forward_applies(fused):
    """timm's fused path scales by head_dim^-0.5 whatever `scale` says; the unfused one multiplies by `scale`."""
    module = _randomised(TinyConvAttention("cpubone"))
    module.attn.fused_attn, module.attn.scale = fused, 0.9
    spec = from_torch(module, (1, 8, 8))
    check_parity(module, spec, (1, 8, 8))


def test_methods_graph_net_crops_and_matches():
    """The network every method trains on (test_methods_on_graphs): 8×8 → 3×3, upsampled to 9×9, cropped to 8×8."""
    module = _randomised(conv_attention_graph())
    spec = from_torch(module, (1, 8, 8))
    assert next(n for n in spec["nodes"] if n["name"] == "attn.crop")["pads"] == [0, 0, -1, -1]
    check_parity(module, spec, (1, 8, 8))
