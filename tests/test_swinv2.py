"""timm's Swin Transformer V2 through `from_torch`: parity of the spec's torch forward and ONNX graph with real
SwinTransformerV2 modules (their continuous position bias MLP, q/v biases and logit scales randomised: timm starts
the biases at 0 and every logit scale alike), what each attention reads (scaled cosine attention, the logit scale's
clamp, the position-bias MLP as the module's weights, q, k and v of the qkv's rows with the q and v biases),
post-norm blocks and merging, odd maps, the ``cosine`` and ``bias_mlp_form`` fields' validation, starting weights
from the module and its state-dict file, trained values written back into the module (V2 and V2-CR), specs of the
earlier table form (tests/data), refusals by name, and the named models (slow)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from random_weights import random_params
from torch_nets import check_parity, classifier_of, randomise_batchnorm, spec_logits, tensors_of, timm

from edgecl.arch import from_torch, validate
from edgecl.arch.later_fields import stored_form
from edgecl.arch.mlp_bias import offset_index
from edgecl.arch.module_state import state_keys
from edgecl.arch.spec import param_shapes, rowless_tensors
from edgecl.errors import UsageError
from edgecl.train.initial import starting_weights
from edgecl.train.models import forward, from_numpy
from edgecl.train.rel_logits import mlp_bias_table

V2 = timm.models.swin_transformer_v2


def _randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """Normal position-bias MLPs, q and v biases and logit scales (one head's above the clamp at ln 100), so a
    wrong table, bias or scale moves the logits well past rounding; and LayerNorms drawn at random (timm starts a
    block's post-norms at weight 0: its attention and MLP would add nothing to check)."""
    randomise_batchnorm(module, seed)
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if "cpb_mlp" in name or "meta_mlp" in name or name.endswith(("q_bias", "v_bias")):
            nn.init.normal_(p)
        if name.endswith("logit_scale"):
            nn.init.uniform_(p, 0.0, 3.0)
            p.data.view(-1)[0] = 6.0  # exp(6) > 100: the clamp holds it at 100
    return module.eval()


def _swinv2(img: int = 32, window: int = 4, **kwargs) -> nn.Module:  # 16×16 then 8×8 maps, shifted every second
    return _randomised(V2.SwinTransformerV2(img_size=img, patch_size=2, embed_dim=16, depths=(2, 2),
                                            num_heads=(2, 4), window_size=window, num_classes=5, **kwargs))


def test_swinv2_parity_and_what_each_attention_reads():
    module = _swinv2()
    spec = from_torch(module, (3, 32, 32))
    check_parity(module, spec, (3, 32, 32), batch=2)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["window"], n["shift"], n["bias_offsets"], n["cosine"], n["scale"]) for n in attends] == [
        ([4, 4], [0, 0], 49, True, 1.0), ([4, 4], [2, 2], 49, True, 1.0), ([4, 4], [0, 0], 49, True, 1.0),
        ([4, 4], [2, 2], 49, True, 1.0)]
    first, attn = attends[0]["name"], module.layers[0].blocks[0].attn
    assert [attends[0][k] for k in ("bias_table", "bias_mlp", "bias_mlp_form", "bias_mlp_span")] == \
        ["mlp", 512, "swin_v2", [4, 4]]
    assert np.array_equal(attends[0]["bias_index"], attn.relative_position_index.numpy())
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    assert param_shapes(spec)[f"{first}.logit_scale"] == (2,)
    assert np.array_equal(weights[f"{first}.logit_scale"], attn.logit_scale.detach().numpy().reshape(2))
    # the MLP is the module's own weights under its keys (fc2 without bias); the table it makes is timm's
    keys = state_keys(spec)
    assert [keys.get(f"{first}.{t}") for t in ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias")] == [
        f"layers.0.blocks.0.attn.cpb_mlp.{k}" for k in ("0.weight", "0.bias", "2.weight")] + [None]
    with torch.no_grad():
        table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, 2))
        ours = mlp_bias_table(attends[0], from_numpy(weights), [0, 16, 16])
    assert np.abs(ours.numpy() - table.numpy().T).max() < 1e-5
    # q, k and v: the qkv's rows, q's and v's biases the module's q_bias and v_bias, k's none (its zero buffer)
    names = {n["name"]: n for n in spec["nodes"]}
    qkv = [names[f"layers.0.blocks.0.attn.{part}"] for part in "qkv"]
    assert [(n["weight_rows"], n.get("bias_parts"), n["bias"]) for n in qkv] == [
        ([0, 3], ["q_bias"], True), ([1, 3], None, False), ([2, 3], ["v_bias"], True)]
    assert np.array_equal(weights["layers.0.blocks.0.attn.q.bias"], attn.q_bias.detach().numpy())
    assert np.array_equal(weights["layers.0.blocks.0.attn.v.bias"], attn.v_bias.detach().numpy())
    assert set(rowless_tensors(spec)) == {f"{n['name']}.{t}" for n in attends for t in (
        "mlp1_weight", "mlp1_bias", "mlp2_weight", "logit_scale")}
    # post-norm: each block's norms read its attention's and MLP's outputs, the merging's norm its reduction
    assert names["layers.0.blocks.0.norm1"]["inputs"] == ["layers.0.blocks.0.attn.proj"]
    assert names["layers.0.blocks.0.norm2"]["inputs"] == ["layers.0.blocks.0.mlp.fc2"]
    assert names["layers.1.downsample.norm"]["inputs"] == ["layers.1.downsample.reduction"]
    # the cosine normalisation, the logit scale and the bias are read by both forms: without each the logits move
    weights["head.weight"] = np.random.default_rng(0).standard_normal(weights["head.weight"].shape,
                                                                      np.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = spec_logits(spec, weights, x)
    dot = copy.deepcopy(spec)
    for node in dot["nodes"]:
        node.pop("cosine", None)
    dot_weights = {k: v for k, v in weights.items() if not k.endswith("logit_scale")}
    scaled = {k: v * 0.5 if k.endswith("logit_scale") else v for k, v in weights.items()}
    other_bias = {k: -v if k.endswith("mlp2_weight") else v for k, v in weights.items()}  # 16 − its table
    for other, changed in ((validate(dot), dot_weights), (spec, scaled), (spec, other_bias)):
        assert np.abs(spec_logits(other, changed, x) - want).max() > 1e-2


def test_the_logit_scale_is_clamped_at_ln_100_in_both_forms():
    module = _swinv2()
    spec = from_torch(module, (3, 32, 32))
    weights = {**tensors_of(module, spec), **classifier_of(module)}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = spec_logits(spec, weights, x)  # every attention's head 0 at 6 > ln 100
    higher = {k: v + np.float32(10) * (np.arange(len(v)) == 0) if k.endswith("logit_scale") else v
              for k, v in weights.items()}
    assert np.abs(spec_logits(spec, higher, x) - want).max() < 1e-5
    at_clamp = {k: np.where(np.arange(len(v)) == 0, np.float32(math.log(100.0)), v) if k.endswith("logit_scale")
                else v for k, v in weights.items()}
    assert np.abs(spec_logits(spec, at_clamp, x) - want).max() < 1e-5


@pytest.mark.parametrize("img, window, kwargs", [
    (10, 5, {}),  # an odd 5×5 map: merging pads it to 6×6, to a 3×3 map, the windows of 5 clamped to 3
    (32, 4, {"qkv_bias": False}),  # no q and v biases: a qkv conv without bias
    (32, 4, {"pretrained_window_sizes": (8, 8)}),  # coordinates normalised by another window than its own
    (32, 8, {}),  # a window of the whole 8×8 map at stage two: no shift there
])
def test_swinv2_variants(img, window, kwargs):
    module = _swinv2(img, window, **kwargs)
    spec = from_torch(module, (3, img, img))
    check_parity(module, spec, (3, img, img), batch=2)
    convs = {n["name"].rpartition(".")[2]: n for n in spec["nodes"] if n["name"].startswith("layers.0.blocks.0.attn.")}
    if kwargs.get("qkv_bias", True):  # q, k, v of the qkv's rows; k without bias
        assert "qkv" not in convs and [convs[p]["bias"] for p in "qkv"] == [True, False, True]
    else:  # one packed qkv conv without bias, sliced
        assert convs["qkv"]["bias"] is False and convs["q"]["op"] == "slice"
    span = [8, 8] if "pretrained_window_sizes" in kwargs else [min(window, img // 2)] * 2
    assert next(n for n in spec["nodes"] if n["op"] == "attention")["bias_mlp_span"] == span
    assert [n["pads"] for n in spec["nodes"] if n["op"] == "pad"] == ([[0, 0, 1, 1]] if img == 10 else [])


def test_an_untiled_map_is_refused():
    """A window clamped by timm's always_partition off... and kept by it on: a 12×12 map in windows of 8 pads with
    zeros that join the attention (refused, as Swin V1's)."""
    module = _swinv2(24, 8, always_partition=True)
    with pytest.raises(UsageError, match=r"8×8 windows do not tile the 12×12 map"):
        from_torch(module, (3, 24, 24))


def test_cosine_field_validates_and_is_stored_only_when_set():
    module = _swinv2()
    spec = from_torch(module, (3, 32, 32))
    node = next(n for n in spec["nodes"] if n["op"] == "attention")
    for bad, words in (({"cosine": "yes"}, "cosine"), ({"cosine": 1}, "cosine"),
                       ({"kv_heads": 1}, "cosine .*needs kv_heads = heads")):
        hostile = copy.deepcopy(spec)
        next(n for n in hostile["nodes"] if n["name"] == node["name"]).update(bad)
        with pytest.raises(UsageError, match=words):
            validate(hostile)
    plain = copy.deepcopy(spec)
    for n in plain["nodes"]:
        if n["op"] == "attention":
            n["cosine"] = False
    assert all("cosine" not in n for n in stored_form(validate(plain))["nodes"])  # as before the field
    assert all(n["cosine"] is True for n in stored_form(spec)["nodes"] if n["op"] == "attention")


def test_starting_weights_from_the_module_and_from_its_state_dict_file(tmp_path):
    """``--init-weights module`` and a file of the module's state dict give the same start: every tensor the spec
    holds is one the module holds (the MLP's weights, q_bias and v_bias), none it computes."""
    module = _swinv2()
    spec = from_torch(module, (3, 32, 32))
    start = starting_weights(module, spec)
    want = tensors_of(module, spec)
    assert set(start.values) == set(want) and all(np.array_equal(start.values[k], want[k]) for k in want)
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in module.state_dict().items()})
    assert starting_weights(str(tmp_path / "w.npz"), spec).sha256 == start.sha256


def test_the_spec_trains_as_the_module():
    """The gradients of the module's own parameters through the spec's torch forward are the module's (cosine
    attention, the logit scale's exp, the position-bias MLP, post-norms), and the spec's q and v biases get
    q_bias's and v_bias's gradients."""
    module = _swinv2()
    spec = from_torch(module, (3, 32, 32))
    params = {k: torch.tensor(v, requires_grad=True) for k, v in {**tensors_of(module, spec),
                                                                  **classifier_of(module)}.items()}
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 4])
    nn.functional.cross_entropy(forward(spec, params, x), y).backward()
    nn.functional.cross_entropy(module(x), y).backward()
    own, keys = dict(module.named_parameters()), state_keys(spec)
    shared = {name: keys[name] for name in keys if keys[name] in own}  # the spec's name → the module's
    assert len(shared) > 40 and shared["layers.0.blocks.0.attn.attend.logit_scale"].endswith("attn.logit_scale")
    assert shared["layers.0.blocks.0.attn.attend.mlp1_weight"] == "layers.0.blocks.0.attn.cpb_mlp.0.weight"
    rows = {n["name"] for n in spec["nodes"] if n.get("weight_rows")}  # q, k, v: their rows of qkv.weight
    for name, key in shared.items():
        layer = name.rpartition(".")[0]
        got = torch.cat([params[f"{layer[:-1]}{p}.weight"].grad for p in "qkv"]) if layer in rows else \
            params[name].grad
        want = own[key].grad.reshape(-1)
        assert (got.reshape(-1) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), key
    for part in "qv":
        want = own[f"layers.0.blocks.0.attn.{part}_bias"].grad
        assert torch.allclose(params[f"layers.0.blocks.0.attn.{part}.bias"].grad, want, atol=1e-6)


