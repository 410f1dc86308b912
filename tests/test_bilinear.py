"""Bilinear upsampling from the user's torch model (`fx_calls.upsample`): ``nn.Upsample(mode='bilinear')``,
``nn.UpsamplingBilinear2d`` (align_corners=True) and ``F.interpolate(mode='bilinear', scale_factor= / size=,
align_corners=False / True)`` by integer factors become ``upsample`` nodes whose torch form and ONNX graph (ONNX
Runtime) equal the module, on odd and even maps; the ``align_corners`` field is left out of stored files at its
default; a constant channel stays constant through it; timm's MultiQueryAttention2d with query strides (average-pooled
query, bilinear up-sampling of the output) goes in; what edgecl cannot follow exactly is refused by name.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.arch import channel_map, from_torch, param_shapes, validate
from edgecl.arch.later_fields import stored_form
from edgecl.errors import UsageError
from edgecl.export.onnx_export import run_onnx
from edgecl.graph.builder import build_onnx
from edgecl.graph.compact import compact_task
from edgecl.graph.constants import channel_constants
from edgecl.train.models import forward, from_numpy
from neck_nets import fpn_spec
from test_attention2d import _Wrapped
from torch_nets import check_parity, classifier_of, randomise_batchnorm, tensors_of, timm


class _Up(nn.Module):
    """A 1×1 conv, then the upsampling under test (a module or a function of the map), then a 3×3 conv that mixes
    neighbouring positions (so every upsampled value reaches the logits), global pooling and a classifier."""

    def __init__(self, up, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 1)
        self.up = up if isinstance(up, nn.Module) else None
        self.fn = None if isinstance(up, nn.Module) else up
        self.mix = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        x = self.up(x) if self.up is not None else self.fn(x)
        return self.fc(self.mix(x).amax((2, 3)))  # the max, not the mean: a shifted sample would show


def _deviation(module: nn.Module, spec: dict, shape: tuple[int, ...]) -> tuple[float, float]:
    """Largest |spec's torch forward − module| and |ONNX Runtime − module| over a batch of 4."""
    module.eval()
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x).numpy()
        got = forward(spec, from_numpy(weights), x).numpy()
    session = ort.InferenceSession(build_onnx(spec, weights).SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"x": x.numpy()})[0]
    return float(np.abs(got - want).max()), float(np.abs(onnx_out - want).max())


FORMS = {
    "Upsample": lambda: nn.Upsample(scale_factor=2, mode="bilinear"),
    "Upsample_corners": lambda: nn.Upsample(scale_factor=(3, 2), mode="bilinear", align_corners=True),
    "UpsamplingBilinear2d": lambda: nn.UpsamplingBilinear2d(scale_factor=2),
    "UpsamplingBilinear2d_size": lambda: nn.UpsamplingBilinear2d(size=(14, 15)),  # on 7×5: ×2, ×3
    "interpolate_scale": lambda: (lambda x: F.interpolate(x, scale_factor=3, mode="bilinear", align_corners=False)),
    "interpolate_scale_corners": lambda: (lambda x: F.interpolate(x, scale_factor=(2, 3), mode="bilinear",
                                                                  align_corners=True)),
    "interpolate_size": lambda: (lambda x: F.interpolate(x, size=(21, 10), mode="bilinear")),
    "interpolate_size_corners": lambda: (lambda x: F.interpolate(x, size=(14, 20), mode="bilinear",
                                                                 align_corners=True)),
    "interpolate_recompute": lambda: (lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear",
                                                              recompute_scale_factor=True)),
    "interpolate_positional": lambda: (lambda x: F.interpolate(x, None, 2, "bilinear", True)),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_bilinear_form_equals_the_module_in_torch_and_onnx_runtime(form):
    module = _Up(FORMS[form]())
    spec = from_torch(module, (3, 7, 5))  # odd sides: the edge samples are clamped differently in each corner mode
    up = next(n for n in spec["nodes"] if n["op"] == "upsample")
    corners = "corners" in form or "Bilinear2d" in form or form == "interpolate_positional"
    assert up["mode"] == "bilinear" and up["align_corners"] is corners
    torch_dev, onnx_dev = _deviation(module, spec, (3, 7, 5))
    print(f"{form}: scale {up['scale']} align_corners {corners}: torch {torch_dev:.2e}, onnx {onnx_dev:.2e}")
    assert torch_dev <= 1e-5 and onnx_dev <= 1e-5


