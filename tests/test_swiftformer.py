"""SwiftFormer's efficient additive attention through `from_torch` (timm's EfficientAdditiveAttention, kept whole)
and the ``normalize`` op it brought (L2 over the channels or over the map, ``F.normalize``): parity of the spec's
torch forward and ONNX graph with the modules (norms and layer scales random), the bare ``w_g`` parameter as a
conv's weight (its state key), the op's validation, its ONNX = torch on zero vectors, its pinned channels, refusals
by name, and timm's swiftformer_s and swiftformer_xs at 64 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mobile_attention_nets import TinySwiftFormer
from torch import nn
from torch_nets import randomised_parity, spec_logits, timm

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.module_state import state_keys, to_module_state
from edgecl.errors import UsageError

from timm.models.swiftformer import SwiftFormer  # noqa: E402  (torch_nets set up the imports)


def test_tiny_swiftformer_parity_and_its_nodes():
    module = TinySwiftFormer()
    spec = randomised_parity(module, (1, 8, 8))
    norms = [(n["name"], n["over"]) for n in spec["nodes"] if n["op"] == "normalize"]
    assert norms == [("block.attn.to_query.normalize", "channels"), ("block.attn.to_key.normalize", "channels"),
                     ("block.attn.over_tokens", "map")]
    keys = state_keys(spec)
    assert keys["block.attn.w_g.weight"] == "block.attn.w_g"  # the bare parameter, stored (C, 1)
    state = to_module_state(spec, {"block.attn.w_g.weight": np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1)})
    assert state["block.attn.w_g"].shape == (8, 1)


def test_the_output_depends_on_w_g():
    """w_g's direction sets the weights of the tokens' sum: a spec that dropped it (or read another tensor) would
    not compute the module's output; with w_g turned, the spec's output moves."""
    from edgecl.arch.fx_import import tensors_of
    from edgecl.train.models import forward, from_numpy
    from torch_nets import classifier_of

    module = TinySwiftFormer()
    spec = randomised_parity(module, (1, 8, 8))
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    turned = dict(weights, **{"block.attn.w_g.weight": weights["block.attn.w_g.weight"][:, ::-1].copy()})
    with torch.no_grad():
        a, b = (forward(spec, from_numpy(w), x).numpy() for w in (weights, turned))
    assert np.abs(a - b).max() > 1e-3


def test_small_swiftformer_parity():
    """timm's SwiftFormer in small: stem, ConvEncoders, a Block ending each stage, downsamples, the distilled head
    pair averaged, at 32×32."""
    module = SwiftFormer(layers=[1, 2], embed_dims=[8, 16], downsamples=[False, True], num_classes=3)
    spec = randomised_parity(module, (3, 32, 32))
    assert sum(n["op"] == "normalize" for n in spec["nodes"]) == 6


def _norm_spec(over: str, shape=(3, 4, 4), **fields) -> dict:
    return {"name": "norm", "input_shape": list(shape), "output": "f", "nodes": [
        {"name": "c", "op": "conv", "inputs": ["input"], "in": shape[0], "out": 4, "k": 1},
        {"name": "n", "op": "normalize", "inputs": ["c"], "over": over, **fields},
        {"name": "f", "op": "flatten", "inputs": ["n"]}]}


@pytest.mark.parametrize("over", ["channels", "map"])
def test_normalize_onnx_equals_torch_with_zero_vectors(over):
    spec = validate(_norm_spec(over))
    weights = {"c.weight": np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32),
               "c.bias": np.zeros(4, np.float32), "head.weight": np.eye(64, dtype=np.float32),
               "head.bias": np.zeros(64, np.float32)}  # the logits are the normalised map
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x[1] = 0.0  # a zero sample: every vector 0, divided by eps, stays 0
    x[2, :, 0, 0] = 0.0  # one zero position
    got = spec_logits(spec, weights, x).reshape(3, 4, 4, 4)
    h = torch.nn.functional.conv2d(x, torch.from_numpy(weights["c.weight"])).numpy().astype(np.float64)
    norm = np.linalg.norm(h.reshape(3, -1), axis=1)[:, None, None, None] if over == "map" else \
        np.linalg.norm(h, axis=1, keepdims=True)
    want = h / np.maximum(norm, 1e-12)
    assert np.abs(got - want).max() < 1e-5 and not got[1].any()


def test_normalize_validation_and_channels():
    assert validate(_norm_spec("channels"))["nodes"][1]["eps"] == 1e-12
    for bad, words in ((dict(over="tokens"), "'channels' or 'map'"), (dict(eps=0), "eps"),
                       (dict(eps="x"), "eps")):
        with pytest.raises(UsageError, match=words):
            validate(_norm_spec(bad.pop("over", "channels"), **bad))
    flat = _norm_spec("map")
    flat["nodes"].insert(1, {"name": "p", "op": "flatten", "inputs": ["c"]})
    flat["nodes"][2]["inputs"] = ["p"]
    flat["nodes"][3]["inputs"] = ["n"]
    with pytest.raises(UsageError, match="normalize over the map needs a"):
        validate(flat)
    assert "c" in channel_map(validate(_norm_spec("channels"))).pinned  # every output reads every channel


def test_a_bare_parameter_key_needs_one_tensor():
    """A ``module`` ending in "=" is the one key of a node's one tensor: on a conv with a bias both would be stored
    under it, so validation refuses it, as it refuses "=" alone."""
    spec = _norm_spec("channels")
    spec["nodes"][0].update(module="c.w=", bias=False)
    assert validate(spec)["nodes"][0]["module"] == "c.w="
    for module, bias in (("c.w=", True), ("=", False)):
        spec["nodes"][0].update(module=module, bias=bias)
        with pytest.raises(UsageError, match="names one bare parameter"):
            validate(spec)


def test_refusals_name_the_layer():
    module = TinySwiftFormer()
    module.block.attn.proj = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(UsageError, match="EfficientAdditiveAttention at 'block.attn'.*proj is Sequential") as err:
        from_torch(module.eval(), (1, 8, 8))
    assert "swiftformer.py:" in str(err.value)  # the line of timm's Block that calls it


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swiftformer_xs", "swiftformer_s"])
def test_swiftformer_at_64(name):
    randomised_parity(timm.create_model(name, num_classes=10), (3, 64, 64))
