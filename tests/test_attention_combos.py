"""Every combination of an attention's optional fields, as today's families brought them (windows, shifts and grids;
LeViT, Swin, TensorFlow, RelPosMlp and Swin V2's / V2-CR's MLP bias tables; talking heads as convs or CaiT's Linears;
ConViT's gated positions; Swin V2's cosine scores; BotNet's relative logits, SAM's (in windows too, read the other
way round); HaloNet's blocks; fewer k/v heads; strided keys): `validate` refuses it with a UsageError, or the torch
form and the ONNX graph compute the same (`spec_logits`) and
the stored form reads back to the same spec. The fields were merged by hand from six branches; a combination one
branch's form forgot would show here."""
from __future__ import annotations

import itertools
import json

import numpy as np
import torch
from random_weights import random_params
from torch_nets import spec_logits

from edgecl.arch import validate
from edgecl.arch.later_fields import stored_form
from edgecl.errors import UsageError

SIDE = 4  # q's map is SIDE × SIDE; the windows, blocks and halo below fit it
_FORMS = ("swin_v2", "swin_v2_cr", "rel_pos_swin")  # the MLP bias forms (`edgecl.arch.mlp_bias`)


def _spec(kv: int | None, stride: int, fields: dict) -> dict:
    """q of 2 heads × 3 channels, k and v (kv heads; 2 channels per v head) from a conv of `stride`, attention."""
    heads = 2
    conv = {"op": "conv", "inputs": ["input"], "in": 2}
    nodes = [{"name": "q", **conv, "out": heads * 3, "k": 1},
             {"name": "k", **conv, "out": (kv or heads) * 3, "k": stride, "stride": stride},
             {"name": "v", **conv, "out": (kv or heads) * 2, "k": stride, "stride": stride},
             {"name": "a", "op": "attention", "inputs": ["q", "k", "v"], "heads": heads, "scale": 0.7,
              **({"kv_heads": kv} if kv else {}), **fields},
             {"name": "f", "op": "flatten", "inputs": ["a"]}]
    return {"name": "combo", "input_shape": [2, SIDE, SIDE], "output": "f", "nodes": nodes}


def _fields(window: str | None, bias: str | None, talk: str | None, gated: bool, cosine: bool, rel: str | None,
            halo: bool, stride: int) -> dict:
    out: dict = {}
    tq = SIDE * SIDE
    tk = tq // stride ** 2
    if window:
        out["window"], tq, tk = [2, 2], 4, 4
        out.update({"shift": [1, 1]} if window == "shifted" else {"dilated": True} if window == "grid" else {})
    if bias:
        extent = out.get("window", [SIDE, SIDE])
        offsets = (2 * extent[0] - 1) * (2 * extent[1] - 1) if bias in ("tf", "mlp", *_FORMS) else 5
        out.update(bias_offsets=offsets, bias_index=[[(i * 7 + j * 3) % offsets for j in range(tk)] for i in range(tq)])
        out.update({} if bias == "levit" else {"bias_table": bias} if bias in ("swin", "tf", "mlp") else
                   {"bias_table": "mlp", "bias_mlp_form": bias})
        out.update({"bias_mlp": 4} if bias in ("mlp", *_FORMS) else {})
        out.update({"bias_mlp_span": [3, 2]} if bias in ("swin_v2", "rel_pos_swin") else {})
    out.update({"talking_heads": True} if talk else {})
    out.update({"talking_linear": True} if talk == "linear" else {})
    out.update({"gated_pos": True} if gated else {})
    out.update({"cosine": True} if cosine else {})
    if rel:  # over the map or within each window (SAM's); read key − query (BotNet) or query − key (MViTv2, SAM)
        out.update(rel_pos=out.get("window", [SIDE, SIDE]), rel_dim=3,
                   **({"rel_scaled": True} if rel == "scaled" else {"rel_mvit": True} if rel == "mvit" else {}))
    out.update({"halo_blocks": [2, 2], "halo": 1} if halo else {})
    return out


def test_every_combination_is_refused_or_computes_the_same_in_torch_and_onnx():
    grid = itertools.product([None, 1], [1, 2], [None, "plain", "shifted", "grid"],
                             [None, "levit", "swin", "tf", "mlp", *_FORMS], [None, "conv", "linear"],
                             [False, True], [False, True], [None, "plain", "scaled", "mvit"], [False, True])
    accepted = []
    for kv, stride, window, bias, talk, gated, cosine, rel, halo in grid:
        try:
            spec = validate(_spec(kv, stride, _fields(window, bias, talk, gated, cosine, rel, halo, stride)))
        except UsageError:
            continue
        accepted.append(spec)
        stored = json.loads(json.dumps(stored_form(spec)))
        assert validate(stored) == spec and stored_form(validate(stored)) == stored
        x = torch.randn(2, 2, SIDE, SIDE, generator=torch.Generator().manual_seed(len(accepted)))
        assert np.isfinite(spec_logits(spec, random_params(spec, 3, len(accepted)), x)).all()
    fields = [set(s["nodes"][3]) for s in accepted]  # each field met at least once, and the pairs the families use
    for together in ({"cosine", "shift", "bias_offsets"}, {"bias_mlp", "dilated"}, {"talking_linear", "bias_mlp"},
                     {"rel_scaled", "halo"}, {"kv_heads", "bias_table"}, {"gated_pos"}, {"cosine", "bias_table"},
                     {"rel_mvit", "window"}, {"rel_mvit", "kv_heads"}, {"cosine", "shift", "bias_mlp_span"},
                     {"cosine", "dilated", "bias_mlp_form"}):
        assert any(together <= f for f in fields), together
