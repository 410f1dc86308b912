"""XCiT's layers through `from_torch` (`edgecl.arch.fx_xcit`): the tiny XCiT (position encoding, XCA, LPI) against
the module, torch and ONNX, with CaiT's class attention (timm's ClassAttentionBlock) or without, with learned temperatures and layer scales drawn at random; refusals by name; timm's
xcit_nano and xcit_tiny (p16) at 64, with and without class attention, against timm (slow)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, timm
from xcit_nets import TinyXCiT

from edgecl.arch import from_torch
from edgecl.arch.spec import node_shapes
from edgecl.errors import UsageError


def _randomise(module: nn.Module) -> nn.Module:
    """BatchNorm statistics, XCA temperatures and layer scales drawn at random (fresh ones are 1, which would hide
    a temperature or γ left out or applied to the wrong heads)."""
    torch.manual_seed(0)
    randomise_batchnorm(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("temperature") or ".gamma" in name:
                p.uniform_(0.5, 1.5)
    return module.eval()


@pytest.mark.parametrize("kwargs", [{}, {"heads": 4, "depth": 2, "class_layers": 2},
                                    {"heads": 1, "hidden": 4, "width": 8, "class_layers": 0},
                                    {"class_layers": 2, "tokens_norm": True}])
def test_tiny_xcit_parity(kwargs):
    module = _randomise(TinyXCiT(in_channels=3, **kwargs))
    spec = from_torch(module, (3, 8, 8))
    ops = [n["op"] for n in spec["nodes"]]
    assert ops.count("fourier_pos") == 1 and ops.count("channel_attention") == kwargs.get("depth", 1)
    assert ops.count("attention") == ops.count("class_token") * kwargs.get("class_layers", 1)
    grid = next(n for n in spec["nodes"] if n["op"] == "fourier_pos")
    assert (grid["hidden"], grid["temperature"]) == (kwargs.get("hidden", 8), 10000.0)
    assert [n["shape"] for n in spec["nodes"] if n["name"].endswith("local_mp.grid")][0] == \
        [kwargs.get("width", 16), 4, 4]  # LPI's tokens as their 4×4 grid
    check_parity(module, spec, (3, 8, 8))


def _edited(edit) -> nn.Module:
    module = TinyXCiT(in_channels=3)
    edit(module)
    return module.eval()


@pytest.mark.parametrize("make, words", [
    (lambda: _edited(lambda m: setattr(m.pos, "eps", 1e-3)), "PositionalEncodingFourier at 'pos'.*eps 1e-6"),
    (lambda: _edited(lambda m: setattr(m.blocks[0].local_mp, "conv1", nn.Conv2d(16, 16, 3, padding=1))),
     "LPI at 'blocks.0.local_mp'.*its conv1 is not a depthwise"),
    (lambda: _edited(lambda m: setattr(m.blocks[0].local_mp, "bn", nn.Identity())),
     "LPI at 'blocks.0.local_mp'.*its bn is a Identity"),
    (lambda: _edited(lambda m: setattr(m.blocks[0].attn, "attn_drop", nn.ReLU())),
     "XCA at 'blocks.0.attn'.*attn_drop is a ReLU"),
    (lambda: _edited(lambda m: setattr(m.cls_blocks[0].attn, "proj_drop", nn.ReLU())),
     "ClassAttn\\) at 'cls_blocks.0.attn'.*proj_drop"),
])
def test_what_edgecl_does_not_follow_is_refused_by_name(make, words):
    with pytest.raises(UsageError, match=words):
        from_torch(make(), (3, 8, 8))


def test_class_attention_queries_with_the_class_token_only():
    spec = from_torch(_randomise(TinyXCiT(in_channels=3)), (3, 8, 8))
    shapes = node_shapes(spec)
    attend = next(n for n in spec["nodes"] if n["op"] == "attention")
    assert [shapes[i] for i in attend["inputs"]] == [[16, 1, 1], [16, 17, 1], [16, 17, 1]]  # 16 patches + class
    assert attend["scale"] == pytest.approx(8 ** -0.5)


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes, kwargs", [("xcit_nano_12_p16_224", 368, {}), ("xcit_tiny_12_p16_224", 358, {}),
                                                 ("xcit_nano_12_p16_224", 311,
                                                  {"cls_attn_layers": 0, "global_pool": "avg"})])
def test_timm_xcit_at_64(name, nodes, kwargs):
    module = _randomise(timm.create_model(name, pretrained=False, img_size=64, **kwargs))
    spec = from_torch(module, (3, 64, 64))
    assert len(spec["nodes"]) == nodes
    check_parity(module, spec, (3, 64, 64), batch=2)
