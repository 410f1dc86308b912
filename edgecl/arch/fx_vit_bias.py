"""What BEiT's and timm's relative-position ViT's attentions add to a ViT's (`fx_attention`), as the fields of the
qkv conv and of the ``attention`` node:

- BEiT's (and EVA's, `fx_eva`) qkv bias: a bias-less ``qkv`` Linear and ``torch.cat((q_bias, k_bias, v_bias))``
  added in its forward, ``k_bias`` a zero buffer → the conv's ordinary bias, stored in the module as ``q_bias``, a
  fixed zero and ``v_bias`` (``bias_parts``, `edgecl.arch.bias_parts`);
- a relative position bias from a learned table ``(offsets, heads)`` gathered by a fixed index of the token pairs,
  the class token's rows and column included (BEiT's ``relative_position_bias_table`` and
  ``relative_position_index``; timm's ``RelPosBias`` as the attention's ``rel_pos``) → the attention's bias table in
  Swin's layout (``bias_table`` "swin", ``module`` the layer holding the table).

- timm's ``RelPosMlp`` (its default, mode "cr": an MLP of the token grid's log-spaced offsets) → the attention's
  ``bias_table`` "mlp" (`edgecl.arch.mlp_bias`), its weights the spec's tensors under ``rel_pos.mlp``.

Refused by name: a table built for another number of tokens, a k_bias that is learned or not zero, and a RelPosMlp
of another mode or padded for class tokens (zero rows the offsets' table has none for).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgecl.arch.fx_maxvit import rel_pos_mlp_fields
from edgecl.errors import UsageError

_BEIT = ("timm.models.beit", "Attention")
# q_bias, k_bias (zero), v_bias beside a bias-less qkv (Swin V2's: as EVA's under RoPE, `fx_eva.fused_rows`)
_SEPARATE_BIASES = (_BEIT, ("timm.models.eva", "EvaAttention"), ("timm.models.swin_transformer_v2", "WindowAttention"))
_RELPOS = "timm.layers.pos_embed_rel"


def qkv_bias_fields(model: str, where: str, m: nn.Module) -> dict[str, Any]:
    """The qkv conv's bias fields for BEiT's (and EVA's) separate q and v biases; {} where the qkv Linear holds its
    own (or none)."""
    q_bias = getattr(m, "q_bias", None)
    if (type(m).__module__, type(m).__name__) not in _SEPARATE_BIASES or q_bias is None:
        return {}
    width = m.qkv.out_features // 3
    k_bias = getattr(m, "k_bias", None)
    if m.qkv.bias is not None or "k_bias" in m._parameters or not isinstance(k_bias, torch.Tensor) or \
            bool(k_bias.detach().ne(0).any()):
        raise UsageError(f"{model}: {where}: its qkv bias is not BEiT's (q_bias and v_bias on a bias-less qkv, a "
                         "k_bias buffer of zeros); edgecl converts that one")
    if any(tuple(t.shape) != (width,) for t in (q_bias, k_bias, m.v_bias)):
        raise UsageError(f"{model}: {where}: q_bias, k_bias and v_bias of shapes {tuple(q_bias.shape)}, "
                         f"{tuple(k_bias.shape)}, {tuple(m.v_bias.shape)} do not split qkv's {3 * width} outputs")
    return {"bias": True, "bias_parts": ["q_bias", None, "v_bias"]}


def relative_bias_fields(model: str, where: str, m: nn.Module, path: str, tokens: int) -> dict[str, Any]:
    """The attention's bias fields for a relative position bias table; {} without one; for RelPosMlp, with the
    token ``grid`` (H, W) its offsets span, which `fx_attention` reshapes the tokens to."""
    if (type(m).__module__, type(m).__name__) == _BEIT:
        holder, table_path = m, path
    else:
        holder, table_path = getattr(m, "rel_pos", None), f"{path}.rel_pos"
        kind = (type(holder).__module__, type(holder).__name__)
        if kind == (_RELPOS, "RelPosMlp"):  # timm's default: its MLP over the token grid's offsets, kept whole
            grid = [int(s) for s in holder.window_size]
            if grid[0] * grid[1] != tokens:
                raise UsageError(f"{model}: {where}: its RelPosMlp over a {grid[0]}×{grid[1]} grid pads its bias "
                                 f"for {tokens - grid[0] * grid[1]} class or prefix tokens; edgecl converts it "
                                 "without them (class_token=False) or a learned table (rel_pos_type='bias')")
            return {"module": table_path, "grid": grid, **rel_pos_mlp_fields(model, where, holder, grid)}
        if holder is not None and kind != (_RELPOS, "RelPosBias"):
            raise UsageError(f"{model}: {where}: its rel_pos is a {kind[1]}; edgecl converts timm's RelPosBias")
    table = getattr(holder, "relative_position_bias_table", None)
    if table is None:
        return {}
    index = holder.relative_position_index.detach().reshape(-1)
    offsets, heads = table.shape
    if index.numel() != tokens * tokens or heads != m.num_heads or int(index.min()) < 0 or \
            int(index.max()) >= offsets:
        raise UsageError(f"{model}: {where}: its relative position bias (a table of {tuple(table.shape)}, an index "
                         f"of {index.numel()} token pairs) is not one of {m.num_heads} heads over its {tokens} "
                         "tokens; build the model for the input size it runs on (img_size)")
    return {"module": table_path, "bias_offsets": int(offsets), "bias_index": index.reshape(tokens, tokens).tolist(),
            "bias_table": "swin"}