CR = timm.models.swin_transformer_v2_cr


@pytest.mark.parametrize("kwargs", [{}, {"extra_norm_stage": True}, {"extra_norm_period": 1}])
def test_swinv2_cr_parity_and_its_position_bias(kwargs):
    """timm's V2-CR: a plain qkv Linear, a (heads,) logit scale, the bias its meta MLP gives every pair of a window's
    positions (the MLP of the window's offsets read at Swin's index), the merging's norm before its reduction (Swin
    V1's), and its extra main-branch norms."""
    module = _randomised(CR.SwinTransformerV2Cr(img_size=(32, 32), patch_size=2, window_size=4, embed_dim=16,
                                                depths=(2, 2), num_heads=(2, 4), num_classes=5, **kwargs))
    spec = from_torch(module, (3, 32, 32))
    check_parity(module, spec, (3, 32, 32), batch=2)
    attends = [n for n in spec["nodes"] if n["op"] == "attention"]
    assert [(n["window"], n["shift"], n["bias_offsets"], n["cosine"], n["bias_mlp_form"]) for n in attends] == [
        ([4, 4], [0, 0], 49, True, "swin_v2_cr"), ([4, 4], [2, 2], 49, True, "swin_v2_cr")] * 2
    assert attends[0]["bias_index"] == offset_index(4, 4).tolist() and "bias_mlp_span" not in attends[0]
    attn, first = module.stages[0].blocks[0].attn, attends[0]["name"]
    weights = tensors_of(module, spec)
    assert state_keys(spec)[f"{first}.mlp2_bias"] == "stages.0.blocks.0.attn.meta_mlp.fc2.bias"
    with torch.no_grad():  # the module's bias of pair (t, s) is the offsets' table at row index[t, s]
        table = attn.meta_mlp(attn.relative_coordinates_log)
        ours = mlp_bias_table(attends[0], from_numpy(weights), [0, 16, 16])[:, offset_index(4, 4).reshape(-1)]
    assert np.abs(ours.numpy() - table.numpy().T).max() < 1e-5
    assert np.array_equal(weights[f"{first}.logit_scale"], attn.logit_scale.detach().numpy())
    names = {n["name"]: n for n in spec["nodes"]}
    assert names["stages.1.downsample.reduction"]["inputs"] == ["stages.1.downsample.norm"]
    norms3 = sorted(n for n in names if n.endswith("norm3"))
    assert norms3 == {"extra_norm_stage": ["stages.0.blocks.1.norm3", "stages.1.blocks.1.norm3"],
                      "extra_norm_period": [f"stages.{i}.blocks.{j}.norm3" for i in (0, 1) for j in (0, 1)]
                      }.get(next(iter(kwargs), ""), ["stages.1.blocks.1.norm3"])  # the final norm, by default


