"""ShuffleNet's channel shuffle in a user's forward, for `fx_import._Converter`: ``x.view(b, g, c // g, h, w)``, then
``torch.transpose(x, 1, 2)`` (``.contiguous()``), then ``x.view(b, c, h, w)`` becomes one ``shuffle`` node. The
five-dimensional values in between have no spec node: each fx node is remembered with the map it came from
(`grouped`), and anything else done to one is refused by name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from edgecl.arch.fx_calls import VIEWS, shape_of
from edgecl.errors import UsageError

TRANSPOSES = (torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")
PATTERN = "view(b, g, c // g, h, w) → transpose(1, 2) → view(b, c, h, w)"


@dataclass(frozen=True)
class _Grouped:
    source: str  # the spec node of the (c, h, w) map
    shape: list[int]  # that map's (c, h, w)
    groups: int
    transposed: bool


class _ShuffleConverter:
    """Mixin of `fx_import._Converter`: the steps of a channel shuffle."""

    alias: dict[fx.Node, str]
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]

    def init_shuffles(self) -> None:
        self.grouped: dict[fx.Node, _Grouped] = {}

    def group_channels(self, node: fx.Node, x: str) -> bool:
        """A view of a (c, h, w) map as (g, c/g, h, w): the first step of a shuffle. False for any other view."""
        before, after = shape_of(node.args[0]), shape_of(node)
        if before is None or len(before) != 3 or after is None or len(after) != 4 or \
                after[0] * after[1] != before[0] or after[2:] != before[1:]:
            return False
        self.grouped[node] = _Grouped(x, before, after[0], False)
        return True

    def shuffle_step(self, node: fx.Node) -> None:
        """An op reading a grouped value: the transpose, a contiguous, or the view back (the shuffle itself)."""
        source = node.args[0] if node.args else None
        state = self.grouped.get(source)
        if state is None or any(a in self.grouped for a in node.all_input_nodes if a is not source):
            raise self._not_a_shuffle(node)
        target = node.target
        if target in TRANSPOSES:
            dims = [node.kwargs.get(k, v) for k, v in zip(("dim0", "dim1"), [*node.args[1:3], None, None])]
            if len(node.args) + len(node.kwargs) != 3 or not all(type(d) is int for d in dims) or \
                    sorted(d % 5 for d in dims) != [1, 2]:
                raise self._not_a_shuffle(node)
            self.grouped[node] = _Grouped(state.source, state.shape, state.groups, not state.transposed)
        elif target == "contiguous":
            self.grouped[node] = state
        elif target in VIEWS and shape_of(node) == state.shape:
            if state.transposed and 1 < state.groups < state.shape[0]:
                self._emit(node, "shuffle", [state.source], groups=state.groups)
            else:  # grouped and straight back, or a transpose that moves nothing: the same map
                self.alias[node] = state.source
        else:
            raise self._not_a_shuffle(node)

    def _not_a_shuffle(self, node: fx.Node) -> UsageError:
        return self.refuse(node, f"it reads a grouped view of channels; edgecl follows a channel shuffle written as "
                                 f"{PATTERN}")

    def reads_grouped(self, node: fx.Node) -> bool:
        return any(a in self.grouped for a in node.all_input_nodes)

    def refuse_grouped_output(self, result: Any) -> None:
        if isinstance(result, fx.Node) and result in self.grouped:
            raise self.refuse(result, f"forward returns a grouped view of channels; a shuffle ends as {PATTERN}")
