"""SwiftFormer's efficient additive attention (timm's ``timm.models.swiftformer.EfficientAdditiveAttention``,
swiftformer_*) in a user's network, for `fx_import._Converter`. The tracer keeps it whole (it flattens the map to
tokens, multiplies by a bare parameter with ``@`` and sums over the tokens, which the spec has no values for); on
the (C, H, W) map it reads it becomes

    q = ``normalize`` (L2 over the channels) of to_query (1×1 conv: the Linear); k likewise of to_key →
    s = q · w_g (a bias-less 1×1 conv to one channel, its weight the module's bare ``w_g`` parameter: ``module``
    ``PATH.w_g=``) → ``scale`` by scale_factor → ``normalize`` over the map (the one-channel scores over the
    tokens) → g = Σ over the positions of s·q (``mul``, ``gap``, ``scale`` by H·W) → proj (1×1 conv) of g·k (``mul``) →
    ``add`` q → final (1×1 conv)

Layers other than timm's ``nn.Linear``s of the module's widths in their places are refused by name with the user's
source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError

_SWIFTFORMER = ("timm.models.swiftformer", "EfficientAdditiveAttention")


def is_swiftformer_attention(m: Any) -> bool:
    """SwiftFormer's EfficientAdditiveAttention, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == _SWIFTFORMER


class _SwiftFormerConverter:
    """Mixin of `fx_import._Converter`: SwiftFormer's additive attention, kept whole."""

    name: str
    _emit: Callable[..., str]

    def swiftformer_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"SwiftFormer EfficientAdditiveAttention at {path!r} {location(node)}"
        ch, height, width = map_shape(node, self.name, where)
        inner = int(m.w_g.shape[0])
        widths = {"to_query": (ch, inner), "to_key": (ch, inner), "proj": (inner, inner),
                  "final": (inner, m.final.out_features)}
        for part, (n_in, n_out) in widths.items():
            layer = getattr(m, part)
            if type(layer) is not nn.Linear or (layer.in_features, layer.out_features) != (n_in, n_out) or \
                    tuple(m.w_g.shape) != (inner, 1):
                raise UsageError(f"{self.name}: {where}: {part} is {layer!r} (w_g {tuple(m.w_g.shape)}); edgecl "
                                 f"converts timm's nn.Linear of {n_in} to {n_out} features there (w_g ({inner}, 1))")
        q = self._normalized(node, m.to_query, x, f"{path}.to_query")
        k = self._normalized(node, m.to_key, x, f"{path}.to_key")
        score = self._emit(node, "conv", [q], f"{path}.w_g", **{"in": inner, "out": 1, "k": [1, 1], "bias": False,
                                                                 "module": f"{path}.w_g=", "module_shape": [inner, 1]})
        score = self._emit(node, "scale", [score], f"{path}.scaled", factor=float(m.scale_factor))
        score = self._emit(node, "normalize", [score], f"{path}.over_tokens", over="map")
        pooled = self._emit(node, "gap", [self._emit(node, "mul", [score, q], f"{path}.weighted")], f"{path}.mean")
        pooled = self._emit(node, "scale", [pooled], f"{path}.sum", factor=float(height * width))
        out = self._emit(node, "conv", [self._emit(node, "mul", [pooled, k], f"{path}.gated")], f"{path}.proj",
                         **pointwise(m.proj))
        out = self._emit(node, "add", [out, q], f"{path}.add_query")
        self._emit(node, "conv", [out], f"{path}.final", **pointwise(m.final))

    def _normalized(self, node: fx.Node, linear: nn.Linear, x: str, path: str) -> str:
        """A Linear over the map's channels, then each position's vector L2-normalised (``F.normalize(dim=-1)``)."""
        return self._emit(node, "normalize", [self._emit(node, "conv", [x], path, **pointwise(linear))],
                          f"{path}.normalize")
