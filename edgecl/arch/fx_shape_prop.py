"""The traced graph run once on zeros (eval mode, no gradients, the module's state untouched) to record every
node's output shape, which the converters read (`shape_of`), and the sizes some layers are called with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from edgecl.arch.fx_calls import location
from edgecl.arch.fx_shape_flow import evaluating
from edgecl.errors import UsageError

@dataclass(frozen=True)
class TracedShape:
    """A node's traced output shape (batch first), as `shape_of` reads it from ``node.meta["tensor_meta"]``."""

    shape: tuple[int, ...]


class _ShapeProp(fx.Interpreter):
    """Runs the traced graph once and records every tensor's shape, remembering the node it runs, so a model that
    fails on the input shape is reported at the user's line. (torch's ShapeProp records more, and prints a
    traceback to stderr before it re-raises.)"""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        found = False

        def shape(value: Any) -> Any:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return TracedShape(tuple(value.shape))
            return value

        meta = fx.node.map_aggregate(result, shape)
        if found:  # scalars (sizes) and other values keep no shape
            n.meta["tensor_meta"] = meta
        elif isinstance(result, int):  # a size, read by layers called with sizes (`fx_xcit`)
            n.meta["value"] = result
        elif isinstance(result, (tuple, list)) and result and all(isinstance(v, int) for v in result):
            n.meta["value"] = tuple(result)  # sizes (``x.shape[-2:]``), passed to MViTv2's blocks (`fx_mvit`)
        return result


def propagate_shapes(traced: fx.GraphModule, shape: list[int]) -> None:
    """Each node's traced output shape in ``node.meta`` (`shape_of` reads it), from one run on zeros; a model that
    does not run on the shape is refused at the user's line."""
    prop = _ShapeProp(traced)
    try:
        with torch.no_grad(), evaluating(traced):
            prop.run(torch.zeros(2, *shape))
    except Exception as exc:  # the model's own error, at the node that raised it
        where = f" {location(prop.current)}" if prop.current is not None else ""
        reason = str(exc).split("\n\nWhile executing")[0]  # torch.fx appends the graph node and a traceback
        raise UsageError(f"the model does not run on inputs of shape {tuple(shape)}{where}: {type(exc).__name__}: "
                         f"{reason[:300]}") from None


def built_for_hint(module: torch.nn.Module, shape: list[int]) -> str:
    """Where a timm model that does not run on `shape` was built for another input size (its ``pretrained_cfg``
    input size; ViTs, VOLO, GC ViT... fix their embeddings and windows to it at build time): how to build it for
    this one. Empty otherwise."""
    size = (getattr(module, "pretrained_cfg", None) or {}).get("input_size")
    if not isinstance(size, (tuple, list)) or len(size) != 3 or list(size[1:]) == list(shape[1:]):
        return ""
    side = shape[1] if len(shape) == 3 and shape[1] == shape[2] else tuple(shape[1:])
    return (f"; timm built this model for {size[1]}×{size[2]} inputs: build it for yours where its factory takes "
            f"img_size (timm.create_model(name, img_size={side}), `--arch-arg img_size={side}`)")
