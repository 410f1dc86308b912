"""The ops added on 2026-12-01 at their edge values, each a hand-built spec: bicubic resampling to and from 1×1, to
its own size and to odd and unequal sides (against torch's F.interpolate); an upsample of mode "tile" by 1 and by
unequal factors (against torch's repeat); rotary embeddings of one head, one token, a class-token prefix, both
pairings; outlook attention with a 1×1 window, a window as large as the map and a stride of the whole map; HaloNet's
blocks as large as the map, of one position, a halo of 0 and one larger than the block; softmax-kernel linear
attention of one head and one token; a tiled position embedding as large as the map or of one position, a
channels-last one on a 1×1 map; a relative lambda layer on a 1×1 map. For each, at batch 1 and 7: the torch form
and the ONNX graph compute the same, the stored form reads back, and an artifact's runtime (in place and per-task
sessions) gives the torch forward of what it stores."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz_families import _random_model
from random_weights import random_params
from torch_nets import spec_logits

from edgecl import artifact
from edgecl.arch import validate
from edgecl.arch.later_fields import stored_form
from edgecl.errors import UsageError
from edgecl.runtime import TaskRuntime
from edgecl.train.models import forward


def _spec(shape: list[int], nodes: list[dict]) -> dict:
    return {"name": "edge", "input_shape": shape, "nodes": [*nodes, {"name": "f", "op": "flatten",
                                                                      "inputs": [nodes[-1]["name"]]}]}


def _conv(name: str, cin: int, cout: int, source: str = "input") -> dict:
    return {"name": name, "op": "conv", "inputs": [source], "in": cin, "out": cout, "k": 1}


def _rotary(heads: int, d: int, tokens: int, prefix: int, half: bool) -> dict:
    table = np.random.default_rng(0).standard_normal((tokens - prefix, 2 * d)).round(3).tolist()
    return _spec([heads * d, tokens, 1], [{"name": "r", "op": "rotary", "inputs": ["input"], "heads": heads,
                                           "prefix": prefix, "half": half, "table": table}])


def _outlook(side: int, k: int, pad: int, stride: int) -> dict:
    ch, heads = 4, 1 if side % 2 else 2
    pool = {"name": "pool", "op": "avgpool", "inputs": ["input"], "k": stride, "stride": stride, "ceil_mode": True} \
        if stride > 1 else _conv("pool", ch, ch)
    return _spec([ch, side, side], [_conv("v", ch, ch), pool, _conv("a", ch, heads * k ** 4, "pool"),
                                    {"name": "o", "op": "outlook_attention", "inputs": ["v", "a"], "heads": heads,
                                     "k": k, "pad": pad, "stride": stride, "scale": 0.5}])


def _halo(side: int, block: int, halo: int, heads: int) -> dict:
    window = block + 2 * halo
    return _spec([2, side, side], [_conv("q", 2, heads * 3), _conv("k", 2, heads * 3), _conv("v", 2, heads * 2),
                                   {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": heads,
                                    "scale": 0.5, "halo_blocks": [block, block], "halo": halo,
                                    "rel_pos": [window, window], "rel_dim": 3}])


def _linear_softmax(heads: int, tokens: int) -> dict:
    return _spec([2, tokens, 1], [_conv("q", 2, 2 * heads), _conv("k", 2, 2 * heads), _conv("v", 2, 2 * heads),
                                  {"name": "l", "op": "linear_attention", "inputs": ["q", "k", "v"], "heads": heads,
                                   "kernel": "softmax"}])


def _pos_embed(side: int, tile: list[int] | None) -> dict:
    fields = {"tokens": math.prod(tile), "tile": tile, "module_shape": [1, 2, *tile]} if tile else \
        {"tokens": side * side, "channels_last": True, "module_shape": [1, side, side, 2]}
    return _spec([2, side, side], [{"name": "p", "op": "pos_embed", "inputs": ["input"], "ch": 2, **fields}])


def _lambda(side: int, heads: int) -> dict:
    return _spec([2, side, side], [_conv("q", 2, heads * 2), _conv("k", 2, 2), _conv("v", 2, 3),
                                   {"name": "l", "op": "lambda_layer", "inputs": ["q", "k", "v"], "heads": heads,
                                    "dim": 2, "rel_pos": [side, side]}])


CASES = {
    **{f"bicubic {a}->{b}": _spec([2, *a], [{"name": "b", "op": "bicubic", "inputs": ["input"], "size": b}])
       for a in ([1, 1], [3, 3], [4, 6]) for b in ([1, 1], [3, 3], [5, 7], [2, 9])},
    **{f"tile {a}x{s}": _spec([2, *a], [{"name": "u", "op": "upsample", "inputs": ["input"], "scale": s,
                                          "mode": "tile"}])
       for a in ([1, 1], [3, 2]) for s in ([1, 1], [3, 1], [2, 3])},
    **{f"rotary {args}": _rotary(*args) for args in ((1, 2, 1, 0, False), (1, 2, 2, 1, True), (3, 2, 5, 0, True),
                                                     (2, 4, 3, 2, False))},
    **{f"outlook {args}": _outlook(*args) for args in ((1, 1, 0, 1), (3, 3, 1, 1), (5, 3, 1, 2), (3, 3, 1, 3),
                                                       (2, 1, 0, 2), (5, 5, 2, 5))},
    **{f"halo {args}": _halo(*args) for args in ((4, 4, 0, 1), (4, 2, 0, 2), (1, 1, 0, 1), (3, 3, 2, 1), (2, 1, 1, 1))},
    **{f"linear softmax {args}": _linear_softmax(*args) for args in ((1, 1), (1, 5), (3, 2))},
    **{f"pos_embed {args}": _pos_embed(*args) for args in ((4, [4, 4]), (3, [1, 1]), (6, [3, 2]), (1, [1, 1]),
                                                           (1, None), (3, None))},
    **{f"lambda rel {args}": _lambda(*args) for args in ((1, 1), (3, 1), (2, 2))},
}


def _reference(spec: dict, x: torch.Tensor) -> torch.Tensor | None:
    """torch's own function for the resampling ops, as features; None for the others (the ONNX graph checks them)."""
    node = spec["nodes"][0]
    if node["op"] == "bicubic":
        return F.interpolate(x, size=tuple(node["size"]), mode="bicubic", align_corners=False).flatten(1)
    if node["op"] == "upsample":
        return x.repeat(1, 1, *node["scale"]).flatten(1)
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_an_edge_value_computes_the_same_in_torch_onnx_and_the_runtime(name, tmp_path):
    arch = validate(CASES[name])
    stored = json.loads(json.dumps(stored_form(arch)))
    assert validate(stored) == arch
    weights = random_params(arch, 3, 0)
    for batch in (1, 7):
        x = torch.randn(batch, *arch["input_shape"], generator=torch.Generator().manual_seed(batch))
        got = spec_logits(arch, weights, x)  # torch = ONNX
        if (features := _reference(arch, x)) is not None:
            want = features.numpy() @ weights["head.weight"].T + weights["head.bias"]
            assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    path = str(tmp_path / "edge.edgecl")
    artifact.save(_random_model(arch, 0), path)
    with artifact.load(path) as art:
        stored_weights = art.materialize(1)
    x = np.random.default_rng(0).standard_normal((7, *arch["input_shape"])).astype(np.float32)
    want = forward(arch, {k: torch.from_numpy(v) for k, v in stored_weights.items()}, torch.from_numpy(x)).numpy()
    for strategy in ("inplace", "sessions"):
        for batch in (1, 7):
            got = TaskRuntime(path, strategy=strategy).infer(x[:batch], task=1)
            assert np.abs(got - want[:batch]).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_the_fixed_matrices_of_a_spec_are_bounded_in_all():
    """Bicubic and adaptive pooling hold a fixed matrix per axis and outlook attention a one-hot window weight, from
    fields alone: a 2 KB file of ten 4096-sided bicubic nodes had the runtime allocate 5.5 GB and fail inside ONNX
    Runtime. One such node (2 × 4096², CrossViT's at 240 is 107,520) goes in; the sum past `MAX_CONSTANTS` is refused
    by validate, naming the node, and so by `artifact.save`."""
    def chain(n: int) -> dict:
        nodes = [{"name": f"b{i}", "op": "bicubic", "inputs": [f"b{i - 1}" if i else "input"],
                  "size": [4096 - i % 2] * 2} for i in range(n)]
        return _spec([1, 4096, 4096], [*nodes, {"name": "g", "op": "gap", "inputs": [nodes[-1]["name"]]}])

    assert validate(chain(1))
    with pytest.raises(UsageError, match=r"node 'b2' \(bicubic\): the graph's fixed .* more than 67108864"):
        validate(chain(10))
    outlook = _spec([1400, 1, 1], [_conv("a", 1400, 15 ** 4), {"name": "o", "op": "outlook_attention",
                                                                "inputs": ["input", "a"], "heads": 1, "k": 15,
                                                                "pad": 7, "stride": 1, "scale": 0.5}])
    with pytest.raises(UsageError, match=r"node 'o' \(outlook_attention\)"):  # 1400 · 15⁴ one-hot weights
        validate(outlook)