@pytest.mark.parametrize("corners", [False, True])
@pytest.mark.parametrize("size", [(1, 1), (2, 9), (6, 6)])
def test_bilinear_parity_on_small_and_odd_maps(corners, size):
    module = _Up(nn.Upsample(scale_factor=(2, 3), mode="bilinear", align_corners=corners))
    check_parity(module, from_torch(module, (3, *size)), (3, *size))


def test_align_corners_is_stored_only_when_true_and_needs_bilinear():
    base = {"name": "u", "input_shape": [2, 3, 3],
            "nodes": [{"name": "up", "op": "upsample", "inputs": ["input"], "scale": 2, "mode": "bilinear"},
                      {"name": "f", "op": "flatten", "inputs": ["up"]}]}
    plain = validate(base)
    assert plain["nodes"][0]["align_corners"] is False
    assert "align_corners" not in stored_form(plain)["nodes"][0]  # an older edgecl reads the file
    base["nodes"][0]["align_corners"] = True
    assert stored_form(validate(base))["nodes"][0]["align_corners"] is True
    base["nodes"][0]["mode"] = "nearest"
    with pytest.raises(UsageError, match="align_corners needs mode 'bilinear'"):
        validate(base)
    base["nodes"][0].update(mode="bilinear", align_corners="yes")
    with pytest.raises(UsageError, match="align_corners"):
        validate(base)


@pytest.mark.parametrize("corners", [False, True])
def test_a_constant_channel_stays_constant_through_bilinear_upsampling_and_is_folded(corners):
    """Channel 1 of r is 0.7 everywhere, channel 2 is ReLU(−1) = 0: both stay constant after the upsampling, which
    mixes only a channel's own values with weights summing to 1, so compaction folds the first into c1's bias and
    drops the second, and the compacted graph gives the same logits in ONNX Runtime."""
    spec = validate({"name": "c", "input_shape": [2, 3, 5], "nodes": [
        {"name": "c0", "op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1},
        {"name": "r", "op": "relu", "inputs": ["c0"]},
        {"name": "up", "op": "upsample", "inputs": ["r"], "scale": [2, 3], "mode": "bilinear",
         "align_corners": corners},
        {"name": "c1", "op": "conv", "inputs": ["up"], "in": 4, "out": 3, "k": 3},
        {"name": "gap", "op": "gap", "inputs": ["c1"]}, {"name": "flat", "op": "flatten", "inputs": ["gap"]}]})
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in param_shapes(spec).items()}
    params.update({"head.weight": rng.standard_normal((2, 3)).astype(np.float32),
                   "head.bias": rng.standard_normal(2).astype(np.float32)})
    params["c0.weight"][1:3] = 0
    params["c0.bias"][1:3] = [0.7, -1.0]
    values = channel_constants(spec, params, channel_map(spec))
    assert np.isnan(values["up"][[0, 3]]).all() and list(values["up"][1:3]) == [np.float32(0.7), 0.0]
    small, kept, report = compact_task(spec, params, channel_multiple=1)
    assert report.layers["c0"] == [4, 2] and report.folded_units == 1
    x = rng.standard_normal((5, 2, 3, 5)).astype(np.float32)
    dense, compacted = run_onnx(build_onnx(spec, params), x), run_onnx(build_onnx(small, kept), x)
    assert np.abs(dense - compacted).max() <= 1e-5 * max(1.0, np.abs(dense).max())


