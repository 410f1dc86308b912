"""DaViT (timm's ``timm.models.davit``) through `from_torch`: its spatial block (window attention on the zero-padded
map, cropped after, between two convolutional position encodings) and its channel attention (per head, softmax of
scale·kᵀv over v's channels applied to q: ``channel_attention`` without normalisation, a fixed scale, inputs
(k, v, q); v2's qᵀk applied to v) against the module, torch form and ONNX; the fields the spec records and the
stored form; other layers in their places refused by name; the library's davit_tiny at 64 (slow)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_nets_vit import tiny_davit
from torch_nets import assert_refused, check_parity, randomised_all

from edgecl.arch import from_torch
from edgecl.arch.factories import build_module
from edgecl.arch.later_fields import stored_form
from edgecl.arch.spec import param_shapes, validate
from edgecl.errors import UsageError


@pytest.mark.parametrize("kwargs", [{}, {"window": 2}, {"image": 16}, {"image": 12, "window": 2},
                                     {"channel_attn_v2": True}, {"cpe_act": True}, {"in_channels": 3}],
                         ids=["padded", "exact", "16px", "12px", "v2", "cpe_act", "rgb"])
def test_tiny_davit_parity(kwargs):
    image, channels = kwargs.get("image", 8), kwargs.get("in_channels", 1)
    module = randomised_all(tiny_davit(**kwargs))
    spec = from_torch(module, (channels, image, image))
    check_parity(module, spec, (channels, image, image))


def _one_node(fields: dict) -> dict:
    """A spec of one ``channel_attention`` node 'a' with `fields`, flattened."""
    return {"input_shape": [4, 2, 2], "nodes": [
        {"name": "a", "op": "channel_attention", "inputs": ["input"] * 3, "heads": 2, **fields},
        {"name": "f", "op": "flatten", "inputs": ["a"]}]}


def test_channel_attention_fields_and_stored_form():
    spec = from_torch(randomised_all(tiny_davit()), (1, 8, 8))
    nodes = {n["name"]: n for n in spec["nodes"]}
    spatial, channel = "stages.0.blocks.0.0", "stages.0.blocks.0.1.attn"
    assert nodes[f"{spatial}.attn.attend"]["window"] == [3, 3]
    assert nodes[f"{spatial}.pad"]["pads"] == [0, 0, 1, 1] and nodes[f"{spatial}.crop"]["pads"] == [0, 0, -1, -1]
    attend = nodes[f"{channel}.attend"]
    assert attend["inputs"] == [f"{channel}.k", f"{channel}.v", f"{channel}.q"]
    assert attend["normalize"] is False and attend["scale"] == pytest.approx(8 ** -0.5)
    # a fixed scale: no temperature tensor
    assert not any(k.startswith(f"{channel}.attend.") for k in param_shapes(spec))
    # the stored form keeps the new fields (not at their default) and reads back as the same spec
    stored = {n["name"]: n for n in stored_form(spec)["nodes"]}
    assert stored[f"{channel}.attend"]["normalize"] is False
    assert validate(stored_form(spec)) == validate(spec)
    # XCA's defaults are left out of the stored form: an older file's bytes
    xca = validate(_one_node({}))
    assert set(stored_form(xca)["nodes"][0]) == {"name", "op", "inputs", "heads", "eps"}


def test_bad_channel_attention_fields_are_refused_by_field():
    for field, value in (("normalize", 1), ("scale", "fixed"), ("scale", float("inf"))):
        with pytest.raises(UsageError, match=f"\\(a\\): {field}"):
            validate(_one_node({field: value}))


def test_other_layers_in_davit_places_are_refused_by_name():
    module = tiny_davit()
    module.stages[0].blocks[0][0].attn.proj = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    assert_refused(module, "SpatialBlock", "stages.0.blocks.0.0", "Sequential", "nn.Linear")
    module = tiny_davit()
    module.stages[0].blocks[0][0].cpe1.act = nn.Softmax(dim=1)
    assert_refused(module, "SpatialBlock", "cpe1.act", "Softmax")
    module = tiny_davit()
    module.stages[0].blocks[0][0].drop_path1 = nn.ReLU()
    assert_refused(module, "SpatialBlock", "drop_path1")
    module = tiny_davit()
    module.stages[0].blocks[0][1].attn.proj = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    assert_refused(module, "ChannelAttention", "stages.0.blocks.0.1.attn", "Sequential", "nn.Linear")


@pytest.mark.slow
def test_library_davit_tiny_at_64():
    torch.manual_seed(0)
    module = build_module("timm:davit_tiny", {}).eval()
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)


def _doubled(m: nn.Module) -> nn.Module:
    """`m`'s output times 2 by a forward set on the instance (its class and attributes unchanged)."""
    plain = m.forward
    m.forward = lambda x: plain(x) * 2
    return m


