"""The one table of node fields added after files without them were written, with the values that mean what their
absence meant: a spec leaves such a field out at its default, so a file that uses no newer field is read by an
edgecl from before it existed (whose `spec.validate` refuses a field it does not know, naming it) and `validate`
reads it back as the same spec.

Most are left out of the normal form too (`spec.validate` drops them after the op's joint rule,
`op_rules.FIELD_RULES`, has checked and filled them), and readers take ``node.get(field)``; a few the normal form
keeps at their default, so readers may index them, and only the stored form (`stored_form`, what the artifact writer
stores) leaves them out."""
from __future__ import annotations

from typing import Any, NamedTuple

from edgecl.arch.rotary_ops import share_tables


class LaterField(NamedTuple):
    """A later field's values that mean what its absence meant (compared with their type: 1 is not true), and
    whether the normal form keeps it at them (left out of the stored form only)."""

    absent: tuple[Any, ...]
    in_normal_form: bool = False


_NONE = LaterField((None,))
_KEPT = {"in_normal_form": True}

# op → field → its absent values; after each, the spec as before the field existed
LATER_FIELDS: dict[str, dict[str, LaterField]] = {
    "conv": {"standardize": _NONE, "gain_scale": _NONE,  # no weight standardisation
             "std_gain": LaterField((True, None)),  # a standardised conv with a learned gain (timm's ScaledStdConv2d)
             "window": _NONE,  # a conv over the whole map
             "bias_parts": _NONE,  # its bias stored whole, as the conv's own (before BEiT's q_bias, v_bias)
             "weight_rows": _NONE,  # its weight the module's whole (before EVA's q, k, v read from a fused qkv)
             "fused_bias": LaterField((False,))},  # its bias its own (before torchvision's Swin V2 qkv.bias rows)
    "layer_norm": {"over": LaterField(("channels", None)),  # over the channels (before GroupNorm1)
                   "groups": LaterField((1, None)),  # one group (before GroupNorm)
                   "bias": LaterField((True,)),  # with a bias when affine (before MetaFormer v2's bias-less norms)
                   "rms": LaterField((False,))},  # mean-centred (before MobileNetV5's RMSNorm)
    "scalar_affine": {"bias": LaterField((True,))},  # with a bias (before NFNet's skipinit gain)
    # the weight itself, the module's whole tensor (before EfficientViM's σ(α[i]) gates, rows of one α)
    "layer_scale": {"sigmoid": LaterField((False,)), "weight_rows": _NONE},
    "attention_pool": {"patch": _NONE},  # a pool over the whole map (before MobileViTv2)
    "space_to_depth": {"order": LaterField(("hw",))},  # ONNX's order (before Swin's patch merging)
    # attention over the whole map, no bias table (LeViT), windows (Swin), talking heads (EfficientFormerV2), grid
    # (MaxViT) or rows of a shared table (EfficientViT-MSRA)
    "attention": {"bias_offsets": _NONE, "bias_index": _NONE, "bias_table": _NONE, "window": _NONE, "shift": _NONE,
                  "talking_heads": LaterField((None, False)), "dilated": LaterField((False,)), "bias_rows": _NONE,
                  "talking_linear": LaterField((False,)),  # talking heads stored as 1×1 convs (before CaiT's Linears)
                  "gated_pos": LaterField((False,)),  # no gated positions (before ConViT's GPSA)
                  "cosine": LaterField((None, False)),  # dot-product scores (before Swin V2's cosine attention)
                  "rel_pos": _NONE, "rel_dim": _NONE, "rel_scaled": LaterField((False,)),  # BotNet's logits
                  "rel_mvit": LaterField((False,)),  # read at key − query (before MViTv2's / SAM's query − key)
                  "rel_prefix": _NONE, "rel_query": _NONE, "rel_key": _NONE,  # q, k maps (before MViTv2's class token)
                  "halo_blocks": _NONE, "halo": _NONE,  # HaloNet's blocks
                  "bias_mlp": _NONE,  # a learned bias table (before RelPosMlp's MLP of the offsets)
                  "bias_mlp_form": _NONE, "bias_mlp_span": _NONE},  # RelPosMlp's MLP (before Swin V2's)
    "class_token": {"tokens": LaterField((1,), **_KEPT)},  # one prepended token, weight (ch,)
    "token": {"count": LaterField((1,), **_KEPT)},  # one token picked
    # a learned embedding; its module stores it in map order (before NesT's block by block), channels first (before
    # VOLO's (1, H, W, C)); one per position of the map (before TNT's, one per position of every window)
    "pos_embed": {"frozen": LaterField((False,), **_KEPT), "block": _NONE, "channels_last": LaterField((False,)),
                  "tile": _NONE, "resize": _NONE},
    "pad": {"mode": LaterField(("constant",), **_KEPT)},
    # XCA: q and k L2-normalised, a learned per-head temperature (before DaViT's fixed scale, no normalisation)
    "channel_attention": {"normalize": LaterField((True,)), "scale": _NONE},
    # local position lambdas (before lambda_resnet26rpt's relative embedding, with which r is left out)
    "lambda_layer": {"rel_pos": _NONE, "r": _NONE},
    "upsample": {"mode": LaterField(("nearest",), **_KEPT), "align_corners": LaterField((False,), **_KEPT)},
}


def at_default(op: str, key: str, value: Any, stored: bool) -> bool:
    """Whether a node's field is a later field at its default, left out of the stored form (`stored`) or the normal
    form."""
    later = LATER_FIELDS.get(op, {}).get(key)
    return later is not None and (stored or not later.in_normal_form) and \
        any(type(value) is type(absent) and value == absent for absent in later.absent)


def drop_defaults(node: dict[str, Any]) -> None:
    """Leave out, in place, a normalised node's later fields at their default that the normal form does not keep."""
    for key in [k for k, v in node.items() if at_default(node["op"], k, v, stored=False)]:
        del node[key]


def stored_form(arch: dict[str, Any]) -> dict[str, Any]:
    """A validated spec as a file stores it: every later field at its default left out (as an attention without a
    bias has no bias fields), so a file that uses none of them is read by an edgecl from before they existed and
    `spec.validate` reads it back as the same spec."""
    nodes = [{k: v for k, v in node.items() if not at_default(node["op"], k, v, stored=True)} for node in arch["nodes"]]
    return {**arch, "nodes": share_tables(nodes)}  # and a rotary table repeated, once (`rotary_ops`)
