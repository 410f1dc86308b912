"""``torch.mean(torch.stack(xs, dim=0), dim=0)`` in a user's forward, for `fx_import._Converter`: the mean of n
tensors of one shape, as CrossViT averages its branches' classifiers. It becomes their sum (``add`` nodes) times 1/n
(a ``scale``), the form `fx_classifier` reads as an average of classifiers. A stack read any other way (another dim,
keepdim, another reader) is refused by name with the user's source line."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from edgecl.arch.fx_calls import shape_of
from edgecl.errors import UsageError

_STACKS = (torch.stack,)
_MEANS = (torch.mean, "mean")


class _StackConverter:
    """Mixin of `fx_import._Converter`: the mean of a stack along a new first axis."""

    alias: dict[fx.Node, str]
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]

    def stack_mean_step(self, node: fx.Node) -> bool:
        """Convert `node` when it is such a stack or its mean; False when it is neither."""
        if node.op == "call_function" and node.target in _STACKS:
            self._stack_mean(node)
            return True
        first = node.args[0] if node.args else None
        if node.target in _MEANS and isinstance(first, fx.Node) and first.target in _STACKS:
            self.alias[node] = self.alias[first]  # `_stack_mean` checked this reader
            return True
        return False

    def _stack_mean(self, node: fx.Node) -> None:
        tensors = node.kwargs.get("tensors", node.args[0] if node.args else ())
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        users = list(node.users)
        mean = users[0] if len(users) == 1 and users[0].target in _MEANS else None
        mean_dim = None if mean is None else mean.kwargs.get("dim", mean.args[1] if len(mean.args) > 1 else None)
        keep = mean is not None and (mean.kwargs.get("keepdim", mean.args[2] if len(mean.args) > 2 else False) or
                                     "dtype" in mean.kwargs)
        shapes = [shape_of(t) for t in tensors] if isinstance(tensors, (list, tuple)) else []
        if dim != 0 or mean is None or mean_dim not in (0, (0,), [0]) or keep or len(shapes) < 2 or \
                None in shapes or any(s != shapes[0] for s in shapes):
            raise self.refuse(node, "a torch.stack; edgecl supports torch.mean(torch.stack(xs, dim=0), dim=0) of "
                                    "tensors of one shape (the average of n tensors), read by that mean alone")
        total = self._input(tensors[0], node)
        for i, t in enumerate(tensors[1:]):
            total = self._emit(node, "add", [total, self._input(t, node)], f"{node.name}.sum{i}")
        self._emit(node, "scale", [total], factor=1.0 / len(tensors), offset=0.0)
