"""A traced module's values by state-dict key, for reading its weights (`fx_import.tensors_of`, ``--init-weights
module``: `edgecl.train.initial`): its state dict, plus the tensors a spec holds that the module computes from
several of its own at inference (timm's Swin V2 attention: its qkv bias and its position-bias table,
`fx_swin_v2.swin_v2_values`)."""
from __future__ import annotations

from typing import Any

from edgecl.arch.fx_swin_v2 import swin_v2_values


def module_values(module: Any) -> dict[str, Any]:
    """`module.state_dict()` with the derived tensors under the keys the spec names them by (which the state dict
    lacks, or holds in another shape: V2-CR's logit scale)."""
    values = dict(module.state_dict())
    for path, layer in getattr(module, "named_modules", lambda: ())():
        values.update(swin_v2_values(path, layer))
    return values
