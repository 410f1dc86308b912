"""TResNet's space-to-depth stem (timm's ``SpaceToDepth``) in a user's network, for `fx_import._Converter`. The tracer
keeps the module whole (its forward goes through a 6-D view and a permute, which the spec has no values for); it
becomes one ``space_to_depth`` node, whose channel order ((bh·bs + bw)·C + c) is the module's and ONNX's
SpaceToDepth's. A map whose sides the block does not divide is refused by name with the user's source line."""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, shape_of
from edgecl.errors import UsageError

SPACE_TO_DEPTH = ("timm.layers.space_to_depth", "SpaceToDepth")


def is_space_to_depth(m: Any) -> bool:
    """timm's SpaceToDepth (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == SPACE_TO_DEPTH


class _SpaceToDepthConverter:
    """Mixin of `fx_import._Converter`: SpaceToDepth modules kept whole by the tracer."""

    name: str
    _emit: Callable[..., str]

    def space_to_depth(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        shape, block = shape_of(node.args[0]), int(m.bs)
        if shape is None or len(shape) != 3 or shape[1] % block or shape[2] % block:
            raise UsageError(f"{self.name}: SpaceToDepth at {path!r} {location(node)} needs a (channels, height, "
                             f"width) map whose sides its block {block} divides, gets {shape}")
        self._emit(node, "space_to_depth", [x], path, block=block)