def test_swinv2_cr_sequential_attention_is_refused():
    module = _randomised(CR.SwinTransformerV2Cr(img_size=(32, 32), patch_size=2, window_size=4, embed_dim=16,
                                                depths=(2, 2), num_heads=(2, 4), num_classes=5, sequential_attn=True))
    with pytest.raises(UsageError, match="stages.0.blocks.0.*sequential"):
        from_torch(module, (3, 32, 32))


@pytest.mark.slow
def test_swinv2_cr_tiny_224_at_64():
    """The named V2-CR model at 64×64 (its windows follow the image: 2×2 at every stage)."""
    module = _randomised(timm.create_model("swinv2_cr_tiny_224", pretrained=False, img_size=64))
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    assert sum(n["op"] == "attention" and n["cosine"] for n in spec["nodes"]) == 12
    _round_trips(module, spec)


def _round_trips(module: nn.Module, spec: dict) -> None:
    """The spec's tensors read from the module and written back (`to_module_state`) are the module's, key for key,
    and every parameter but the classifier is one of them."""
    from edgecl.arch.module_state import to_module_state

    own = module.state_dict()
    back = to_module_state(spec, tensors_of(module, spec))
    assert all(np.array_equal(v, own[k].numpy()) for k, v in back.items())
    assert {k.rpartition(".")[0] for k in set(dict(module.named_parameters())) - set(back)} == {"head.fc"}


