"""EfficientViT-MSRA through `from_torch`: timm's LocalWindowAttention kept whole — its map padded up to one window
(zeros that join the attention), the cascaded heads (each head's channels plus the previous head's output, per-head
qkv ConvNorm, depthwise ConvNorm on q, single-head attention with its row of LeViT's bias table: ``bias_rows``),
proj, the crop — with parity of the spec's torch forward and ONNX graph against timm's EfficientVitMsra (biases
randomised: timm starts them at 0), on one window or several (a windowed depthwise conv and window attention), the
rows' storage (state keys, shapes, starting weights), spec refusals, and timm's efficientvit_m0 at 64 and m0, m1, m2
at 224 (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, timm

from edgecl.arch import from_torch
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.module_state import state_keys, state_shapes
from edgecl.arch.spec import validate
from edgecl.errors import UsageError
from edgecl.train.initial import StartingWeights, starting_weights

EfficientVitMsra = timm.models.efficientvit_msra.EfficientVitMsra


def _small(window: int = 7, img: int = 112, heads: tuple[int, ...] = (2, 3), **kwargs) -> nn.Module:
    """Built for `img` (timm's windows: `window`, at most the stage's map at that size), traced at 64: stage maps 4
    and 2 (subsampled); the heads' value width is the channels per head."""
    args = dict(img_size=img, embed_dim=(8, 12), key_dim=(4, 4), depth=(1, 1), num_heads=heads,
                window_size=(window, window), kernels=(5, 3, 3), num_classes=5, **kwargs)
    torch.manual_seed(0)
    module = EfficientVitMsra(**args)
    randomise_batchnorm(module)
    for name, p in module.named_parameters():
        if name.endswith("attention_biases"):
            nn.init.normal_(p)
    return module.eval()


def _attends(spec: dict) -> list[dict]:
    return [n for n in spec["nodes"] if n["op"] == "attention"]


@pytest.mark.parametrize("window, img, pads", [(7, 112, [[0, 0, 3, 3], [0, 0, 2, 2]]), (4, 112, [[0, 0, 2, 2]]),
                                               (7, 64, [])])
def test_parity_padded_and_exact_windows(window, img, pads):  # windows 7, 4 at 112; 4, 2 at 64: the maps themselves
    module = _small(window, img)
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    assert [n["pads"] for n in spec["nodes"] if n["op"] == "pad" and n["name"].endswith(".pad")] == pads
    assert [n["pads"] for n in spec["nodes"] if n["op"] == "pad" and n["name"].endswith(".crop")] == \
        [[-p for p in pad] for pad in pads]
    rows = [n["bias_rows"] for n in _attends(spec)]
    assert rows == [[0, 2], [1, 2], [0, 3], [1, 3], [2, 3]]  # one single-head node per head, its row of the table
    assert all(n["heads"] == 1 and "window" not in n for n in _attends(spec))


def test_one_head_of_another_value_width_and_a_bad_split():
    lwa = timm.models.efficientvit_msra.LocalWindowAttention
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1),
                        lwa(8, key_dim=4, num_heads=1, attn_ratio=3, resolution=5, window_resolution=5, kernels=(3,)))
    torch.manual_seed(0)
    randomise_batchnorm(net)
    net = nn.Sequential(net, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    spec = from_torch(net, (3, 8, 8))  # a 4×4 map padded to the 5×5 window; values of 12 channels, no cascade
    check_parity(net, spec, (3, 8, 8), batch=2)
    assert [n["bias_rows"] for n in _attends(spec)] == [[0, 1]] and not any(".cascade" in n["name"]
                                                                           for n in spec["nodes"])
    net[0][1].attn.num_heads = 2  # its qkvs say one head: which split timm means cannot be told
    with pytest.raises(UsageError, match="1 heads of 12 value channels must split its 8 channels evenly"):
        from_torch(net, (3, 8, 8))


def test_the_cascade_feeds_each_head_the_previous_output():
    spec = from_torch(_small(), (3, 64, 64))
    cascade = [n for n in spec["nodes"] if ".cascade" in n["name"]]
    attends = [n["name"] for n in _attends(spec)]
    assert [n["inputs"][0] for n in cascade] == [attends[0], attends[2], attends[3]]


def test_bias_rows_storage_and_starting_weights(tmp_path):
    module = _small()
    spec = from_torch(module, (3, 64, 64))
    names = [f"{n['name']}.bias" for n in _attends(spec)][:2]
    key = "stages.0.blocks.0.mixer.m.attn.attention_biases"
    assert [state_keys(spec)[n] for n in names] == [key, key]
    assert [state_shapes(spec)[n] for n in names] == [(2, 49), (2, 49)]  # a 7×7 window: 49 offsets
    table = module.state_dict()[key].numpy()
    values = tensors_of(module, spec)
    assert [values[n].tolist() for n in names] == [table[:1].tolist(), table[1:].tolist()]
    start = starting_weights(module, spec)
    again = starting_weights(start, spec)  # written back to the module's keys (rows joined) and read again
    assert again.sha256 == start.sha256
    assert np.array_equal(again.values[names[1]], table[1:])
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in module.state_dict().items() if v.is_floating_point()})
    assert starting_weights(str(tmp_path / "w.npz"), spec).sha256 == start.sha256  # the file's one table, by rows