REFUSALS = {
    "antialias": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", antialias=True), "antialias=True"),
    "fraction": (lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"), "integer factors"),
    "near_integer": (lambda x: F.interpolate(x, scale_factor=2.0000001, mode="bilinear"), "scale_factor 2.0000001"),
    "size_not_multiple": (lambda x: F.interpolate(x, size=(10, 7), mode="bilinear"), "integer factors"),
    "bicubic": (lambda x: F.interpolate(x, scale_factor=1.5, mode="bicubic"), "bicubic by scale_factor 1.5"),
    "area": (lambda x: F.interpolate(x, scale_factor=2, mode="area"), "mode 'area'"),
    "module_fraction": (nn.Upsample(scale_factor=2.5, mode="bilinear"), "integer factors"),
    "nearest_near_integer": (nn.Upsample(scale_factor=2.0000001), "scale_factor 2.0000001"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_edgecl_cannot_follow_exactly_is_refused_by_name(case):
    up, message = REFUSALS[case]
    with pytest.raises(UsageError, match=message) as info:
        from_torch(_Up(up), (3, 7, 5))
    assert "test_bilinear.py" in str(info.value) or "at 'up'" in str(info.value) or "in up" in str(info.value)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(num_heads=2, query_strides=2), (3, 8, 8)),
    (dict(num_heads=3, key_dim=5, value_dim=4, query_strides=(2, 3), kv_stride=2, dim_out=10), (3, 6, 9)),
    (dict(num_heads=1, query_strides=2, padding="same"), (3, 6, 10)),  # timm's AvgPool2dSame: no pad here
])
def test_multi_query_attention_with_query_strides_equals_timm(kwargs, shape):
    """MobileNetV4's MultiQueryAttention2d with query_strides: the query average-pooled by them and BatchNorm'd,
    attention of the pooled positions over every key, the output bilinearly up-sampled back before its projection."""
    torch.manual_seed(0)
    module = _Wrapped(timm.layers.attention2d.MultiQueryAttention2d(12, **kwargs))
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), shape)
    ops = [n["op"] for n in spec["nodes"]]
    strides = list(module.attn.query_strides)
    pool = next(n for n in spec["nodes"] if n["name"] == "attn.query.down_pool")
    up = next(n for n in spec["nodes"] if n["op"] == "upsample")
    assert pool["op"] == "avgpool" and pool["k"] == strides and up["scale"] == strides and up["mode"] == "bilinear"
    assert ops.index("avgpool") < ops.index("attention") < ops.index("upsample")
    torch_dev, onnx_dev = _deviation(module, spec, shape)
    print(f"query_strides {strides} on {shape}: torch {torch_dev:.2e}, onnx {onnx_dev:.2e}")
    assert torch_dev <= 1e-5 and onnx_dev <= 1e-4


def _strided_with(edit) -> nn.Module:
    m = timm.layers.attention2d.MultiQueryAttention2d(12, num_heads=2, query_strides=2)
    edit(m)
    return _Wrapped(m)


@pytest.mark.parametrize("module, shape, words", [
    (lambda: _strided_with(lambda m: None), (3, 9, 8), r"query_strides \(2, 2\) on a 9×8 map"),
    (lambda: _strided_with(lambda m: setattr(m.query, "down_pool", nn.MaxPool2d(2))), (3, 8, 8),
     "query.down_pool is MaxPool2d"),
    (lambda: _strided_with(lambda m: setattr(m.query, "down_pool", nn.AvgPool2d(2, ceil_mode=True))), (3, 8, 8),
     "query.down_pool is AvgPool2d"),
    (lambda: _strided_with(lambda m: setattr(m.output, "upsample", nn.Upsample(scale_factor=2, mode="bilinear",
                                                                               align_corners=True))), (3, 8, 8),
     "output.upsample is Upsample"),
    (lambda: _strided_with(lambda m: delattr(m.query, "norm")), (3, 8, 8), r"query has layers \['down_pool', 'proj'\]"),
])
def test_query_strides_other_than_timms_are_refused_by_name(module, shape, words):
    with pytest.raises(UsageError, match=words) as err:
        from_torch(module(), shape)
    assert "'attn'" in str(err.value)


def test_the_channel_map_follows_each_channel_through_the_upsamplings_of_an_fpn_neck():
    """Every up-sampling keeps its input's channels (each channel alone), so the laterals and the up-sampled levels
    they are added to are one channel group: removing channel i removes it at every level."""
    spec = fpn_spec((3, 8, 8))
    ups = [n for n in spec["nodes"] if n["op"] == "upsample"]
    assert [(n["scale"], n["align_corners"]) for n in ups] == [([2, 2], False), ([4, 4], True), ([2, 2], True)]
    cm = channel_map(spec)
    assert {str(cm.spaces[n]) for n in ("lat1", "lat2", "lat3", *(u["name"] for u in ups))} == \
        {str(cm.spaces["lat3"])}
    assert cm.groups["lat3"] == 8
