"""GCNet's global context block (timm's ``GlobalContext``, `gcresnet*`, `gcresnext*`) in a user's network, for
`fx_import._Converter`. The tracer keeps the module whole (its forward reshapes the map to (B, C, H·W) and multiplies
by the softmax of the logits, values the spec has no nodes for); it becomes what it computes:

    context = attention_pool(x, conv_attn(x))      (``use_attn``; else gap(x))
    x · gate(fc2(act(norm(fc1(context)))))           (``fuse_scale``: ConvMlp ``mlp_scale``)
    + fc2(act(norm(fc1(context))))                   (``fuse_add``: ConvMlp ``mlp_add``, broadcast over the map)

Every tensor node is named by its module path, so the module's weights read as they are; the norm is timm's
LayerNorm2d (a ``layer_norm`` over the channels) or none. Variants these ops do not compute are refused by name with
the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError

GLOBAL_CONTEXT = ("timm.layers.global_context", "GlobalContext")
_CONV_MLP = ("timm.layers.mlp", "ConvMlp")
_LAYER_NORM_2D = {("timm.layers.norm", "LayerNorm2d")}


def is_global_context(m: Any) -> bool:
    """timm's GlobalContext (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == GLOBAL_CONTEXT


class _GlobalContextConverter:
    """Mixin of `fx_import._Converter`: GlobalContext modules kept whole by the tracer."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]  # `fx_split_attn`'s: a plain nn.Conv2d, named by its path
    _act: Callable[..., str]

    def global_context(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"GlobalContext at {path!r} {location(node)}"
        map_shape(node, self.name, where)
        if m.conv_attn is not None:
            conv = m.conv_attn
            if conv.out_channels != 1 or tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or \
                    conv.groups != 1:
                raise UsageError(f"{self.name}: {where}: conv_attn must be a 1×1 conv to one channel (has "
                                 f"{conv.out_channels} channels, kernel {tuple(conv.kernel_size)})")
            logits = self._conv(node, conv, x, f"{path}.conv_attn", where)
            context = self._emit(node, "attention_pool", [x, logits], f"{path}.pool")
        else:
            context = self._emit(node, "gap", [x], f"{path}.pool")
        out = x
        if m.mlp_scale is not None:
            gate = self._act(node, m.gate, self._mlp(node, m.mlp_scale, context, f"{path}.mlp_scale", where),
                              f"{path}.gate", where)
            out = self._emit(node, "mul", [x, gate], path if m.mlp_add is None else f"{path}.scaled")
        if m.mlp_add is not None:
            out = self._emit(node, "add", [out, self._mlp(node, m.mlp_add, context, f"{path}.mlp_add", where)], path)
        self.alias[node] = out

    def _mlp(self, node: fx.Node, mlp: nn.Module, x: str, path: str, where: str) -> str:
        """timm's ConvMlp: fc1 → norm (LayerNorm2d or none) → act → dropout (an identity) → fc2."""
        if (type(mlp).__module__, type(mlp).__name__) != _CONV_MLP:
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(mlp).__name__}; edgecl converts timm's "
                             "ConvMlp there")
        hidden = self._conv(node, mlp.fc1, x, f"{path}.fc1", where)
        norm = mlp.norm
        if (type(norm).__module__, type(norm).__name__) in _LAYER_NORM_2D:
            if (norm.weight is None) != (norm.bias is None):
                raise UsageError(f"{self.name}: {where}: {path}.norm has a weight but no bias (or the reverse); not "
                                 "supported")
            hidden = self._emit(node, "layer_norm", [hidden], f"{path}.norm", ch=int(norm.normalized_shape[0]),
                                eps=float(norm.eps), affine=norm.weight is not None)
        elif not isinstance(norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: norm {type(norm).__name__} at {path}.norm is not supported "
                             "(timm's LayerNorm2d or none)")
        if not isinstance(mlp.drop, (nn.Identity, nn.Dropout)):
            raise UsageError(f"{self.name}: {where}: {path}.drop is a {type(mlp.drop).__name__}, not a dropout")
        hidden = self._act(node, mlp.act, hidden, f"{path}.act", where)
        return self._conv(node, mlp.fc2, hidden, f"{path}.fc2", where)
