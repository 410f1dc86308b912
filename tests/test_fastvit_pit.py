"""FastViT's attention stage and PiT through `from_torch`: parity of the spec's torch forward and its ONNX graph
with timm's real modules (FastViT's Attention over a map's positions: qkv Linear → slices → attention → proj Linear;
PiT's class tokens split off with x[:, :n], the rest back to a map, pooled by a strided depthwise conv while the
class tokens pass their own Linear, and the tokens joined again), refusals by name, and timm's fastvit_sa12 and
pit_ti_224 at 64×64 (slow)."""
from __future__ import annotations

import pytest
import torch
from layer_nets_vit import FastVitAttention, TinyFastViT, tiny_pit
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, timm

from edgecl.arch import from_torch
from edgecl.errors import UsageError


def _parity(module: nn.Module, shape=(3, 8, 8)) -> dict:
    torch.manual_seed(0)
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), shape)
    check_parity(module, spec, shape)
    return spec


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_fastvit_attention_parity(heads):
    spec = _parity(TinyFastViT(in_channels=3, heads=heads))
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert attend["heads"] == heads and attend["scale"] == pytest.approx((32 // heads) ** -0.5)
    qkv = next(n for n in spec["nodes"] if n["name"] == "block.token_mixer.qkv")
    assert (qkv["op"], qkv["out"], qkv["module_shape"]) == ("conv", 96, [96, 32])  # the Linear's stored weight


def test_fastvit_attention_without_qkv_bias():
    m = TinyFastViT(in_channels=3)
    m.block.token_mixer = FastVitAttention(32, head_dim=16, qkv_bias=False)
    spec = _parity(m)
    assert next(n for n in spec["nodes"] if n["name"] == "block.token_mixer.qkv")["bias"] is False


@pytest.mark.parametrize("distilled", [False, True])
def test_tiny_pit_parity(distilled):
    spec = _parity(tiny_pit(in_channels=3, distilled=distilled))
    n = 2 if distilled else 1
    split = [(t["index"], t["count"]) for t in spec["nodes"] if t["op"] == "token" and t["count"] > 1 or
             t["op"] == "token" and t["index"] == 0 and t["name"].endswith(".tokens")]
    assert (0, n) in split and (n, 16) in split  # the class tokens and the 4×4 map's tokens, split at each stage
    pads = [t["pads"] for t in spec["nodes"] if t["op"] == "pad"]
    assert pads == [[0, 0, 4, 0], [n, 0, 0, 0]]  # the pooled class tokens before the 2×2 map's 4 tokens


class _Tokens(nn.Module):
    """A patch conv to tokens, then `edit` of them (a refused use of the forms PiT's support added)."""

    def __init__(self, edit):
        super().__init__()
        self.patch, self.fc, self.edit = nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 6), edit

    def forward(self, x):
        return self.edit(self, self.patch(x).flatten(2).transpose(1, 2)).flatten(1)


@pytest.mark.parametrize("edit, words", [
    (lambda m, t: t[:, 1:3:2], "indexing tokens with"),
    (lambda m, t: torch.cat((m.fc(t[:, :1]), t[:, :, :6]), dim=1), "unsupported op 'getitem'"),
    (lambda m, t: torch.cat((t, t), dim=0), r"tokens of shapes \[\[16, 8\], \[16, 8\]\] along dim 0"),  # dim 2: the
    # channels, supported (tests/test_mlp_families.py)
    (lambda m, t: t.transpose(1, 2).amax(2), "unsupported op 'amax'.*swapped to \\(B, C, T\\)"),  # not back to a map
    (lambda m, t: t.transpose(1, 2).mean(1), "unsupported op 'mean'.*swapped to \\(B, C, T\\)"),  # over channels
])
def test_unsupported_token_forms_are_refused_by_name(edit, words):
    with pytest.raises(UsageError, match=words) as err:
        from_torch(_Tokens(edit), (3, 8, 8), classifier=False)
    assert "test_fastvit_pit.py:" in str(err.value)


class _TokenMean(nn.Module):
    """Tokens swapped to (B, C, T) and averaged over T (EfficientViM's ``flatten(2).mean(-1)``): a `gap`."""

    def __init__(self, dim: int):
        super().__init__()
        self.patch, self.head, self.dim = nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 5), dim

    def forward(self, x):
        return self.head(self.patch(x).flatten(2).transpose(1, 2).transpose(1, 2).mean(self.dim))


@pytest.mark.parametrize("dim", [2, -1])
def test_the_mean_over_swapped_tokens_is_a_global_average(dim):
    spec = _parity(_TokenMean(dim))
    assert [n["op"] for n in spec["nodes"]].count("gap") == 1


@pytest.mark.parametrize("part, layer, words", [
    ("qkv", lambda: nn.Sequential(nn.Linear(32, 96), nn.ReLU()), "qkv is a Sequential"),  # runs; not a Linear
    ("proj_drop", nn.ReLU, "proj_drop is a ReLU"),
    ("attn_drop", nn.GELU, "attn_drop is a GELU"),
])
def test_fastvit_attention_variants_are_refused_by_name(part, layer, words):
    m = TinyFastViT(in_channels=3)
    setattr(m.block.token_mixer, part, layer())
    with pytest.raises(UsageError, match=words) as err:
        from_torch(m.eval(), (3, 8, 8))
    assert "'block.token_mixer'" in str(err.value) and "fastvit.py:" in str(err.value)


@pytest.mark.slow
def test_fastvit_sa12_at_64():
    _parity(timm.create_model("fastvit_sa12"), (3, 64, 64))


@pytest.mark.slow
def test_pit_ti_224_at_64():
    _parity(timm.create_model("pit_ti_224", img_size=64), (3, 64, 64))