@pytest.mark.slow
def test_swinv2_tiny_window8_256_at_64():
    """The named model at 64×64 (maps 16, 8, 4, 2: windows 8, then clamped to 8, 4 and 2; shifts where they fit)."""
    module = _randomised(timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64))
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    assert sum(n["op"] == "attention" and n["cosine"] for n in spec["nodes"]) == 12
    _round_trips(module, spec)


class _Pads(nn.Module):
    """Swin V2's pad to a window multiple the map already is: F.pad of zeros only, on a channels-first map (four),
    a channels-last one (six, as timm's `_attn`) and with a value; `pad` pads (1, 0, …) instead."""

    def __init__(self, pad: int = 0):
        super().__init__()
        self.conv, self.linear, self.fc, self.pad = nn.Conv2d(3, 4, 1), nn.Linear(4, 4), nn.Linear(4, 2), pad

    def forward(self, x):
        x = self.conv(x)
        h = x.shape[2] % 4  # 0 at 8×8
        x = nn.functional.pad(x, (0, h, 0, h))
        y = self.linear(x.permute(0, 2, 3, 1))
        y = nn.functional.pad(y, (0, 0, 0, h, 0, h + self.pad))
        return self.fc(nn.functional.pad(y, (0, 0, 0, 0, 0, 0), value=1.0).mean((1, 2)))


