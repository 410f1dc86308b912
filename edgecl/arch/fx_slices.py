"""Channel slices in a user's forward, for `fx_import._Converter`: ``x[:, a:b]`` and the parts of
``torch.split`` / ``chunk`` along channels become the spec's ``slice`` nodes (a no-op slice becomes nothing). A
split's parts are a tuple, not a tensor: each part's range is remembered (`parts`) and emitted where ``parts[i]``
or ``torch.cat(parts)`` reads it. Part widths and computed bounds are read off the traced shapes, so sizes computed
in forward (``x.shape[1] // 2``) work. A split of a channels-last value (tokens ``(B, T, C)`` or a map after
``permute(0, 2, 3, 1)``) along its last axis is the same split of the channels (gMLP's ``x.chunk(2, dim=-1)``,
MambaOut's ``torch.split(x, [g, i, c], dim=-1)``): the same slices, their values channels-last too."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx

from edgecl.arch.fx_calls import shape_of
from edgecl.errors import UsageError

SPLITS = {torch.split: "split", "split": "split", torch.chunk: "chunk", "chunk": "chunk"}


class _SliceConverter:
    """Mixin of `fx_import._Converter` (beside `fx_calls._CallConverter`, whose `refuse`, and the converter's
    `_emit` and `_input`, it uses): the converters of slices and splits."""

    alias: dict[fx.Node, str]
    last: set[fx.Node]
    parts: dict[fx.Node, tuple[str, int, list[tuple[int, int]]]]  # a split → (its input, channels, part ranges)
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]

    def split(self, node: fx.Node) -> bool:
        """torch.split / chunk along channels (a tuple of tensors): remember each part's channel range, emitted as a
        slice where an ``x[i]`` reads it. The parts' widths are the traced ones, so sizes computed in forward
        (``x.shape[1] // 2``) are fine. False for anything else."""
        if node.target is operator.getitem and node.args[0] in self.parts:  # parts[1:]: some of the parts
            self.index(node)
            return True
        kind = SPLITS.get(node.target)
        if kind is None or node.op not in ("call_function", "call_method"):
            return False
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        shape = shape_of(node.args[0])
        last = node.args[0] in self.last
        self._channel_axis(node, dim, shape, last)
        metas = node.meta.get("tensor_meta")
        if not isinstance(metas, (tuple, list)) or not all(hasattr(m, "shape") for m in metas):
            raise self.refuse(node, "its parts were not traced as tensors")
        axis = -1 if last else 1  # of the parts' traced shapes, which hold the batch axis; `shape` does not
        sizes = [int(m.shape[axis]) for m in metas]
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.parts[node] = (self._input(node.args[0], node), shape[-1 if last else 0], list(zip(bounds, bounds[1:])))
        if last:
            self.last.add(node)  # its parts are channels-last
        return True

    def index(self, node: fx.Node) -> None:
        """``parts[i]`` of a split, or ``x[:, a:b]`` (``x[:, a:b, :, :]``, ``x[:, a:b, ...]``): one channel slice. A
        bound computed in forward (``x[:, :x.shape[1] // 2]``) is read off the traced width when the other is
        constant."""
        source, index = node.args
        if source in self.parts:
            x, n, ranges = self.parts[source]
            if source in self.last:
                self.last.add(node)
            if isinstance(index, slice):  # parts[1:], parts[::-1]: a tuple of some of the parts
                self.parts[node] = (x, n, ranges[index])
                return
            if not isinstance(index, int) or not -len(ranges) <= index < len(ranges):
                raise self.refuse(node, f"part {index!r} of a split into {len(ranges)}")
            return self._slice(node, x, n, *ranges[index])
        shape = shape_of(source)
        items = list(index) if isinstance(index, tuple) else [index]
        ndim = len(shape or []) + 1
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (ndim - len(items) + 1)
        items += [slice(None)] * (ndim - len(items))
        whole = slice(None)
        if shape is None or len(items) != ndim or not all(isinstance(s, slice) for s in items) or \
                items[0] != whole or any(s != whole for s in items[2:]) or items[1].step not in (None, 1):
            raise self.refuse(node, "only a slice of the channel axis without a step (x[:, a:b]) is supported")
        start, stop = items[1].start, items[1].stop
        n, width = shape[0], shape_of(node)[0]
        if isinstance(stop, fx.Node) and not isinstance(start, fx.Node):
            start = slice(start, None).indices(n)[0]
            stop = start + width
        elif isinstance(start, fx.Node) and not isinstance(stop, fx.Node):
            stop = slice(None, stop).indices(n)[1]
            start = stop - width
        elif isinstance(start, fx.Node) and isinstance(stop, fx.Node):
            raise self.refuse(node, "both bounds of a channel slice are computed in forward")
        start, stop, _ = slice(start, stop).indices(n)
        if stop <= start or stop - start != width:
            raise self.refuse(node, "a channel slice must be a non-empty range")
        self._slice(node, self._input(source, node), n, start, stop)

    def _part(self, node: fx.Node, split: fx.Node, i: int) -> str:
        """Part i of a split read directly (torch.cat(parts)): its slice node, emitted under the reader's name."""
        x, n, ranges = self.parts[split]
        start, stop = ranges[i]
        if (start, stop) == (0, n):
            return x
        return self._emit(node, "slice", [x], f"{node.name}.part{i}", start=start, stop=stop)

    def _slice(self, node: fx.Node, x: str, n: int, start: int, stop: int) -> None:
        if (start, stop) == (0, n):
            self.alias[node] = x
        else:
            self._emit(node, "slice", [x], start=start, stop=stop)

    def _channel_axis(self, node: fx.Node, dim: Any, shape: list[int] | None, last: bool) -> None:
        """The split is along the channels: dim 1, or the last dim of a channels-last value."""
        rank = len(shape or ()) + 1
        if shape is None or type(dim) is not int or dim % rank != (rank - 1 if last else 1):
            where = "the last dim of a channels-last value" if last else "channels (dim 1)"
            raise self.refuse(node, f"a split along dim {dim!r}; only along {where} is supported")