def test_resized_embeddings_count_their_matrices():
    """HieraDet's `pos_embed.resize` is the bicubic's two matrices on its grid: a 1 × 4096 grid (4,096 weights)
    resized to a 4096² map holds 4096² fixed values, so four of them pass the bound from 64 KB of weights."""
    def chain(n: int) -> dict:
        nodes = [{"name": f"p{i}", "op": "pos_embed", "inputs": [f"p{i - 1}" if i else "input"], "ch": 1,
                  "tokens": 4096, "resize": [1, 4096], "module_shape": [1, 1, 1, 4096]} for i in range(n)]
        return _spec([1, 4096, 4096], [*nodes, {"name": "g", "op": "gap", "inputs": [nodes[-1]["name"]]}])

    assert validate(chain(3))
    with pytest.raises(UsageError, match=r"node 'p3' \(pos_embed\): the graph's fixed .* more than 67108864"):
        validate(chain(4))


@pytest.mark.parametrize("node, shape", [
    ({"op": "lambda_layer", "heads": 1, "dim": 1, "rel_pos": [96, 96]}, [1, 96, 96]),
    ({"op": "attention", "heads": 1, "scale": 1.0, "gated_pos": True}, [1, 8100, 1])])
def test_an_index_or_offsets_past_the_bound_are_refused(node, shape):
    """A relative lambda's (T, T) int64 index and ConViT's (3, T²) offsets are constants of the ONNX graph made from
    the map's size alone, each node within its own bounds (a 96² map's lambda index is 680 MB, an 8100-token gated
    attention's offsets 790 MB): a few such nodes in a small file made gigabytes."""
    nodes = [_conv("q", 1, 1), _conv("k", 1, 1, "q"), _conv("v", 1, 1, "q"),
             {"name": "n0", "inputs": ["q", "k", "v"], **node}, {"name": "n1", "inputs": ["n0", "k", "v"], **node}]
    with pytest.raises(UsageError, match=r"node 'n\d' \((lambda_layer|attention)\): the graph's fixed"):
        validate(_spec(shape, nodes))
