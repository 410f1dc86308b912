"""torchvision's Swin V2 (``ShiftedWindowAttentionV2``, ``PatchMergingV2``, its blocks traced) through `from_torch`:
parity with real modules (cpb_mlp, qkv bias — its k part too, which the forward zeroes — and logit scales
randomised, one past the clamp), q, k and v as rows of qkv with q's and v's biases rows of qkv.bias (``fused_bias``)
and k's none, trained values written back into the module (k's rows as zeros), the field's validation and stored
form, and the named models swin_v2_t/s/b at 256 (slow)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from torch_nets import check_parity, randomise_batchnorm, tensors_of
from swin_v2_nets import tiny_tv_swinv2
from write_back import trained_back_into

from edgecl.arch import from_torch, validate
from edgecl.arch.factories import ensure_torchvision_imports
from edgecl.arch.later_fields import stored_form
from edgecl.arch.module_state import to_module_state
from edgecl.errors import UsageError

ensure_torchvision_imports()
from torchvision.models import swin_transformer as tv  # noqa: E402


def _randomised(module: nn.Module) -> nn.Module:
    """Normal cpb_mlps and qkv biases (k's part too: the forward must ignore it), logit scales in 0…3 with one head's
    at 6 (exp(6) > 100: the clamp holds it), LayerNorms drawn at random."""
    randomise_batchnorm(module, 0)
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "cpb_mlp" in name or name.endswith("attn.qkv.bias"):
            nn.init.normal_(p)
        if name.endswith("logit_scale"):
            nn.init.uniform_(p, 0.0, 3.0)
            p.data.view(-1)[0] = 6.0
    return module.eval()


def _tiny(**kwargs) -> nn.Module:
    return _randomised(tiny_tv_swinv2(**kwargs))


@pytest.mark.parametrize("side, window", [(8, 2), (16, 2), (16, 4)])
def test_tiny_parity_and_what_each_attention_reads(side, window):
    module = _tiny(window=window)
    spec = from_torch(module, (3, side, side))
    check_parity(module, spec, (3, side, side), batch=2)
    nodes = {n["name"]: n for n in spec["nodes"]}
    q, k, v = (nodes[f"features.1.1.attn.{p}"] for p in "qkv")
    assert [(n["weight_rows"], n["bias"], n.get("fused_bias")) for n in (q, k, v)] == [
        ([0, 3], True, True), ([1, 3], False, None), ([2, 3], True, True)]
    attend = nodes["features.1.1.attn.attend"]
    assert (attend["cosine"], attend["bias_mlp_form"], attend["bias_mlp_span"], attend["bias_mlp"]) == \
        (True, "swin_v2", [window, window], 512)
    assert attend["shift"] == ([0, 0] if side // 2 <= window else [window // 2] * 2)
    assert nodes["features.2.reduction"]["inputs"] == ["features.2.merge"]  # the norm after the reduction
    weights = tensors_of(module, spec)
    bias = module.features[1][1].attn.qkv.bias.detach().numpy()
    assert np.array_equal(weights["features.1.1.attn.v.bias"], bias[16:])
    state = to_module_state(spec, weights)  # k's rows go back as the zeros the forward uses
    assert np.array_equal(state["features.1.1.attn.qkv.bias"], np.concatenate([bias[:8], np.zeros(8), bias[16:]]))
    assert np.array_equal(state["features.1.1.attn.cpb_mlp.0.weight"],
                          module.features[1][1].attn.cpb_mlp[0].weight.detach().numpy())


def test_trained_values_go_back_into_the_module(tmp_path):
    trained_back_into(lambda n: _tiny(classes=n, in_chans=1), "head", ("attend.mlp", "logit_scale", "attn.q."),
                      tmp_path)


def test_fused_bias_is_checked_and_left_out_of_older_forms():
    """A bad fused_bias is refused by name; the stored form keeps it where true and a spec without it (Swin V1's
    q, k, v: one packed qkv conv) is stored as before the field existed."""
    spec = from_torch(_tiny(), (3, 8, 8))
    stored = {n["name"]: n for n in stored_form(spec)["nodes"]}
    assert stored["features.1.0.attn.q"]["fused_bias"] is True and "fused_bias" not in stored["features.1.0.attn.k"]
    assert validate(stored_form(spec)) == validate(spec)
    v1 = tv.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                            num_classes=5)
    assert all("fused_bias" not in n for n in stored_form(from_torch(v1.eval(), (3, 8, 8)))["nodes"])

    def changed(name: str, **fields) -> dict:
        hostile = copy.deepcopy(spec)
        node = next(n for n in hostile["nodes"] if n["name"] == name)
        node.update(fields)
        for key in [key for key, value in node.items() if value is None]:
            del node[key]
        return hostile

    for name, fields, words in [
            ("features.1.0.attn.q", {"fused_bias": 1}, "fused_bias"),
            ("features.1.0.attn.q", {"fused_bias": False}, "bias_parts or fused_bias"),
            ("features.1.0.attn.q", {"bias_parts": ["q_bias"]}, "bias_parts or fused_bias|without bias_parts"),
            ("features.1.0.attn.q", {"weight_rows": None, "module": None}, "needs weight_rows"),
            ("features.1.0.attn.k", {"fused_bias": True}, "needs weight_rows and a bias"),
            ("features.1.0.attn.k", {"weight_rows": [0, 3]}, "one weight cannot be two"),
            ("features.1.0.attn.proj", {"fused_bias": True}, "needs weight_rows")]:
        with pytest.raises(UsageError, match=words):
            validate(changed(name, **fields))


@pytest.mark.slow
@pytest.mark.parametrize("name, blocks", [("swin_v2_t", 12), ("swin_v2_s", 24), ("swin_v2_b", 24)])
def test_named_models_at_256(name, blocks):
    """The named models at 256 (maps 64, 32, 16, 8: their 8×8 windows tile each; the last stage's unshifted; at 128
    the last map is 4×4, which torchvision pads: refused)."""
    torch.manual_seed(0)
    module = _randomised(getattr(tv, name)(num_classes=10))
    spec = from_torch(module, (3, 256, 256))
    check_parity(module, spec, (3, 256, 256), batch=1)
    assert sum(n["op"] == "attention" and n["cosine"] for n in spec["nodes"]) == blocks
    own, back = module.state_dict(), to_module_state(spec, tensors_of(module, spec))
    assert {k.rpartition(".")[0] for k in set(dict(module.named_parameters())) - set(back)} == {"head"}
    for key, value in back.items():
        want = own[key].numpy()
        if key.endswith("attn.qkv.bias"):  # k's part: the zeros the forward uses in place of the stored values
            want = want.copy()
            want[len(want) // 3: 2 * len(want) // 3] = 0
        assert np.array_equal(value, want), key


def test_an_untiled_map_is_refused_by_name():
    """torchvision keeps a window larger than the map and pads the map with zeros that join the attention: 4×4
    windows on the second stage's 2×2 map are refused naming the layer."""
    from torch_nets import assert_refused

    assert_refused(_tiny(window=4), "Swin V2 ShiftedWindowAttentionV2", "features.3.0.attn", "do not tile",
                   input_shape=(3, 8, 8))
