"""EfficientFormer (V1, timm's ``timm.models.efficientformer``) through `from_torch`: its Attention on the last
stage's tokens (kept whole: the packed qkv as LeViT's per-head blocks, LeViT's bias table and index, the proj),
parity of the spec's torch forward and ONNX graph with the module (attention biases, layer scales and norms random),
a small EfficientFormer (Meta4D pooling blocks, Flat, Meta3D attention, the distilled head pair), refusals by name,
and timm's efficientformer_l1 at its native 224 (slow; its bias table is built for a 7×7 grid)."""
from __future__ import annotations

import pytest
from torch import nn
from torch_nets import check_parity, randomised_with_biases, timm

from edgecl.arch import from_torch
from edgecl.arch.module_state import state_keys
from edgecl.errors import UsageError

from timm.models.efficientformer import Attention, EfficientFormer  # noqa: E402  (torch_nets set up the imports)


def _parity(module: nn.Module, shape: tuple[int, ...]) -> dict:
    spec = from_torch(randomised_with_biases(module), shape)
    check_parity(module, spec, shape)
    return spec


class _Tokens(nn.Module):
    """A stem conv, its map as tokens (flatten(2).transpose(1, 2)), one V1 Attention added back, mean, Linear."""

    def __init__(self, attention: nn.Module, width: int = 16):
        super().__init__()
        self.stem, self.attn, self.fc = nn.Conv2d(1, width, 3, padding=1), attention, nn.Linear(width, 2)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.fc((x + self.attn(x)).mean(1))


@pytest.mark.parametrize("heads, key_dim, ratio", [(2, 4, 2), (3, 2, 3), (1, 4, 1)])
def test_attention_parity(heads, key_dim, ratio):
    spec = _parity(_Tokens(Attention(16, key_dim=key_dim, num_heads=heads, attn_ratio=ratio, resolution=4)),
                   (1, 4, 4))
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert attend["heads"] == heads and attend["bias_offsets"] == 16 and len(attend["bias_index"]) == 16
    keys = state_keys(spec)
    assert keys["attn.attend.bias"] == "attn.attention_biases" and keys["attn.qkv.weight"] == "attn.qkv.weight"


def test_head_packing_is_read_per_head():
    """timm packs q_h k_h v_h per head: a spec that read q, k, v as three plain thirds would differ."""
    module = randomised_with_biases(_Tokens(Attention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=4)))
    spec = from_torch(module, (1, 4, 4))
    slices = [(n["start"], n["stop"]) for n in spec["nodes"] if n["op"] == "slice"]
    assert slices == [(0, 4), (16, 20), (4, 8), (20, 24), (8, 16), (24, 32)]  # q_0 q_1, k_0 k_1, v_0 v_1
    check_parity(module, spec, (1, 4, 4))


def test_small_efficientformer_parity():
    """Meta4D blocks (pooling minus input, conv MLP with BatchNorms, layer scales), Flat, a Meta3D block (LayerNorm,
    attention with its 7×7 bias, Mlp) and the averaged head pair, at 28×28 (the stem's /4 gives the 7×7 grid)."""
    module = EfficientFormer(depths=(1, 2), embed_dims=(8, 8), downsamples=(False, False), num_vit=1,
                             num_classes=3)
    spec = _parity(module, (3, 28, 28))
    assert sum(n["op"] == "attention" for n in spec["nodes"]) == 1


def test_refusals_name_the_layer():
    module = _Tokens(Attention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=4))
    module.attn.proj = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(UsageError, match="EfficientFormer Attention at .attn.*and proj Sequential") as err:
        from_torch(module.eval(), (1, 4, 4))
    assert "test_efficientformer_v1.py:" in str(err.value)


@pytest.mark.slow
def test_efficientformer_l1_at_224():
    _parity(timm.create_model("efficientformer_l1", num_classes=10), (3, 224, 224))
