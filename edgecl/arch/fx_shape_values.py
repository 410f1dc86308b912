"""The example values a shape-specialised trace keeps between decisions: only those later decisions may still need.

`ShapeFlowTracer` answers each decision by running the graph traced so far on example inputs (batches 1, 2 and 3)
and keeps what it computed, so the next decision runs only the nodes traced since. Kept whole, those values are
every activation up to the last decision at three batch sizes until the trace ends (torchvision's vit_b_16 at
224×224: 548 MB held, the import's peak RSS +596 MB; now 87 MB held, +171 MB, as at the floor `keep_reachable=False`
gives; `tools/bench_trace_memory.py`). A later node can read a value only through a proxy the model's Python code
still holds, or as the input of a node already traced but not yet run; any other tensor is replaced by a meta tensor
of its shape and dtype (`ExampleValues.release`), which is all the tracer's checks read of an input (a tensor or not,
its shape, its dtype). A value released and then needed after all (a proxy dropped, the node reached again through
the graph) is recomputed from its inputs (`Known` leaves it out), so what the tracer decides never depends on what
was released.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch import fx

_COMPUTED = ("call_function", "call_method", "call_module")  # placeholders and parameters cost nothing to keep


class ExampleValues:
    """The values of one example batch (`env`, the fx.Interpreter's environment) and which of them are released."""

    def __init__(self, holders: dict[fx.Node, list[weakref.ref]]) -> None:
        self.env: dict[fx.Node, Any] = {}
        self.released: set[fx.Node] = set()
        self.holders = holders  # node → the proxies through which the model's code can still reach it
        self._held: set[fx.Node] = set()  # values that are (or hold) real tensors

    def known(self, node: fx.Node) -> bool:
        """Whether `node`'s real value is at hand (computed and not released)."""
        return node in self.env and node not in self.released

    def store(self, node: fx.Node, value: Any) -> None:
        self.env[node] = value
        self.released.discard(node)
        if node.op in _COMPUTED and _holds_tensors(value):
            self._held.add(node)

    def release(self, nodes: Iterable[fx.Node] | None = None, *, keep_reachable: bool = True) -> None:
        """Release the tensors among `nodes` (every held one by default) that no later node can read: every user
        has run and, with `keep_reachable`, no proxy of the model's code refers to the node (without: the memory
        floor, a value the code reads again is recomputed)."""
        for node in list(self._held if nodes is None else nodes):
            if node not in self._held or any(u not in self.env for u in node.users):
                continue
            if keep_reachable and any(ref() is not None for ref in self.holders.get(node, ())):
                continue
            self.env[node] = _meta(self.env[node])
            self.released.add(node)
            self._held.discard(node)


class Known:
    """The nodes whose real value an `ExampleValues` holds, as a container (what `_ancestors` stops at)."""

    def __init__(self, values: ExampleValues) -> None:
        self.values = values

    def __contains__(self, node: object) -> bool:
        return self.values.known(node)  # type: ignore[arg-type]


def hold(holders: dict[fx.Node, list[weakref.ref]], node: fx.Node, proxy: Any) -> None:
    """Record that `proxy`, while it lives, can make `node` the input of a node traced later."""
    holders.setdefault(node, []).append(weakref.ref(proxy))


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a tuple or list with tensors (a split's parts); other containers are kept as they are."""
    return isinstance(value, torch.Tensor) or type(value) in (tuple, list) and any(
        isinstance(v, torch.Tensor) for v in value)


def _meta(value: Any) -> Any:
    """`value` (`_holds_tensors`) with its tensors as meta tensors of the same shape and dtype."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return type(value)(_meta(v) if isinstance(v, torch.Tensor) else v for v in value)