def test_pads_of_zeros_are_their_input_and_others_still_refused():
    module = _Pads().eval()
    spec = from_torch(module, (3, 8, 8))
    assert [n["op"] for n in spec["nodes"]] == ["conv", "conv", "gap", "flatten"]
    check_parity(module, spec, (3, 8, 8))
    with pytest.raises(UsageError, match="two or four ints"):  # a channels-last pad that pads
        from_torch(_Pads(pad=1).eval(), (3, 8, 8))


def _cosine_spec(**fields) -> dict:
    """q, k, v 1×1 convs of a 2×4×6 map and one attention of 2 heads (Swin V2's fields), pooled."""
    conv = {"op": "conv", "inputs": ["input"], "in": 2, "out": 4, "k": 1}
    return validate({"name": "c", "input_shape": [2, 4, 6], "output": "f", "nodes": [
        *({"name": n, **conv} for n in "qkv"),
        {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 1.0, "cosine": True,
         **fields},
        {"name": "p", "op": "gap", "inputs": ["a"]}, {"name": "f", "op": "flatten", "inputs": ["p"]}]})


@pytest.mark.parametrize("fields", [{}, {"window": [2, 3]}, {"window": [2, 3], "shift": [1, 1]},
                                    {"window": [2, 2], "dilated": True}])
def test_cosine_attention_torch_equals_onnx_and_reads_its_scale(fields):
    """Over the whole map or in windows (shifted, dilated): the torch form = the ONNX graph (`spec_logits`), each
    head's logit scale read, and q's scale (a factor on q) gone in the normalisation."""
    spec = _cosine_spec(**fields)
    weights = random_params(spec, 3, 0)
    assert weights["a.logit_scale"].shape == (2,)
    x = torch.randn(3, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    want = spec_logits(spec, weights, x)
    scaled_q = {**weights, "q.weight": weights["q.weight"] * 3, "q.bias": weights["q.bias"] * 3}
    assert np.abs(spec_logits(spec, scaled_q, x) - want).max() < 1e-4  # cosine: q's length does not count
    other_head = {**weights, "a.logit_scale": weights["a.logit_scale"] + np.float32([0, 1])}
    assert np.abs(spec_logits(spec, other_head, x) - want).max() > 1e-4


def _tiny_v2(in_chans: int = 1, classes: int = 5) -> nn.Module:  # 4×4 maps of 2×2 windows, then 2×2: digits
    return _randomised(V2.SwinTransformerV2(img_size=8, patch_size=2, in_chans=in_chans, embed_dim=8, depths=(2, 2),
                                            num_heads=(2, 2), window_size=2, num_classes=classes))


def _tiny_cr(in_chans: int = 1, classes: int = 5) -> nn.Module:
    return _randomised(CR.SwinTransformerV2Cr(img_size=(8, 8), patch_size=2, in_chans=in_chans, window_size=2,
                                              embed_dim=8, depths=(2, 2), num_heads=(2, 2), num_classes=classes))


@pytest.mark.parametrize("make, head", [(_tiny_v2, "head.fc"), (_tiny_cr, "head.fc")], ids=["v2", "v2_cr"])
def test_trained_values_go_back_into_the_module(make, head, tmp_path):
    """Train the spec with a method (its position-bias MLPs and logit scales move), write task 0's values back into
    the module (`to_module_state`: every key one of the module's, of its shape; every parameter but the classifier
    written) and give it the task's head: the module computes what the artifact's runtime does
    (`write_back.trained_back_into`)."""
    from write_back import trained_back_into

    trained_back_into(lambda n: make(classes=n), head, ("attend.mlp", "logit_scale"), tmp_path)


def test_specs_of_the_earlier_table_form_still_equal_the_module():
    """Specs edb2fc8's from_torch made (the position bias as the table the MLP computes, a packed qkv bias; V2-CR's
    table a row per pair): they load unchanged, read the module's values (which it computes: `module_values`) and
    compute the module's output; writing trained values back is refused naming the table, which no module tensor
    holds."""
    from edgecl.arch.module_state import to_module_state

    specs = json.loads((Path(__file__).parent / "data" / "swinv2-table-specs.json").read_text())
    modules = {"swinv2": _randomised(V2.SwinTransformerV2(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2),
                                                          num_heads=(2, 4), window_size=4, num_classes=5)),
               "swinv2_cr": _randomised(CR.SwinTransformerV2Cr(img_size=(16, 16), patch_size=2, window_size=4,
                                                               embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                                               num_classes=5))}
    for name, old in specs.items():
        spec = validate(old)
        assert stored_form(spec) == old
        assert {n.get("bias_table") for n in spec["nodes"] if n["op"] == "attention"} == {"swin"}
        check_parity(modules[name], spec, (3, 16, 16), batch=2)
        with pytest.raises(UsageError, match=r"tensor 'layers\.0\.blocks\.0\.attn\.attend\.bias'|"
                                             r"tensor 'stages\.0\.blocks\.0\.attn\.attend\.bias'.*re-import"):
            to_module_state(spec, tensors_of(modules[name], spec))


