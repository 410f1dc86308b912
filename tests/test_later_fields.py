"""The one table of fields left out at their default (`edgecl.arch.later_fields`): each is a field of its op whose
default means its absence; a spec with every later field written out at any of its absent values validates to the
same normal form (key order too: the file's JSON), whose fields at a default are only the ones it keeps, and the
stored form leaves every one out and reads back as the same spec, on graphs that use these fields off their
defaults too (GroupNorm, weight standardisation, skipinit, tokens, windows, grid and talking-head attention, shared
bias rows, pooled patches, Swin's order, padding modes, bilinear up-sampling, MetaFormer's bias-less norms,
XCA's and DaViT's channel attention, BEiT's qkv bias in parts, EVA-02's q, k, v as rows of a fused qkv,
MobileNetV5's RMSNorms)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from layer_nets import (blur_spec, efficientformer_spec, hgnet_spec, maxvit_spec, s2d_spec, swin_spec, tf_spec,
                        vit_spec)
from layer_nets_meta import metaformer_spec
from layer_nets_nf import group_norm_spec, nf_spec, std_spec
from layer_nets_vit import davit_spec, efficientvit_msra_windows_spec, nest_spec, pit_spec, tnt_spec, volo_spec
from layer_nets_mnv5 import mnv5_spec
from linear_nets import edgenext_spec, mobilevit2_spec
from neck_nets import fpn_spec
from vit_bias_nets import beit_spec, eva_rope_spec

from edgecl.arch import validate
from edgecl.arch.later_fields import LATER_FIELDS, at_default, stored_form
from edgecl.arch.ops import OPS

UPSAMPLE = {"name": "up", "input_shape": [2, 3, 3], "nodes": [  # nearest up-sampling, which no graph below has
    {"name": "up", "op": "upsample", "inputs": ["input"], "scale": 2},
    {"name": "flat", "op": "flatten", "inputs": ["up"]}]}
GRAPHS = {"upsample": lambda: UPSAMPLE, "hgnet": hgnet_spec, "s2d": s2d_spec, "gn": group_norm_spec, "std": std_spec, "nf": nf_spec, "blur": blur_spec, "fpn": fpn_spec, "tf": tf_spec,
          "efficientformer": efficientformer_spec, "maxvit": maxvit_spec, "swin": swin_spec, "pit": pit_spec,
          "vit_tokens": lambda: vit_spec(registers=2, distilled=True, frozen_pos=True),
          "efficientvit_msra_windows": efficientvit_msra_windows_spec, "mobilevit2": mobilevit2_spec,
          "metaformer": metaformer_spec, "edgenext": edgenext_spec, "davit": davit_spec,
          "nest": nest_spec, "volo": volo_spec, "tnt": tnt_spec, "beit": beit_spec,
          "eva_rope": eva_rope_spec, "mnv5": mnv5_spec}


def test_each_later_field_is_a_field_of_its_op_and_its_default_means_absence():
    for op, fields in LATER_FIELDS.items():
        for key, later in fields.items():
            default = OPS[op][key][1]
            assert any(type(default) is type(a) and default == a for a in later.absent), (op, key)


def _written_out(stored: dict, which: int) -> tuple[dict, set[tuple[str, str]]]:
    """`stored` with each later field a node lacks written out at its `which`-th absent value (null cannot be
    written: `validate` reads a field's value by its kind); a std_gain only where the conv is standardised (it
    needs standardize). Also which (op, field)s were written."""
    nodes, written = [], set()
    for node in stored["nodes"]:
        node = dict(node)
        for key, later in LATER_FIELDS.get(node["op"], {}).items():
            value = later.absent[which] if which < len(later.absent) else None
            if key not in node and value is not None and (key != "std_gain" or "standardize" in node):
                node[key] = value
                written.add((node["op"], key))
        nodes.append(node)
    return {**stored, "nodes": nodes}, written


@pytest.mark.parametrize("graph", GRAPHS)
def test_fields_at_their_default_are_left_out_alike_however_written(graph):
    spec = validate(GRAPHS[graph]())
    stored = stored_form(spec)
    on_disk = json.dumps(spec)
    assert not any(at_default(n["op"], k, v, stored=False) for n in spec["nodes"] for k, v in n.items())
    assert not any(at_default(n["op"], k, v, stored=True) for n in stored["nodes"] for k, v in n.items())
    assert json.dumps(validate(stored)) == on_disk
    for which in range(2):
        explicit, _ = _written_out(stored, which)
        assert json.dumps(validate(explicit)) == on_disk and stored_form(validate(explicit)) == stored


def test_the_graphs_write_out_every_later_field_that_can_be_written():
    written = set().union(*(_written_out(stored_form(validate(make())), which)[1] for make in GRAPHS.values()
                            for which in range(2)))
    assert written == {(op, key) for op, fields in LATER_FIELDS.items() for key, later in fields.items()
                       if any(a is not None for a in later.absent)}


def test_the_normal_form_keeps_its_fields_at_their_default_and_the_stored_form_leaves_them_out():
    spec = validate(vit_spec(registers=2, distilled=True, frozen_pos=True))
    ops = {n["op"]: n for n in spec["nodes"]}
    assert ops["pos_embed"]["frozen"] is True and ops["token"]["count"] == 1  # readers index these
    plain = validate(vit_spec())
    kept = [(n["op"], k) for n in plain["nodes"] for k, v in n.items() if at_default(n["op"], k, v, stored=True)]
    assert ("class_token", "tokens") in kept and ("pos_embed", "frozen") in kept
    assert all(LATER_FIELDS[op][key].in_normal_form for op, key in kept)
    assert not any(n["op"] == op and key in n for n in stored_form(plain)["nodes"] for op, key in kept)


def test_the_format_doc_names_every_later_field():
    doc = (Path(__file__).parent.parent / "docs" / "ARTIFACT.md").read_text()
    paragraph = doc[doc.index("A new spec op or node field"):doc.index("| version | change |")]
    missing = [f"{op}.{key}" for op, fields in LATER_FIELDS.items() for key in fields if f"`{key}`" not in paragraph
               and f"`{op}.{key}`" not in paragraph]
    assert not missing, f"docs/ARTIFACT.md does not name {missing}"
