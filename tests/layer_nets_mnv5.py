"""MobileNetV5 (timm's ``MobileNetV5``, Gemma 3n's vision encoder) in small, for the graph tests: the same classes as
``mobilenetv5_300m`` — RmsNorm2d and RmsNormAct2d everywhere, tanh GELU, layer scales, Universal Inverted Residual
and edge residual blocks, multi-query attention whose keys and values are down-sampled by a strided depthwise conv
and an RmsNorm2d, and the multi-scale fusion adapter (MSFA: the last stage up-sampled to the one before, concatenated,
a UIR, then pooled or bilinearly resized to its output resolution) — with a few narrow blocks."""
from __future__ import annotations

from functools import partial

from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()

import timm  # noqa: E402  (after ensure_torchvision_imports)
from timm.layers import ConvNormAct, RmsNorm2d  # noqa: E402
from timm.models._efficientnet_blocks import MobileAttention, UniversalInvertedResidual  # noqa: E402
from timm.models._efficientnet_builder import decode_arch_def  # noqa: E402
from timm.models.mobilenetv5 import MobileNetV5, MobileNetV5MultiScaleFusionAdapter  # noqa: E402
from torch import nn  # noqa: E402

_ARCH = [["er_r1_k3_s2_e4_c8"],
         ["uir_r1_a3_k5_s2_e2_c12", "uir_r1_a5_k0_s1_e2_c12"],
         ["uir_r1_a5_k5_s2_e2_c16", "mqa_r1_k3_h2_v2_s1_d8_c16", "uir_r1_a0_k0_s1_e2_c16"],
         ["uir_r1_a5_k5_s2_e2_c24", "mqa_r1_k3_h3_s1_d8_c24", "uir_r1_a0_k0_s1_e2_c24"]]
_GELU = partial(nn.GELU, approximate="tanh")

def tiny_mnv5(classes: int = 5, msfa_output_resolution: int = 2, **kwargs) -> nn.Module:
    """A MobileNetV5 of 9 narrow blocks for 64×64 inputs (maps 32, 16, 8, 4, 2 after the stem and each stage). The
    MSFA fuses the 4×4 and 2×2 maps at 4×4, then average-pools to `msfa_output_resolution` where it divides 4, else
    resizes bilinearly (8: ×2). `kwargs`: MobileNetV5's own (``pad_type="same"``: mobilenetv5_300m_enc's)."""
    return MobileNetV5(decode_arch_def(_ARCH), num_classes=classes, stem_size=8, num_features=32,
                       msfa_output_resolution=msfa_output_resolution, norm_layer=RmsNorm2d,
                       act_layer=_GELU, layer_scale_init_value=1e-5, **kwargs)


class GraphMNv5(nn.Module):
    """MobileNetV5's forward in small for 8×8 images (the methods' graph tests; MobileNetV5 itself needs a stride at
    every stage), of its own timm layers: an RmsNormAct2d stem (4×4), a multi-query attention block whose keys and
    values a strided depthwise conv and an RmsNorm2d halve (2×2: four keys, so they matter), two strided UIRs (2×2,
    1×1), and the MSFA of their maps (the 1×1 up-sampled to 2×2, concatenated, a UIR, resized bilinearly to 4×4,
    RmsNorm2d)."""

    def __init__(self, classes: int = 3, in_channels: int = 1):
        super().__init__()
        kw = dict(act_layer=_GELU, norm_layer=RmsNorm2d, layer_scale_init_value=1e-5)
        self.stem = ConvNormAct(in_channels, 8, 3, stride=2, norm_layer=RmsNorm2d, act_layer=_GELU)
        self.attn = MobileAttention(8, 8, num_heads=2, key_dim=4, value_dim=4, use_multi_query=True, kv_stride=2,
                                    **kw)
        self.down = UniversalInvertedResidual(8, 12, dw_kernel_size_start=3, stride=2, exp_ratio=2, **kw)
        self.last = UniversalInvertedResidual(12, 16, dw_kernel_size_start=3, stride=2, exp_ratio=2, **kw)
        self.msfa = MobileNetV5MultiScaleFusionAdapter([12, 16], 16, output_resolution=4, norm_layer=RmsNorm2d,
                                                       act_layer=_GELU)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        middle = self.down(self.attn(self.stem(x)))
        return self.fc(self.msfa([middle, self.last(middle)]).mean((2, 3)))


def mnv5_spec(input_shape=(1, 8, 8)) -> dict:
    from edgecl.arch import from_torch

    return from_torch(GraphMNv5(in_channels=input_shape[0]).eval(), tuple(input_shape))


__all__ = ["GraphMNv5", "mnv5_spec", "tiny_mnv5", "timm"]
