"""EfficientFormerV2's attention through `from_torch` (timm's Attention2d and Attention2dDownsample, kept whole):
parity of the spec's torch forward and ONNX graph with the modules (attention biases random, so the bias table and
its index are read; talking heads; the strided variant's bilinear up-sampling), the ``talking_heads`` and upsample
``mode`` fields (validation, stored form), refusals by name, and timm's efficientformerv2_s0 at 64 (slow)."""
from __future__ import annotations

import pytest
import torch
from layer_nets import FormerAttention, TinyEfficientFormerV2
from torch import nn
from torch_nets import check_parity, randomised_with_biases, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import state_keys
from edgecl.arch.spec import rowless_tensors
from edgecl.errors import UsageError


def _parity(module: nn.Module, shape=(1, 8, 8)) -> dict:
    spec = from_torch(randomised_with_biases(module), shape)
    check_parity(module, spec, shape)
    return spec


class _One(nn.Module):
    """A stem conv and one attention module on its map, then the mean and a Linear."""

    def __init__(self, attention: nn.Module, width: int = 16, out: int = 16):
        super().__init__()
        self.stem, self.attn, self.fc = nn.Conv2d(1, width, 3, padding=1), attention, nn.Linear(out, 2)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean([2, 3]))


@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2), dict(num_heads=3, key_dim=2, attn_ratio=3)])
def test_attention2d_parity(kwargs):
    spec = _parity(_One(FormerAttention(16, **{"key_dim": 4, "num_heads": 2, "attn_ratio": 2, "resolution": 8,
                                               **kwargs})))
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert attend["talking_heads"] is True and attend["bias_offsets"] == (16 if "stride" in kwargs else 64)
    ups = [n for n in spec["nodes"] if n["op"] == "upsample"]
    assert [(n["scale"], n["mode"]) for n in ups] == ([([2, 2], "bilinear")] if "stride" in kwargs else [])
    keys = state_keys(spec)
    assert keys["attn.attend.talk1_weight"] == "attn.talking_head1.weight"
    assert keys["attn.attend.bias"] == "attn.attention_biases"


def test_attention2d_downsample_parity():
    from layer_nets import Attention2dDownsample
    spec = _parity(_One(Attention2dDownsample(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=8, out_dim=12),
                        out=12))
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert "talking_heads" not in attend and len(attend["bias_index"]) == 16 and len(attend["bias_index"][0]) == 64


def test_tiny_efficientformer_parity_and_its_rowless_tensors():
    spec = _parity(TinyEfficientFormerV2())
    assert sorted(rowless_tensors(spec)) == sorted(
        [f"attn.attend.{k}" for k in ("bias", "talk1_weight", "talk1_bias", "talk2_weight", "talk2_bias")] +
        ["down.attend.bias"])


def test_talking_heads_change_the_output_in_both_forms():
    """A spec that dropped the talking heads would still run: parity must see them (both mixes are read)."""
    module = randomised_with_biases(_One(FormerAttention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=8)))
    with torch.no_grad():
        module.attn.talking_head2.weight.mul_(3.0)
    check_parity(module, from_torch(module, (1, 8, 8)), (1, 8, 8))
    spec = from_torch(module, (1, 8, 8))
    for node in spec["nodes"]:
        node.pop("talking_heads", None)
    with pytest.raises(AssertionError):
        check_parity(module, validate(spec), (1, 8, 8))


def _attention_spec(**fields) -> dict:
    convs = [{"name": n, "op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1} for n in "qkv"]
    return {"name": "talk", "input_shape": [2, 4, 4], "output": "f", "nodes": [
        *convs, {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 0.5, **fields},
        {"name": "u", "op": "upsample", "inputs": ["a"], "scale": 2, "mode": "bilinear"},
        {"name": "p", "op": "gap", "inputs": ["u"]}, {"name": "f", "op": "flatten", "inputs": ["p"]}]}


def test_fields_validate_and_their_defaults_are_left_out_of_the_stored_form():
    spec = validate(_attention_spec(talking_heads=True))
    assert spec["nodes"][3]["talking_heads"] is True and spec["nodes"][4]["mode"] == "bilinear"
    plain = _attention_spec(talking_heads=False)
    del plain["nodes"][4]["mode"]  # nearest
    plain = validate(plain)
    stored = stored_form(plain)
    assert "talking_heads" not in stored["nodes"][3] and "mode" not in stored["nodes"][4]  # older readers read it
    assert validate(stored) == plain
    for bad, words in ((dict(talking_heads=True, kv_heads=1), "talking_heads needs kv_heads = heads"),
                       (dict(talking_heads=True, window=2), "talking_heads needs kv_heads = heads and no window"),
                       (dict(talking_heads="yes"), "talking_heads")):
        with pytest.raises(UsageError, match=words):
            validate(_attention_spec(**bad))
    wrong = _attention_spec()
    wrong["nodes"][4]["mode"] = "bicubic"
    with pytest.raises(UsageError, match="'nearest', 'bilinear' or 'tile'"):
        validate(wrong)


def _with(**parts) -> nn.Module:
    m = FormerAttention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=8, stride=2)
    for name, layer in parts.items():
        setattr(m, name, layer)
    return _One(m)


@pytest.mark.parametrize("module, words", [
    (lambda: _with(upsample=nn.Upsample(scale_factor=2, mode="nearest")), "upsample is Upsample"),
    (lambda: _with(talking_head1=nn.Conv2d(2, 2, 1, bias=False)), "talking_head1 is Conv2d"),
    (lambda: _with(v_local=nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16))), "v_local' has layers"),
])
def test_near_misses_are_refused_by_name(module, words):
    with pytest.raises(UsageError, match=words) as err:
        from_torch(module(), (1, 8, 8))
    assert "EfficientFormerV2 Attention2d at 'attn'" in str(err.value) and "test_efficientformer.py:" in str(err.value)


@pytest.mark.slow
def test_efficientformerv2_s0_at_64():
    _parity(timm.create_model("efficientformerv2_s0", img_size=64), (3, 64, 64))