@pytest.mark.parametrize("fields, words", [
    ({"bias_mlp_form": "swin"}, "bias_mlp_form"), ({"bias_mlp_form": 1}, "bias_mlp_form"),
    ({"bias_mlp_span": None}, "bias_mlp_span"), ({"bias_mlp_span": [0, 4]}, "bias_mlp_span"),
    ({"bias_mlp_form": "swin_v2_cr"}, "bias_mlp_span .* goes with bias_mlp_form 'swin_v2'"),
    ({"bias_mlp_form": None, "bias_mlp_span": None}, None),  # RelPosMlp's form: valid, other tensors
    ({"bias_mlp": None, "bias_table": "swin"}, "bias_mlp_form .* needs bias_mlp")])
def test_the_mlp_form_fields_are_checked(fields, words):
    spec = from_torch(_swinv2(), (3, 32, 32))
    hostile = copy.deepcopy(spec)
    node = next(n for n in hostile["nodes"] if n["op"] == "attention")
    node.update(fields)
    for key in [k for k, v in node.items() if v is None]:
        del node[key]
    if words is None:
        assert "mlp2_bias" in {t.rpartition(".")[2] for t in param_shapes(validate(hostile))}
        return
    with pytest.raises(UsageError, match=words):
        validate(hostile)


def test_a_position_bias_mlp_of_another_form_is_refused_by_name():
    """Another activation in V2's cpb_mlp or V2-CR's meta_mlp, or V2's coordinates changed in its buffer: not the
    MLP the spec computes, so refused naming the block (never converted into another network)."""
    gelu = _swinv2()
    gelu.layers[0].blocks[1].attn.cpb_mlp[1] = nn.GELU()
    shifted = _swinv2()
    shifted.layers[1].blocks[0].attn.relative_coords_table.mul_(0.5)
    cr = _tiny_cr(in_chans=3)
    cr.stages[0].blocks[0].attn.meta_mlp.act = nn.GELU()
    for module, side, words in ((gelu, 32, r"layers\.0\.blocks\.1.*cpb_mlp is not timm's"),
                                (shifted, 32, r"layers\.1\.blocks\.0.*own log-spaced coordinates"),
                                (cr, 8, r"stages\.0\.blocks\.0.*meta_mlp is not timm's Mlp")):
        with pytest.raises(UsageError, match=words):
            from_torch(module, (3, side, side))
