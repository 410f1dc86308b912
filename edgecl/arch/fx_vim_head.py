"""EfficientViM's classifier (timm's ``EfficientViM.forward_head``), for `fx_import._Converter`: each pooled
feature (the stages' hidden states, the last map) gets its own ``nn.Linear`` head, and the logits are their sum
weighted by the softmax of one learned vector::

    weights = self.weights.softmax(-1)
    logits = [weights[i] * head(x[i]) for i, head in enumerate(self.heads)]
    return torch.stack(logits).sum(0)

That is one linear layer of the features side by side: Σ_i s_i·(W_i·x_i + b_i) = [s_0·W_0 … s_n·W_n]·cat(x) + Σ_i
s_i·b_i; and every linear layer of cat(x) is one of these (all s_i = 1/n, the W_i and b_i scaled by n). So the
pattern becomes a ``cat`` of the features the heads read and a ``linear`` of it, the classifier `fx_classifier`
then drops: edgecl's heads read the features side by side. The softmax, its items and the products emit nothing
until the sum; any other use of them, heads out of order, a head read twice or reading another tensor than
features are refused by name with the model's source line."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_calls import location, shape_of
from edgecl.errors import UsageError


class _VimHeadConverter:
    """Mixin of `fx_import._Converter`: EfficientViM's softmax-weighted sum of heads, as one linear classifier."""

    name: str
    alias: dict[fx.Node, str]
    attrs: dict[fx.Node, str]
    modules: dict[str, nn.Module]
    module: nn.Module
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]

    def vim_head_step(self, node: fx.Node) -> bool:
        """Follow the weighted sum of heads; False for a node that is no part of it."""
        state = self.__dict__.setdefault("_vim_head", {"softmax": {}, "items": {}, "terms": {}, "stacks": {},
                                                       "features": {}})
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "call_method" and node.target == "softmax" and args and args[0] in self.attrs and \
                self.attrs[args[0]] in _HEADS and _is_efficientvim(self.module):
            if node.args[1:] not in ((-1,), (0,)) or len(getattr(self.module, self.attrs[args[0]]).shape) != 1:
                raise self._head_refused(node, "its weights' softmax must run over its one axis")
            state["softmax"][node] = _HEADS[self.attrs[args[0]]]
            return True
        if node.op == "call_function" and node.target is operator.getitem and args[:1] and \
                args[0] in state["softmax"]:
            state["items"][node] = (state["softmax"][args[0]], int(node.args[1]))
            return True
        if node.op == "call_function" and node.target is operator.mul and any(a in state["items"] for a in args):
            item, head = (args if args[0] in state["items"] else args[::-1]) if len(args) == 2 else (None, None)
            if head is None or head in state["items"] or not _is_head(self.modules, head, *state["items"][item]):
                raise self._head_refused(node, f"weights {state['items'].get(item)} must multiply the output of "
                                               "heads[i] (an nn.Linear on pooled features), i the same")
            state["terms"][node] = head
            return True
        if node.op == "call_function" and node.target is torch.stack and node.args and \
                any(t in state["terms"] for t in node.args[0]):
            terms = list(node.args[0])
            if any(t not in state["terms"] for t in terms) or node.args[1:] not in ((), (0,)) or \
                    node.kwargs.get("dim", 0) != 0:
                raise self._head_refused(node, "torch.stack must take the weighted heads alone, on a new axis 0")
            state["stacks"][node] = [state["terms"][t] for t in terms]
            return True
        if node.op == "call_method" and node.target == "sum" and args and args[0] in state["stacks"]:
            if node.args[1:] != (0,) or node.kwargs:
                raise self._head_refused(node, "the stacked logits must be summed over axis 0")
            self._vim_heads(node, state["stacks"][args[0]], state["features"])
            return True
        if any(a in state["items"] or a in state["terms"] or a in state["stacks"] or a in state["softmax"]
               for a in args):
            raise self._head_refused(node, "its weighted heads are summed with torch.stack(…).sum(0) and read "
                                           "nowhere else")
        return False

    def _vim_heads(self, node: fx.Node, heads: list[fx.Node], cats: dict[tuple[str, ...], str]) -> None:
        """The cat of the features the heads read (in the heads' order, each head once, all of them; one cat for
        the distilled pair, whose average `fx_classifier` reads as one classifier) and the one linear layer of it
        that `fx_classifier` drops."""
        prefix = str(heads[0].target).rpartition(".")[0]
        paths = [str(h.target) for h in heads]
        if paths != [f"{prefix}.{i}" for i in range(len(getattr(self.module, prefix)))] or \
                len(getattr(self.module, _WEIGHTS[prefix])) != len(heads):
            raise self._head_refused(node, f"every head once, in order, weighted by its weight: gets {paths}")
        features = tuple(self._input(h.args[0], h) for h in heads)
        if features not in cats:
            cats[features] = self._emit(node, "cat", list(features), "vim_features")
        width = sum(int(shape_of(h.args[0])[0]) for h in heads)
        self._emit(node, "linear", [cats[features]], prefix,
                   **{"in": width, "out": int(heads_out(self.module, prefix)), "bias": True})

    def _head_refused(self, node: fx.Node, why: str) -> UsageError:
        return UsageError(f"{self.name}: EfficientViM's head {location(node)}: {why}; edgecl converts timm's "
                          "softmax-weighted sum of heads")


_HEADS = {"weights": "heads", "weights_dist": "heads_dist"}  # each weight vector's heads (the distilled pair's)
_WEIGHTS = {h: w for w, h in _HEADS.items()}


def _is_efficientvim(m: nn.Module) -> bool:
    """timm's EfficientViM or EfficientViMDistilled (its two weighted sums averaged), by class."""
    return (type(m).__module__, type(m).__name__) in {("timm.models.efficientvim", "EfficientViM"),
                                                      ("timm.models.efficientvim", "EfficientViMDistilled")}


def heads_out(module: nn.Module, prefix: str) -> int:
    """The classes of the heads at `prefix` (their first's out_features)."""
    return getattr(module, prefix)[0].out_features


def _is_head(modules: dict[str, nn.Module], head: Any, prefix: str, i: int) -> bool:
    """`head` is the call of PREFIX[i], an nn.Linear with a bias on (B, features)."""
    m = modules.get(str(head.target)) if isinstance(head, fx.Node) and head.op == "call_module" else None
    shape = shape_of(head.args[0]) if m is not None else None
    return str(head.target) == f"{prefix}.{i}" and type(m) is nn.Linear and m.bias is not None and \
        shape is not None and len(shape) == 1
