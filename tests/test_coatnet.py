"""CoAtNet's transformer blocks (timm's channels-first ``Attention2d`` in ``TransformerBlock2d``) through
`from_torch`: an ``attention`` over the whole map with its RelPosBias as the Swin-layout bias table; small
Attention2d variants (heads first or not, expanded first, without bias or relative positions) against the module,
refusals by name, and timm's CoAtNets (slow but coatnet_nano_rw_224 at 64)."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from byoa_nets import deep_parity
from torch_nets import check_parity, randomise_batchnorm, randomised_all, timm

from edgecl.arch import from_torch
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
                                    {"rel": None}])
def test_attention2d_parity(kwargs):
    """Random weights and bias table on a non-square map: heads first (each head's q, k, v side by side) or q, k, v
    blocks; 24 or 16 attention channels (expand_first: before or after the qkv projection)."""
    module = randomised_all(_CoAt(**kwargs))
    spec = from_torch(module, (3, 4, 6))
    attn = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert len(attn) == 1 and attn[0].get("bias_table") == (None if kwargs.get("rel", 1) is None else "swin")
    check_parity(module, spec, (3, 4, 6))


@pytest.mark.parametrize("make, words", [
    (lambda: _CoAt(rel=partial(RelPosMlp, hidden_dim=8)), "RelPosMlp"),
    (lambda: _with_hook(), "1 forward hook"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words) as info:
        from_torch(make().eval(), (3, 4, 6))
    assert "attn" in str(info.value)


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
