"""CrossViT (timm's ``timm.models.crossvit``) through `from_torch`: its input resampled bicubically to the second
branch's size (a ``bicubic`` node: torch's F.interpolate in training, two MatMuls by fixed matrices in ONNX), each
branch's class token attending to the other branch's tokens (CaiT's class attention, CrossAttention's wq/wk/wv), the
tokens' ranges ``x[:, 0:1, ...]`` and ``x[:, 1:, ...]``, and the two class heads averaged through
``torch.mean(torch.stack(…, dim=0), dim=0)`` (one head on both class tokens) — against the module in torch and
ONNX Runtime; bicubic resampling alone at several ratios; the refusals of what is not followed; the library's
crossvit_tiny_240 at 240 and 120 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layer_nets_vit import tiny_crossvit
from torch_nets import assert_refused, check_parity, crossvit_head, randomised_all, timm

from edgecl.arch import from_torch
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.module_state import to_module_state
from edgecl.arch.spec import validate
from edgecl.errors import UsageError
from edgecl.graph.onnx_spatial import bicubic_matrix


@pytest.mark.parametrize("kwargs", [{}, {"in_channels": 3}, {"img_scale": (1.0, 0.75), "image": 16},
                                    {"depth": ((1, 2, 0), (1, 1, 2))}],
                         ids=["8px", "rgb", "downscaled", "two-blocks"])
def test_tiny_crossvit_parity(kwargs):
    image, channels = kwargs.get("image", 8), kwargs.get("in_channels", 1)
    module = randomised_all(tiny_crossvit(**kwargs))
    spec = from_torch(module, (channels, image, image))
    check_parity(module, spec, (channels, image, image), head=crossvit_head(module))
    side = int(image * module.img_size_scaled[1][0] / image)
    assert [n["size"] for n in spec["nodes"] if n["op"] == "bicubic"] == [[side, side]]
    assert spec["feature_dim"] == 8 + 16
    attentions = sum(type(m).__name__ in ("Attention", "CrossAttention") for m in module.modules())
    assert sum(n["op"] == "attention" for n in spec["nodes"]) == attentions


def test_crossvit_tensors_round_trip():
    module = randomised_all(tiny_crossvit())
    spec = from_torch(module, (1, 8, 8))
    ours = tensors_of(module, spec)
    state = to_module_state(spec, ours)
    own = module.state_dict()
    for key, value in state.items():
        assert np.array_equal(np.asarray(value), own[key].numpy()), key
    assert {"cls_token_1", "pos_embed_1", "blocks.0.fusion.0.0.attn.wq.weight"} <= set(state)


class _Resample(nn.Module):
    """A conv, F.interpolate bicubic to `size`, a conv: the resampling inside a network."""

    def __init__(self, size, **kwargs):
        super().__init__()
        self.a, self.b, self.size, self.kwargs = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3), size, kwargs
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = F.interpolate(self.a(x), size=self.size, mode="bicubic", **self.kwargs)
        return self.fc(self.b(h).mean((2, 3)))


@pytest.mark.parametrize("side, size", [(9, (5, 13)), (7, (7, 3)), (6, (17, 6)), (12, (11, 11))])
def test_bicubic_resampling_parity(side, size):
    module = randomised_all(_Resample(size))
    spec = from_torch(module, (2, side, side))
    check_parity(module, spec, (2, side, side))
    assert [n["size"] for n in spec["nodes"] if n["op"] == "bicubic"] == [list(size)] * (list(size) != [side] * 2)


def test_bicubic_matrix_is_torchs_resampling():
    x = torch.randn(2, 3, 240, 31, generator=torch.Generator().manual_seed(1))
    want = F.interpolate(x, size=(224, 40), mode="bicubic", align_corners=False).numpy()
    got = bicubic_matrix(240, 224) @ x.numpy() @ bicubic_matrix(31, 40).T
    assert np.abs(got - want).max() < 1e-5
    assert np.allclose(bicubic_matrix(240, 224).sum(1), 1.0, atol=1e-6)  # a constant channel stays constant


class _Stacked(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.how = nn.Linear(4, 3), nn.Linear(4, 3), how

    def forward(self, x):
        x = x.flatten(1)
        if self.how == "dim1":
            return torch.stack([self.a(x), self.b(x)], dim=1).mean(1)
        return torch.stack([self.a(x), self.b(x)], dim=0).amax(0)


@pytest.mark.parametrize("module, words", [
    (_Resample((5, 5), align_corners=True), "align_corners=True"),
    (_Resample((5, 5), antialias=True), "antialias=True"),
    (_Stacked("dim1"), "torch.mean(torch.stack(xs, dim=0), dim=0)"),
    (_Stacked("amax"), "read by that mean alone")], ids=["corners", "antialias", "stack-dim1", "stack-amax"])
def test_what_is_not_followed_is_refused_by_name(module, words):
    assert_refused(module, words, "test_crossvit.py:", input_shape=(1, 2, 2) if isinstance(module, _Stacked)
                   else (2, 7, 7))


class _ByFactor(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.a, self.b, self.fc, self.factor = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 3), nn.Linear(3, 2), factor

    def forward(self, x):
        return self.fc(self.b(F.interpolate(self.a(x), scale_factor=self.factor, mode="bicubic")).mean((2, 3)))


def test_bicubic_by_a_factor_goes_in_where_torch_places_samples_by_the_sizes():
    assert_refused(_ByFactor(1.5), "bicubic by scale_factor 1.5", "test_crossvit.py:", input_shape=(2, 7, 7))
    for factor, side in ((2, 5), (3.0, 4), (0.5, 8), (1.5, 6)):  # 1/1.5 and 6/9 round alike in float32
        module = randomised_all(_ByFactor(factor))
        spec = from_torch(module, (2, side, side))
        check_parity(module, spec, (2, side, side))
        assert [n["size"] for n in spec["nodes"] if n["op"] == "bicubic"] == [[int(side * factor)] * 2]


@pytest.mark.parametrize("size, words", [([4097, 2], "sides at most 4096"), ([0, 3], "size"), ([2, 2, 2], "size"),
                                         ("x", "size")])
def test_a_bad_bicubic_node_is_refused(size, words):
    with pytest.raises(UsageError, match=words):
        validate({"name": "b", "input_shape": [1, 4, 4], "nodes": [
            {"name": "r", "op": "bicubic", "inputs": ["input"], "size": size},
            {"name": "f", "op": "flatten", "inputs": ["r"]}]})


@pytest.mark.slow
@pytest.mark.parametrize("side", [240, 120])
def test_crossvit_tiny_240_parity(side):
    module = randomised_all(timm.create_model("crossvit_tiny_240", pretrained=False, img_size=side))
    spec = from_torch(module, (3, side, side))
    check_parity(module, spec, (3, side, side), head=crossvit_head(module), batch=2)
    scaled = int(side * 224 / 240)
    assert [n["size"] for n in spec["nodes"] if n["op"] == "bicubic"] == [[scaled, scaled]]