@pytest.mark.parametrize("change", ["instance forward", "forward hook", "pre-hook"])
@pytest.mark.parametrize("where", ["ChannelAttention", "SpatialBlock", "Conv2d"])
def test_a_kept_layer_whose_call_is_not_its_class_forward_is_refused(change, where):
    """A layer kept whole (or converted by its attributes) whose instance has its own forward or hooks: that code
    changes the module's output, and the conversion, which reads the class and attributes, would leave it out."""
    module = randomised_all(tiny_davit())
    block = module.stages[0].blocks[0]
    layer = {"ChannelAttention": block[1].attn, "SpatialBlock": block[0], "Conv2d": module.stem.conv}[where]
    if change == "instance forward":
        _doubled(layer)
    elif change == "forward hook":
        layer.register_forward_hook(lambda _m, _args, out: out * 2)
    else:
        layer.register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
    assert_refused(module, where, change.split()[-1])


@pytest.mark.parametrize("change", ["instance forward", "forward hook", "pre-hook"])
@pytest.mark.parametrize("where", ["ChannelAttention.qkv", "SpatialBlock.attn.proj"])
def test_a_layer_inside_a_kept_layer_whose_call_is_not_its_class_forward_is_refused(change, where):
    """A layer inside one edgecl keeps whole (the qkv Linear of DaViT's channel attention, the proj of its window
    attention): the kept layer is converted from its attributes, so a hook or instance forward on a layer inside
    it is code the conversion never sees either; refused naming the inner layer and the one around it."""
    module = randomised_all(tiny_davit())
    block = module.stages[0].blocks[0]
    layer = {"ChannelAttention.qkv": block[1].attn.qkv, "SpatialBlock.attn.proj": block[0].attn.proj}[where]
    if change == "instance forward":
        _doubled(layer)
    elif change == "forward hook":
        layer.register_forward_hook(lambda _m, _args, out: out * 2)
    else:
        layer.register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
    assert_refused(module, "inside", where.split(".")[0], change.split()[-1])


@pytest.mark.parametrize("kind", ["hook", "pre-hook"])
def test_a_global_module_hook_is_refused_not_left_out_of_kept_layers(kind):
    """A hook registered for every module (`torch.nn.modules.module.register_module_forward_hook`, as profilers and
    activation recorders do) runs in each layer's call; `from_torch` traces through containers but converts the
    layers it keeps whole by their attributes, so the hook's change to a Conv2d's output would be silently left out
    (a parity failure before this was refused)."""
    from torch.nn.modules import module as torch_module
    register = {"hook": torch_module.register_module_forward_hook,
                "pre-hook": torch_module.register_module_forward_pre_hook}[kind]
    doubled = {"hook": lambda m, _args, out: out * 2 if isinstance(m, nn.Conv2d) else None,
               "pre-hook": lambda m, args: (args[0] * 2,) if isinstance(m, nn.Conv2d) else None}[kind]
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    handle = register(doubled)
    try:
        assert_refused(net, "global", kind, input_shape=(1, 5, 5))
    finally:
        handle.remove()
    from_torch(net.eval(), (1, 5, 5))  # without the hook: converted


@pytest.mark.parametrize("where", ["DaViT SpatialBlock's attn", "NesT level's layer"])
def test_a_submodule_shared_inside_kept_layers_is_refused_not_untied(where):
    """A layer kept whole names its tensors by its own paths: an attention assigned to two DaViT spatial blocks, or
    one NesT transformer layer placed twice in a level, went in as two layers with equal weights (parity held, the
    tie silently gone, trained apart). Refused as shared weights, naming both places, as a layer called twice is."""
    from layer_nets_vit import tiny_nest
    if where.startswith("DaViT"):
        module = randomised_all(tiny_davit(depths=(2, 1)))
        blocks = module.stages[0].blocks
        blocks[1][0].attn = blocks[0][0].attn
        words = ("SpatialBlock", "stages.0.blocks.1.0.attn.qkv.weight", "shared weights")
    else:
        module = randomised_all(tiny_nest(depths=(2, 1)))
        layers = module.levels[0].transformer_encoder
        layers[1] = layers[0]
        words = ("NestLevel", "levels.0.transformer_encoder.1.", "shared weights")
    assert_refused(module, *words)
