"""A traced module's values by state-dict key, for reading its weights into a spec (`fx_import.tensors_of`,
``--init-weights module``: `edgecl.train.initial`): its state dict, plus, for a spec of the earlier Swin V2 form, the
tensors it held that the module computes from several of its own at inference."""
from __future__ import annotations

from typing import Any

import torch

from edgecl.arch.spec import Arch

_V2, _CR = "timm.models.swin_transformer_v2", "timm.models.swin_transformer_v2_cr"


def module_values(module: Any, arch: Arch) -> dict[str, Any]:
    """`module.state_dict()`, with each earlier-form Swin V2 attention's derived tensors (`_table_form_values`) under
    the keys its spec names them by (which the state dict lacks, or holds in another shape: V2-CR's logit scale)."""
    values = dict(module.state_dict())
    earlier = {n.get("module", n["name"]) for n in arch["nodes"]
               if n["op"] == "attention" and n.get("cosine") and n.get("bias_table") == "swin"}
    for path, layer in getattr(module, "named_modules", lambda: ())() if earlier else ():
        if path in earlier:
            values.update(_table_form_values(path, layer))
    return values


def _table_form_values(path: str, m: Any) -> dict[str, torch.Tensor]:
    """What `from_torch` before `edgecl.arch.mlp_bias`'s Swin V2 forms (commit edb2fc8) made a timm Swin V2 attention
    at `path` hold: its position bias as the ``relative_position_bias_table`` it computes, ``(offsets, heads)``
    (V2: 16·sigmoid(cpb_mlp(relative_coords_table)); V2-CR: meta_mlp(relative_coordinates_log), a row per pair), its
    ``qkv.bias`` cat(q_bias, k_bias, v_bias) (V2 with a qkv bias), and V2-CR's logit scale as ``(heads, 1, 1)``."""
    kind = (type(m).__module__, type(m).__name__)
    with torch.no_grad():
        if kind == (_CR, "WindowMultiHeadAttention"):
            return {f"{path}.relative_position_bias_table": m.meta_mlp(m.relative_coordinates_log),
                    f"{path}.logit_scale": m.logit_scale.reshape(-1, 1, 1)}
        if kind != (_V2, "WindowAttention"):
            return {}
        out = {f"{path}.relative_position_bias_table":
               16 * torch.sigmoid(m.cpb_mlp(m.relative_coords_table).view(-1, m.num_heads))}
        if m.q_bias is not None:
            out[f"{path}.qkv.bias"] = torch.cat((m.q_bias, m.k_bias, m.v_bias))
    return out
