"""GC ViT (timm's ``timm.models.gcvit``) through `from_torch`: its blocks kept whole — window attention with the
relative position bias, and in every other block the stage's global query (the FeatureBlock's map pooled to one
window) shared by every window, as an ``upsample`` of mode "tile" — against the module, torch form and ONNX; the
tile op on its own; the fields the spec records; other layers in its places refused by name; gcvit_xxtiny at 224
(slow) and 64."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from layer_nets_vit import tiny_gcvit
from torch_nets import assert_refused, check_parity, randomise_batchnorm, randomised_all

from edgecl.arch import from_torch, validate
from edgecl.arch.factories import build_module
from edgecl.errors import UsageError
from edgecl.graph.builder import build_onnx
from edgecl.train.models import forward, from_numpy


@pytest.mark.parametrize("kwargs,image", [({}, 32), ({}, 8), ({"window_ratio": (4, 8)}, 32),
                                           ({"window_ratio": (16, 16)}, 32), ({"layer_scale": 0.5}, 32),
                                           ({"window_ratio": (8, 16)}, 48)],
                         ids=["4x4_windows", "1x1_windows", "one_window", "2x2_windows", "layer_scale", "12px_map"])
def test_tiny_gcvit_parity(kwargs, image):
    """4×4 windows on the 8×8 map (four windows, each reading the 4×4 global query), 1×1 windows on a 2×2 map, one
    window as big as the map (no tile), 2×2 windows (sixteen), layer scales, a 12×12 map of 3×3 windows (the
    global query pooled from 12 to 6 to 3)."""
    module = randomised_all(tiny_gcvit(image=image, **kwargs))
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), (1, image, image))
    check_parity(module, spec, (1, image, image))


def test_global_query_is_tiled_and_windows_recorded():
    spec = from_torch(randomised_all(tiny_gcvit(image=32)), (1, 32, 32))
    nodes = {n["name"]: n for n in spec["nodes"]}
    local, glob = "stages.0.blocks.0.attn", "stages.0.blocks.1.attn"
    assert nodes[f"{local}.attend"]["inputs"] == [f"{local}.q", f"{local}.k", f"{local}.v"]
    assert nodes[f"{glob}.q_global"]["mode"] == "tile" and nodes[f"{glob}.q_global"]["scale"] == [2, 2]
    assert nodes[f"{glob}.attend"]["inputs"] == [f"{glob}.q_global", f"{glob}.k", f"{glob}.v"]
    for attn in (local, glob):
        assert nodes[f"{attn}.attend"]["window"] == [4, 4] and nodes[f"{attn}.attend"]["bias_table"] == "swin"
        assert nodes[f"{attn}.attend"]["module"] == f"{attn}.rel_pos"


def _tile_spec(scale, mode="tile") -> dict:
    return {"name": "tile", "input_shape": [2, 2, 3], "nodes": [
        {"name": "t", "op": "upsample", "inputs": ["input"], "scale": scale, "mode": mode},
        {"name": "f", "op": "flatten", "inputs": ["t"]}]}


def test_tile_repeats_the_whole_map_in_torch_and_onnx():
    """out[i] = in[i mod size] along each axis (torch's repeat, ONNX Tile), not every value repeated (nearest)."""
    spec = validate(_tile_spec([3, 2]))
    x = torch.randn(2, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    want = x.repeat(1, 1, 3, 2).flatten(1)
    rng = np.random.default_rng(0)
    params = {"head.weight": rng.standard_normal((4, want.shape[1])).astype(np.float32),
              "head.bias": rng.standard_normal(4).astype(np.float32)}
    with torch.no_grad():
        assert torch.equal(forward(spec, from_numpy(params), x, head=False), want)
    session = ort.InferenceSession(build_onnx(spec, params).SerializeToString(), providers=["CPUExecutionProvider"])
    logits = want.numpy() @ params["head.weight"].T + params["head.bias"]
    assert np.abs(session.run(None, {"x": x.numpy()})[0] - logits).max() < 1e-4


def test_tile_mode_is_validated():
    with pytest.raises(UsageError, match="'nearest', 'bilinear' or 'tile'"):
        validate(_tile_spec([2, 2], mode="repeat"))
    spec = _tile_spec([2, 2])
    spec["nodes"][0]["align_corners"] = True
    with pytest.raises(UsageError, match="align_corners needs mode 'bilinear'"):
        validate(spec)


def test_other_layers_in_gcvit_places_are_refused_by_name():
    shape = (1, 32, 32)
    module = tiny_gcvit(image=32)
    module.stages[0].blocks[1].attn.proj = nn.Sequential(nn.Linear(8, 8))
    assert_refused(module, "GlobalContextVitBlock", "stages.0.blocks.1", "Sequential", "nn.Linear", input_shape=shape)
    module = tiny_gcvit(image=32)
    module.stages[0].global_block = nn.MaxPool2d((1, 4))  # 8 × 2 positions: timm reads them as the 16 of a window
    assert_refused(module, "stages.0.blocks.1", "global query has shape [8, 2, 8]", "(4, 4, 8)", input_shape=shape)
    module = tiny_gcvit(image=32)
    module.stages[1].blocks[0].ls1 = nn.ReLU()
    assert_refused(module, "stages.1.blocks.0", "'stages.1.blocks.0.ls1' is a ReLU", input_shape=shape)
    module = tiny_gcvit(image=32)
    module.stages[0].blocks[0].drop_path1 = nn.ReLU()
    assert_refused(module, "stages.0.blocks.0", "drop_path1", input_shape=shape)


@pytest.mark.parametrize("size", [64, pytest.param(224, marks=pytest.mark.slow)])
def test_library_gcvit_xxtiny(size):
    torch.manual_seed(0)
    module = build_module("timm:gcvit_xxtiny", {"img_size": size}).eval()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, size, size))
    check_parity(module, spec, (3, size, size), batch=2)
