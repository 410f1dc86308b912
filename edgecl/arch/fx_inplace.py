"""In-place operations in a traced graph (``out.mul_(self.skipinit_gain)`` in timm's NormFreeBlock, ``x.relu_()``,
``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``, ``x[:, :2] = 0``).

Why: torch.fx records ``x.mul_(g)`` as a node whose result the code may drop, while the code's later reads of ``x``
stay on the node from before the call (pytorch issue 68301: the mutation is lost, timm marks the block untraceable
for that reason). Converted as recorded, NFNet's residual branch would skip its gain, and a dropped ``x.relu_()``
would vanish. `rewire_inplace` makes every read of ``x`` after the call read the call's result, which is what the
code computes — unless ``x`` shares memory with another tensor read after the call (a view taken before it, or the
call writes into a view of a tensor read later: ``x[:, :2].mul_(g)``) or is a parameter or buffer (the call would
change the module itself): those the graph cannot express, so they are refused, never converted to another network."""
from __future__ import annotations

import inspect
import operator
from typing import Any
import torch
from torch import fx, nn

from edgecl.arch.fx_calls import describe, is_library_identity
from edgecl.errors import UsageError

# the results that share memory with their first argument (views, and calls that return the tensor itself)
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
                 "narrow", "select", "squeeze", "unsqueeze", "expand", "expand_as", "chunk", "split", "unbind",
                 "contiguous", "detach", "as_strided", "unfold", "diagonal", "movedim", "moveaxis", "swapaxes",
                 "swapdims", "type_as", "to", "float", "requires_grad_"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.narrow,
                   torch.select, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.unbind, torch.movedim,
                   torch.t, torch.swapaxes, torch.detach}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


class AugmentedAssignment:
    """``x += y`` (and ``-=``, ``*=``, ``/=``, ``**=``) on a traced tensor, recorded as ``operator.iadd`` and the like:
    without these fx falls back to ``x = x + y``, and a name bound to ``x`` before (``y = x; x *= g``) would keep the
    old value where torch's tensor changed. Shape values (Python numbers at the import shape) stay ``x = x + y``."""

    tracer: Any
    node: fx.Node

    def _augmented(self, inplace: Any, plain: Any, other: Any) -> Any:
        tensor = isinstance(self.tracer.example(self), torch.Tensor)
        return self.tracer.create_proxy("call_function", inplace if tensor else plain, (self, other), {})

    def __iadd__(self, other: Any) -> Any:
        return self._augmented(operator.iadd, operator.add, other)

    def __isub__(self, other: Any) -> Any:
        return self._augmented(operator.isub, operator.sub, other)

    def __imul__(self, other: Any) -> Any:
        return self._augmented(operator.imul, operator.mul, other)

    def __itruediv__(self, other: Any) -> Any:
        return self._augmented(operator.itruediv, operator.truediv, other)

    def __ipow__(self, other: Any) -> Any:  # a tensor's x **= 2 squares it in place (MetaFormer's x²)
        return self._augmented(operator.ipow, operator.pow, other)


def inplace_target(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """The tensor `node` writes into, or None: ``x.op_(…)`` methods, ``torch.op_`` / ``operator.iop`` /
    ``operator.setitem``, functions called with ``inplace=True``, and modules whose ``inplace`` attribute is set."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target is operator.setitem or _inplace_argument(node):
            return first
    elif node.op == "call_module":
        return first if getattr(root.get_submodule(str(node.target)), "inplace", False) is True else None
    else:
        return None
    return first if name.endswith("_") and not name.startswith("_") or name in ("iadd", "isub", "imul",
                                                                               "itruediv", "ipow") else None


def _inplace_argument(node: fx.Node) -> bool:
    """Whether a function is called with ``inplace=True`` (by keyword or by position: ``F.relu(x, True)``)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a Python signature: only the keyword can say
        return node.kwargs.get("inplace") is True
    return bound.arguments.get("inplace") is True


def _is_alias(node: fx.Node, root: nn.Module) -> bool:
    """Whether `node`'s result shares memory with its first argument (a view, or the tensor itself: an identity,
    dropout in eval)."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS or is_library_identity(node.target)
    if node.op != "call_module":
        return False
    layer = root.get_submodule(str(node.target))  # timm's DropPath & co. return their input itself in eval
    return isinstance(layer, _VIEW_MODULES) or is_library_identity(layer)


def _memory(node: fx.Node, root: nn.Module) -> set[fx.Node]:
    """Every node whose result shares `node`'s memory: up to the tensor it is a view of, then down every view."""
    base = node
    while base.args and isinstance(base.args[0], fx.Node) and (
            _is_alias(base, root) or inplace_target(base, root) is not None):
        base = base.args[0]
    family, todo = {base}, [base]
    while todo:
        for user in todo.pop().users:
            if user not in family and user.args and user.args[0] in family and (
                    _is_alias(user, root) or inplace_target(user, root) is not None):
                family.add(user)
                todo.append(user)
    return family


def rewire_inplace(graph: fx.Graph, root: nn.Module) -> None:
    """Point each later user of an in-place call's operand at the call's node (in graph order); refuse a call on a
    parameter or buffer, or on a tensor that shares memory with another tensor read after the call."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        target = inplace_target(node, root)
        if target is None:
            continue
        _check_expressible(node, target, order, root)
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)


def _check_expressible(node: fx.Node, target: fx.Node, order: dict[fx.Node, int], root: nn.Module) -> None:
    """UsageError for an in-place call whose effect the rewired graph would not compute."""
    if target.op == "get_attr":
        raise UsageError(f"in-place {describe(node)} writes into the module's own tensor {target.target!r}: each "
                         "call would change the module; write it out of place")
    for other in _memory(target, root) - {target, node}:
        if order[other] < order[node] and any(order[user] > order[node] for user in other.users):
            raise UsageError(f"in-place {describe(node)} writes into memory that {describe(other)} shares and reads "
                             "after it (a view); edgecl cannot express that: write it out of place")