def test_starting_weights_missing_a_row_say_so():  # before: the table was filled in with a row of zeros
    module = _small()
    spec = from_torch(module, (3, 64, 64))
    start = starting_weights(module, spec)
    name = f"{_attends(spec)[1]['name']}.bias"
    partial = StartingWeights({k: v for k, v in start.values.items() if k != name}, "partial", "")
    with pytest.raises(UsageError, match="partial: no starting value for 2 of the .* trunk tensors "
                                         "\\(stages.0.blocks.0.mixer.m.attn.attention_biases, "):  # both rows
        starting_weights(partial, spec)


def _attention(**fields) -> dict:
    node = {"name": "a", "op": "attention", "inputs": ["input"] * 3, "heads": 1, "scale": 0.5, "bias_offsets": 4,
            "bias_index": [[i % 4 for i in range(4)]] * 4}
    return {k: v for k, v in {**node, **fields}.items() if v is not None}  # None: the field left out


def _spec(*nodes: dict) -> dict:
    tail = [{"name": "g", "op": "gap", "inputs": [nodes[-1]["name"]]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]
    return {"name": "t", "input_shape": [2, 2, 2], "nodes": [*nodes, *tail]}


@pytest.mark.parametrize("fields, words", [
    ({"bias_rows": [2, 2]}, "bias_rows \\[2, 2\\]"),
    ({"bias_rows": [0, 2], "bias_offsets": None, "bias_index": None}, "bias_rows \\[0, 2\\] needs a bias_offsets"),
    ({"bias_rows": [0, 2], "bias_table": "swin"}, "LeViT's \\(heads, offsets\\) layout"),
    ({"bias_rows": [-1, 2]}, "bias_rows"),
])
def test_bad_bias_rows_are_refused(fields, words):
    with pytest.raises(UsageError, match=words):
        validate(_spec(_attention(**fields)))


def test_two_nodes_on_one_row_are_refused_and_on_two_rows_accepted():
    first = _attention(module="m", bias_rows=[0, 2])
    validate(_spec(first, {**first, "name": "b", "inputs": ["a"] * 3, "bias_rows": [1, 2]}))
    with pytest.raises(UsageError, match="both name the module's 'm.attention_biases'"):
        validate(_spec(first, {**first, "name": "b", "inputs": ["a"] * 3}))
    with pytest.raises(UsageError, match="both name"):  # a whole table and a row of it
        validate(_spec(first, _attention(name="b", inputs=["a"] * 3, module="m", heads=2)))


@pytest.mark.parametrize("second, words", [
    ({"bias_rows": [1, 3]}, "give it different \\(rows, offsets\\): \\[\\(2, 4\\), \\(3, 4\\)\\]"),  # 2 or 3 rows?
    ({"bias_offsets": 2, "bias_index": [[i % 2 for i in range(4)]] * 4}, "different \\(rows, offsets\\)"),
    ({"bias_rows": [0, 2]}, "both name the module's 'm.attention_biases'"),
])
def test_the_rows_of_one_table_must_agree_on_its_shape(second, words):  # accepted before: no module fits both
    first = _attention(module="m", bias_rows=[0, 2])
    with pytest.raises(UsageError, match=words):
        validate(_spec(first, {**first, "name": "b", "inputs": ["a"] * 3, "bias_rows": [1, 2], **second}))


@pytest.mark.parametrize("rows", [[1, 3], [0, 2], [0, 1 << 31]])
def test_a_row_no_node_holds_is_refused(rows):  # accepted before: written back as zeros (2³¹ rows: 32 GB of them)
    with pytest.raises(UsageError, match=f"of {rows[1]} rows, but row {1 - rows[0] % 2} of it is no node's"):
        validate(_spec(_attention(module="m", bias_rows=rows)))


@pytest.mark.parametrize("window, pads", [(2, []), (3, [[0, 0, 2, 2], [0, 0, 1, 1]])])
def test_parity_on_several_windows(window, pads):
    """Stage maps 4 and 2: windows 2 (four of them, then one) and 3 (the 4×4 map padded to four, the 2×2 to one);
    each head's depthwise conv on q and its attention run in each window on its own."""
    module = _small(window=window)
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    assert [n["pads"] for n in spec["nodes"] if n["op"] == "pad" and n["name"].endswith(".pad")] == pads
    windowed = [n["name"] for n in spec["nodes"] if n.get("window") == [window, window]]
    assert windowed == [f"stages.0.blocks.0.mixer.m.attn.{part}" for i in range(2)
                        for part in (f"dws.{i}.conv", f"attend{i}")]  # stage 1 is one window: none


def test_the_depthwise_conv_on_q_needs_its_windows():
    """A 4×4 map padded to four 3×3 windows, its positions flattened into the classifier (a mean would hide q's
    part); the conv over the whole map (its window borders reading their neighbours) misses timm's logits."""
    lwa = timm.models.efficientvit_msra.LocalWindowAttention
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), lwa(8, key_dim=4, num_heads=2, attn_ratio=1,
                                                                     resolution=4, window_resolution=3, kernels=(3, 3)),
                        nn.Flatten(), nn.Linear(8 * 16, 3))
    randomise_batchnorm(net)
    spec = from_torch(net.eval(), (3, 8, 8))
    check_parity(net, spec, (3, 8, 8), batch=2)
    for node in spec["nodes"]:
        if node["op"] == "conv" and node.pop("window", None):
            with pytest.raises(AssertionError):
                check_parity(net, validate(spec), (3, 8, 8), batch=2)
            node["window"] = [3, 3]


