"""The scale each converted attention applies is the one its module's forward really applies: timm's fused path
(``scaled_dot_product_attention`` without ``scale=``, its default) uses q's head size^-0.5 whatever ``m.scale`` says,
its unfused path multiplies by ``m.scale``. Each network here has its attentions' ``scale`` changed after
construction on both paths; a converter that read ``m.scale`` on the fused path (or ignored it on the unfused one)
gave logits unlike the module's, with no error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_nets import TinyMaxViT, TinyMNv4Hybrid, TinyMobileViT, TinySwin, TinyTinyViT, TinyViT
from layer_nets_meta import TinyCAFormer
from layer_nets_vit import TinyFastViT, tiny_davit
from torch_nets import check_parity
from xcit_nets import TinyXCiT

from edgecl.arch import from_torch

# network, input shape, the (module, class name) of the attentions whose scale is changed
_NETS = {
    "vit": (TinyViT, (1, 8, 8), ("timm.layers.attention", "Attention")),
    "caformer": (TinyCAFormer, (1, 8, 8), ("timm.models.metaformer", "Attention")),
    "mnv4_mqa": (TinyMNv4Hybrid, (1, 8, 8), ("timm.layers.attention2d", "MultiQueryAttention2d")),
    "fastvit": (TinyFastViT, (1, 8, 8), ("timm.models.fastvit", "Attention")),
    "davit": (tiny_davit, (1, 8, 8), ("timm.models.davit", "WindowAttention")),
    "swin": (TinySwin, (1, 8, 8), ("timm.models.swin_transformer", "WindowAttention")),
    "tiny_vit": (TinyTinyViT, (1, 8, 8), ("timm.models.tiny_vit", "Attention")),
    "mobilevit": (TinyMobileViT, (1, 8, 8), ("timm.layers.attention", "Attention")),
    "maxvit": (TinyMaxViT, (1, 8, 8), ("timm.models.maxxvit", "AttentionCl")),
    "cait_class_attn": (lambda: TinyXCiT(in_channels=3), (3, 8, 8), ("timm.models.cait", "ClassAttn")),
}


# weights of std 0.3 leave MobileNetV4's 4 keys too alike for the scale to move its logits past the tolerance
_STD = {"mnv4_mqa": 1.0}


def _randomised(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Every parameter and BatchNorm statistic drawn at random (non-zero logits, no identity norm hiding a scale)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return module.eval()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("net", list(_NETS))
def test_the_scale_is_the_one_the_forward_applies(net, fused):
    build, shape, kind = _NETS[net]
    module = _randomised(build(), _STD.get(net, 0.3))
    changed = [m for m in module.modules() if (type(m).__module__, type(m).__name__) == kind]
    assert changed, f"{net} holds no {kind}: the test would prove nothing"
    for m in changed:
        m.scale, m.fused_attn = 4.0, fused  # head_dim^-0.5 at construction: ≤ 0.5 for these head sizes
    check_parity(module, from_torch(module, shape), shape, batch=2)


def test_multi_query_einsum_path_reads_the_scale():
    """MultiQueryAttention2d's einsum path multiplies by `m.scale` whether fused_attn is set or not."""
    module = _randomised(TinyMNv4Hybrid(), _STD["mnv4_mqa"])
    for m in module.modules():
        if type(m).__name__ == "MultiQueryAttention2d":
            m.scale, m.fused_attn, m.einsum = 4.0, True, True
    check_parity(module, from_torch(module, (1, 8, 8)), (1, 8, 8), batch=2)
