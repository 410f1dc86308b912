"""The rest of the ViT token family through `from_torch`: register tokens (timm's ``reg_tokens``), DeiT's
distillation token with its averaged head, the tokens after the prefix (timm's average pooling without the class and
register tokens), frozen position embeddings (``requires_grad=False``: a constant) — parity of the spec's torch
forward and ONNX graph with the real module (TinyViT variants, timm VisionTransformer, deit_tiny_distilled_patch16_224
and two reg4 models, small), the module's tensors in and out, every method keeping a frozen embedding at the module's
values and storing it once, old specs reading as before, and refusals by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from layer_nets import TinyViT
from torch_nets import check_parity, timm

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.module_state import state_shapes
from edgecl.arch.spec import frozen_tensors, param_shapes, token_tensors
from edgecl.errors import UsageError
from edgecl.train.initial import starting_weights
from test_attention import SMALL, _parity, _randomise_tokens


def _prefix_ops(spec: dict) -> list[tuple[str, int]]:
    return [(n["name"], n["tokens"]) for n in spec["nodes"] if n["op"] == "class_token"]


@pytest.mark.parametrize("registers, distilled", [(3, False), (0, True), (2, True)])
def test_tiny_vit_with_register_and_distillation_tokens(registers, distilled):
    torch.manual_seed(0)
    module = TinyViT(3, 3, image=16, registers=registers, distilled=distilled).eval()
    spec = from_torch(module, (3, 16, 16))
    check_parity(module, spec, (3, 16, 16))  # distilled: one head on [cls, dist] (`classifier_of`)
    # emitted from the last parameter: the class token ends up first
    want = [("reg_token", registers)] * bool(registers) + [("dist_token", 1)] * distilled + [("cls_token", 1)]
    assert _prefix_ops(spec) == want
    assert spec["feature_dim"] == 24 if distilled else 12
    if registers:
        assert param_shapes(spec)["reg_token.weight"] == (12, registers)
        assert state_shapes(spec)["reg_token.weight"] == (1, registers, 12)
        ours = tensors_of(module, spec)
        assert np.array_equal(ours["reg_token.weight"], module.reg_token.detach().numpy()[0].T)
        start = starting_weights(module, spec)
        assert np.array_equal(start.values["reg_token.weight"], ours["reg_token.weight"])
        assert starting_weights(start, spec).sha256 == start.sha256
        cm = channel_map(spec)  # the tokens' rows are the residual stream's channels, like the class token's
        assert {g for g, _ in cm.rows["reg_token.weight"]} == {g for g, _ in cm.rows["cls_token.weight"]}


@pytest.mark.parametrize("kwargs", [{"reg_tokens": 4, "no_embed_class": True},
                                    {"reg_tokens": 2, "global_pool": "avg"},
                                    {"reg_tokens": 4, "class_token": False, "global_pool": "avg",
                                     "no_embed_class": True},
                                    {"global_pool": "avg"}])
def test_timm_register_tokens_and_average_after_the_prefix(kwargs):
    """timm pools x[:, num_prefix_tokens:].mean(1) for global_pool='avg': a ``token`` range, then ``gap``."""
    spec = _parity(timm.models.vision_transformer.VisionTransformer(**SMALL, **kwargs), (3, 32, 32))
    pick = next(n for n in spec["nodes"] if n["op"] == "token")
    prefix = kwargs.get("reg_tokens", 0) + kwargs.get("class_token", True)
    if kwargs.get("global_pool") == "avg":
        assert (pick["index"], pick["count"]) == (prefix, 16)
    else:
        assert (pick["index"], pick["count"]) == (0, 1)


@pytest.mark.parametrize("name, kwargs, size", [
    ("deit_tiny_distilled_patch16_224", {}, 64),
    ("vit_base_patch16_reg4_gap_256", {"embed_dim": 96, "num_heads": 4}, 64),
    ("vit_small_patch14_reg4_dinov2", {}, 56),  # patch 14: 56 is the nearest size to 64 it divides
])
def test_timm_models_with_token_prefixes(name, kwargs, size):
    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False, img_size=size, depth=2, num_classes=5, **kwargs).eval()
    _randomise_tokens(module)
    spec = from_torch(module, (3, size, size))
    check_parity(module, spec, (3, size, size))
    assert ("reg_token", 4) in _prefix_ops(spec) or ("dist_token", 1) in _prefix_ops(spec)


def test_old_specs_read_as_before():
    """A spec written before `tokens` and `count` existed: one class token of shape (ch,), one token picked."""
    old = {"name": "old", "input_shape": [4, 3, 1], "nodes": [
        {"name": "cls", "op": "class_token", "inputs": ["input"], "ch": 4, "module_shape": [1, 1, 4]},
        {"name": "pos", "op": "pos_embed", "inputs": ["cls"], "ch": 4, "tokens": 4},
        {"name": "first", "op": "token", "inputs": ["pos"], "index": 0},
        {"name": "flat", "op": "flatten", "inputs": ["first"]}]}
    spec = validate(old)
    assert param_shapes(spec)["cls.weight"] == (4,) and state_shapes(spec)["cls.weight"] == (1, 1, 4)
    assert spec["feature_dim"] == 4 and spec["nodes"][0]["tokens"] == 1 and spec["nodes"][2]["count"] == 1


class _Prefix(nn.Module):
    """A learned token put after the patch tokens ("after"), or a range of tokens averaged ("range")."""

    def __init__(self, how: str):
        super().__init__()
        self.proj, self.fc, self.how = nn.Conv2d(3, 12, 4, stride=4), nn.Linear(12, 2), how
        self.cls = nn.Parameter(torch.randn(1, 1, 12))

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        if self.how == "after":
            return self.fc(torch.cat([t, self.cls.expand(t.shape[0], -1, -1)], dim=1)[:, 0])
        return self.fc(t[:, 1::2].mean(1))


@pytest.mark.parametrize("how, words", [("after", "learned tokens put before the tokens"),
                                        ("range", r"indexing tokens with .*slice\(1, None, 2")])
def test_other_prefixes_and_token_ranges_are_refused_by_name(how, words):
    with pytest.raises(UsageError, match=words) as err:
        from_torch(_Prefix(how), (3, 8, 8))
    assert "test_vit_tokens.py:" in str(err.value)


@pytest.mark.parametrize("method_name", ["lps", "halrp", "rgo", "finetune", "stl", "agscl"])
def test_a_frozen_position_embedding_stays_the_modules_stored_once(method_name):
    """MAE's fixed embedding (requires_grad=False) is a constant: every method keeps the module's values in every
    task (started from the module's weights) and stores them once, as a shared tensor."""
    from edgecl.deltas import materialize
    from edgecl.train import registry
    from edgecl.train.data import make_stream
    from edgecl.train.protocol import TrainContext

    torch.manual_seed(0)
    module = TinyViT(3, 3, image=8, registers=2, frozen_pos=True)
    spec = from_torch(module, (3, 8, 8))
    pos = next(n for n in spec["nodes"] if n["op"] == "pos_embed")
    assert pos["frozen"] and frozen_tensors(spec) == ["pos_embed.weight"]
    assert "pos_embed.weight" not in token_tensors(spec) and "reg_token.weight" in token_tensors(spec)
    quick = {"lps": {"epochs": 1}, "halrp": {"epochs": 3}, "rgo": {"epochs": 1}, "finetune": {"epochs": 1},
             "stl": {"epochs": 1}, "agscl": {"epochs": 1}}[method_name]
    method = registry.create(method_name, spec, quick, start=module)
    stream = make_stream("split-digits", 2, 0, (3, 8, 8))
    for t in range(2):
        method.learn_task(t, stream.tasks[t], TrainContext(progress=False))
    packed = method.pack()
    want = module.pos_embed.detach().numpy()[0].T
    # one stored copy; RGO's feature encoding layers read it in each task's channel order (its rows permuted)
    kind = "permute" if method_name == "rgo" else "shared"
    assert packed.params["pos_embed.weight"]["kind"] == kind
    assert np.array_equal(packed.base["pos_embed.weight"], want)
    assert all("pos_embed.weight" not in tt for tt in packed.task_tensors)
    for t in range(2):
        got = materialize(packed, t)["pos_embed.weight"]
        assert np.array_equal(got, want) if kind == "shared" else sorted(map(tuple, got)) == sorted(map(tuple, want))
    # the learned tokens did train (the test can tell a constant from a tensor that merely was not stepped)
    assert not np.array_equal(materialize(packed, 1)["reg_token.weight"], module.reg_token.detach().numpy()[0].T)


def test_frozen_position_embedding_parity_and_old_specs():
    torch.manual_seed(0)
    module = TinyViT(3, 3, image=16, frozen_pos=True).eval()
    spec = from_torch(module, (3, 16, 16))
    check_parity(module, spec, (3, 16, 16))
    learned = from_torch(TinyViT(3, 3, image=16), (3, 16, 16))
    assert not next(n for n in learned["nodes"] if n["op"] == "pos_embed")["frozen"]
    assert frozen_tensors(learned) == []


def test_a_position_embedding_in_a_buffer_is_refused_by_name():
    """A buffer is no parameter: it would be neither loaded as starting weights nor kept as a spec tensor."""
    class Buffered(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.fc = nn.Conv2d(3, 12, 4, stride=4), nn.Linear(12, 2)
            self.register_buffer("pos_embed", torch.randn(1, 4, 12))

        def forward(self, x):
            return self.fc((self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed).mean(1))

    with pytest.raises(UsageError, match="'pos_embed' is a tensor attribute that is no parameter") as err:
        from_torch(Buffered(), (3, 8, 8))
    assert "test_vit_tokens.py:" in str(err.value)


@pytest.mark.parametrize("registers", [0, 2])
def test_an_artifact_writes_the_new_fields_only_where_they_differ_from_their_defaults(registers, tmp_path):
    """`tokens`, `count` and `frozen` at their defaults mean what a file without them meant: the file leaves them out,
    so a plain ViT's artifact is read by an edgecl from before they existed (whose `validate` refuses a field it does
    not know), and is read back here as the same arch."""
    import json

    from edgecl import artifact
    from edgecl.artifact import container
    from edgecl.train import registry
    from edgecl.train.data import make_stream
    from edgecl.train.protocol import TrainContext

    spec = from_torch(TinyViT(3, 1, image=8, registers=registers), (1, 8, 8))
    method = registry.create("finetune", spec, {"epochs": 1})
    method.learn_task(0, make_stream("split-digits", 1, 0, (1, 8, 8)).tasks[0], TrainContext(progress=False))
    path = str(tmp_path / "vit.edgecl")
    artifact.save(method.pack(), path)
    with open(path, "rb") as f:
        data = f.read()
    header = container.read_header(path, lambda n, offset, field: data[offset:offset + n], len(data))
    written = json.loads(header.manifest_text)["arch"]["nodes"]
    defaults = {"class_token": ("tokens", 1), "token": ("count", 1), "pos_embed": ("frozen", False)}
    full = {n["name"]: n for n in validate(spec)["nodes"]}
    checked = set()
    for node in written:
        if node["op"] in defaults:
            field, default = defaults[node["op"]]
            assert node.get(field, default) == full[node["name"]][field]
            assert (field in node) == (full[node["name"]][field] != default)
            checked.add((node["op"], field in node))
    assert checked == {("class_token", False), ("token", False), ("pos_embed", False)} | (
        {("class_token", True)} if registers else set())
    assert artifact.load(path).manifest["arch"] == validate(spec)