def test_other_layers_in_the_block_are_refused_by_name():
    module = _small()
    module.stages[0].blocks[0].mixer.m.attn.proj[0] = nn.GELU()
    with pytest.raises(UsageError, match="proj must be timm's ReLU then ConvNorm"):
        from_torch(module, (3, 64, 64))
    module = _small()
    module.stages[0].blocks[0].mixer.m.attn.qkvs[1] = nn.Conv2d(4, 12, 1)  # a plain conv where a ConvNorm was
    with pytest.raises(UsageError, match="'stages.0.blocks.0.mixer.m.attn.qkvs.1' has layers \\[\\]; edgecl converts "
                       "timm's ConvNorm"):
        from_torch(module, (3, 64, 64))


@pytest.mark.slow
def test_efficientvit_m0_at_64():  # stage maps 4, 2, 1: each padded to its one window (7, 7, 4)
    module = timm.create_model("efficientvit_m0")
    torch.manual_seed(0)
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), (3, 64, 64))
    check_parity(module, spec, (3, 64, 64), batch=2)
    assert len(_attends(spec)) == 4 * (1 + 2 + 3)


@pytest.mark.slow
@pytest.mark.parametrize("name, windowed", [("efficientvit_m0", 4), ("efficientvit_m1", 2), ("efficientvit_m2", 4)])
def test_efficientvit_at_224(name, windowed):  # the first stage's 14×14 map: four 7×7 windows
    module = timm.create_model(name)
    torch.manual_seed(0)
    randomise_batchnorm(module)
    for key, p in module.named_parameters():
        if key.endswith("attention_biases"):
            nn.init.normal_(p)
    spec = from_torch(module.eval(), (3, 224, 224))
    check_parity(module, spec, (3, 224, 224), batch=2)
    assert sum(n["op"] == "conv" and n.get("window") == [7, 7] for n in spec["nodes"]) == windowed


class _OneHead(nn.Module):
    """A stem (conv + BatchNorm: a dead channel is its BatchNorm's constant) and one head's window attention on a 4×4
    map padded to 5×5, added back: no cascade, so the stream's channels are no attention's v and can go."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.mixer = timm.models.efficientvit_msra.LocalWindowAttention(8, key_dim=4, num_heads=1, attn_ratio=2,
                                                                        resolution=5, window_resolution=5, kernels=(3,))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.fc((x + self.mixer(x)).mean((2, 3)))


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("make", ["cascade", "one head", "windows"])
def test_compaction_keeps_the_padded_window_the_cascade_and_the_rows(make, columns):
    """AGS-CL-shaped dead channels (rows only: their BatchNorm constants reach the pad, whose zeros then differ from
    them, so no reader behind it may absorb them) compact to the same logits, the pad, the crop and every
    attention's heads and bias rows kept."""
    from layer_nets_vit import efficientvit_msra_spec, efficientvit_msra_windows_spec
    from random_weights import random_params

    from edgecl.export import compact_task
    from edgecl.export.onnx_export import run_onnx
    from edgecl.graph.builder import build_onnx
    from edgecl.synthetic import group_node_masks

    arch = efficientvit_msra_spec((3, 8, 8)) if make == "cascade" else efficientvit_msra_windows_spec((3, 8, 8)) \
        if make == "windows" else from_torch(_OneHead().eval(), (3, 8, 8))
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    kept = ("name", "op", "pads", "heads", "bias_rows", "bias_offsets", "window")
    for seed in range(3):
        params, _ = group_node_masks(arch, random_params(arch, 3, seed), 0.5, seed, columns=columns)
        small, small_params, report = compact_task(arch, params, channel_multiple=1)
        assert report.params_compact < report.params_dense or not columns and make == "one head"  # all kept
        dense = run_onnx(build_onnx(arch, params), x)
        assert np.abs(run_onnx(build_onnx(validate(small), small_params), x) - dense).max() <= \
            1e-5 * max(1.0, np.abs(dense).max())
        marked = [[[n.get(k) for k in kept] for n in spec["nodes"] if n["op"] in ("pad", "attention") or
                   n.get("window")] for spec in (small, arch)]
        assert marked[0] == marked[1]
