"""CoAtNet's transformer blocks (timm's channels-first ``Attention2d`` in ``TransformerBlock2d``) through
`from_torch`: an ``attention`` over the whole map with its RelPosBias as the Swin-layout bias table, or its RelPosMlp
as an MLP-generated table (``bias_table`` "mlp"; MaxViT's rmlp windows too); small Attention2d variants (heads first
or not, expanded first, without bias or relative positions) against the module, the MLP table's fields, refusals by
name, and timm's CoAtNets and rmlp MaxViTs (slow but coatnet_nano_rw_224 and coatnet_rmlp_nano_rw_224 at 64)."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from byoa_nets import deep_parity
from torch_nets import check_parity, randomise_batchnorm, randomised_all, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.module_state import state_keys
from edgecl.arch.spec import rowless_tensors
from edgecl.errors import UsageError
from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp  # noqa: E402 (torch_nets set timm's imports up)
from timm.models.maxxvit import Attention2d  # noqa: E402


class _CoAt(nn.Module):
    """A conv stem and one Attention2d over the (height × width) map, pooled into a Linear."""

    def __init__(self, side=(4, 6), rel=RelPosBias, **kwargs):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = Attention2d(16, 24, dim_head=4, rel_pos_cls=partial(rel, window_size=side) if rel else None,
                                **kwargs)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kwargs", [{}, {"head_first": False}, {"expand_first": False}, {"bias": False},
                                    {"rel": None}, {"rel": partial(RelPosMlp, hidden_dim=8)},
                                    {"rel": partial(RelPosMlp, hidden_dim=8), "head_first": False},
                                    {"rel": partial(RelPosMlp, hidden_dim=8, mode="swin")}])  # 'rel_pos_swin'
def test_attention2d_parity(kwargs):
    """Random weights and bias table on a non-square map: heads first (each head's q, k, v side by side) or q, k, v
    blocks; 24 or 16 attention channels (expand_first: before or after the qkv projection)."""
    module = randomised_all(_CoAt(**kwargs))
    spec = from_torch(module, (3, 4, 6))
    attn = [n for n in spec["nodes"] if n["op"] == "attention"]
    table = None if kwargs.get("rel", 1) is None else "mlp" if kwargs.get("rel") else "swin"
    assert len(attn) == 1 and attn[0].get("bias_table") == table
    check_parity(module, spec, (3, 4, 6))


@pytest.mark.parametrize("make, words", [
    # mode 'swin' goes in (above); with another gain than its 16 it is not what the spec computes
    (lambda: _edited_rel(_CoAt(rel=partial(RelPosMlp, hidden_dim=8, mode="swin")), bias_gain=8),
     "its RelPosMlp \\(mode 'swin'"),
    (lambda: _with_hook(), "1 forward hook"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make().eval(), (3, 4, 6))
    assert "attn" in str(info.value)


def _edited_rel(module: nn.Module, **attributes) -> nn.Module:
    for name, value in attributes.items():
        setattr(module.attn.rel_pos, name, value)
    return module


def _with_hook() -> nn.Module:
    module = _CoAt()
    module.attn.rel_pos.register_forward_hook(lambda mod, i, o: 2 * o)
    return module


class _Shared(nn.Module):
    """An Attention2d given a shared relative position bias (MaxxVit's stage-level one)."""

    def __init__(self):
        super().__init__()
        self.attn = Attention2d(8, 8, dim_head=4)
        self.bias = nn.Parameter(torch.zeros(2, 16, 16))

    def forward(self, x):
        return self.attn(x, shared_rel_pos=self.bias).mean((2, 3))


def test_a_shared_bias_is_refused():
    with pytest.raises(UsageError, match="without a shared relative position bias"):
        from_torch(_Shared().eval(), (8, 4, 4))


def test_timm_coatnet_nano_at_64():
    torch.manual_seed(0)
    module = timm.create_model("coatnet_nano_rw_224", pretrained=False, img_size=64).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    attn = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert len(attn) == 9 and {len(n["bias_index"]) for n in attn} == {16, 4}  # 6 on 4×4, 3 on 2×2 maps
    check_parity(module, spec, (3, 64, 64), batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, side", [("coatnet_nano_rw_224", 224), ("coatnet_0_rw_224", 64),
                                        ("coatnet_0_224", 64), ("coatnet_bn_0_rw_224", 64),
                                        ("coatnet_nano_cc_224", 64), ("coatnet_pico_rw_224", 64),
                                        ("coatnext_nano_rw_224", 64)])
def test_timm_coatnets(name, side):
    deep_parity(timm.create_model(name, pretrained=False, img_size=side), side)


def _mlp_spec(**fields) -> dict:
    """One map's attention with an MLP-generated bias over its 3 × 4 positions (offsets 5 × 7)."""
    index = [[(i // 4 - j // 4 + 2) * 7 + (i % 4 - j % 4 + 3) for j in range(12)] for i in range(12)]
    nodes = [{"name": n, "op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1} for n in "qkv"]
    nodes += [{"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 0.5,
               "bias_offsets": 35, "bias_index": index, "bias_table": "mlp", "bias_mlp": 6, "module": "b.rel_pos",
               **fields}, {"name": "f", "op": "flatten", "inputs": ["a"]}]
    return {"name": "x", "input_shape": [2, 3, 4], "output": "f", "nodes": nodes}


def test_mlp_bias_fields_and_state():
    spec = validate(_mlp_spec())
    assert rowless_tensors(spec) == ["a.mlp1_weight", "a.mlp1_bias", "a.mlp2_weight", "a.mlp2_bias"]
    assert state_keys(spec)["a.mlp2_weight"] == "b.rel_pos.mlp.fc2.weight"
    for fields, words in [({"bias_mlp": None}, "go together"), ({"bias_table": "swin"}, "go together"),
                          ({"bias_offsets": 34, "bias_index": [[0] * 12] * 12}, "spans the offsets"),
                          ({"bias_rows": [0, 2]}, "LeViT's"), ({"bias_mlp": 0}, "bias_mlp = 0")]:
        wrong = _mlp_spec(**{k: v for k, v in fields.items() if v is not None})
        for key in [k for k, v in fields.items() if v is None]:
            del wrong["nodes"][3][key]
        with pytest.raises(UsageError, match=words):
            validate(wrong)


def test_timm_coatnet_rmlp_nano_at_64():
    torch.manual_seed(0)
    module = timm.create_model("coatnet_rmlp_nano_rw_224", pretrained=False, img_size=64).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 64, 64))
    assert {n.get("bias_table") for n in spec["nodes"] if n["op"] == "attention"} == {"mlp"}
    check_parity(module, spec, (3, 64, 64), batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, side", [("coatnet_rmlp_0_rw_224", 64), ("coatnet_rmlp_1_rw2_224", 64),
                                        ("maxvit_rmlp_pico_rw_256", 64), ("maxvit_rmlp_nano_rw_256", 64),
                                        ("maxvit_rmlp_tiny_rw_256", 64)])
def test_timm_rmlp_networks(name, side):
    deep_parity(timm.create_model(name, pretrained=False, img_size=side), side)
