"""PP-HGNetV2's learnable affine block in a user's forward, for `fx_import._Converter`: ``self.scale * x +
self.bias`` with two parameters holding one number each (timm's ``LearnableAffineBlock``, traced into, and any module
written the same way) becomes one ``scalar_affine`` node, named by the module that owns both parameters; its tensors
read from that module's ``scale`` and ``bias`` (`edgecl.arch.spec.state_key`).

The product is converted when the tracer reaches it, the sum later: the product's only user must be a sum with the
other parameter, and that sum is then an alias of the node (`absorbed`). Near misses are refused by name with the
source line: a bias that is no parameter of one number, parameters not named ``scale`` and ``bias`` of one module (a
submodule: the network's own ``scale`` and ``bias`` have no module path to name the node by).

ResMLP's ``Affine`` norm, ``torch.addcmul(self.beta, self.alpha, x)`` with two parameters holding one number per
channel of x (timm stores them ``(1, 1, C)`` for tokens ``(B, T, C)``), becomes one ``affine`` node named by the module
that owns both, its tensors read from that module's ``alpha`` and ``beta`` (`channel_affine`).

A one-number parameter of any name multiplied with nothing added to the product alone (NFNet's ``skipinit_gain``,
shape (), in ``out.mul_(self.skipinit_gain)``: `fx_inplace` makes the block read the product) is a ``scalar_affine``
with ``bias`` false, named by the parameter's path (`_gain`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_calls import arithmetic_kind, shape_of
from edgecl.arch.fx_norms import is_view
from edgecl.errors import UsageError

ADDCMUL = (torch.addcmul, "addcmul")
AFFINE = ("edgecl supports torch.addcmul(beta, alpha, x) where alpha and beta are parameters of one number per channel "
          "of x that one module holds as MODULE.alpha and MODULE.beta (ResMLP's Affine), with value 1")
FORM = ("edgecl supports a one-number parameter only in a learnable affine `scale * x + bias` (PP-HGNetV2's "
        "LearnableAffineBlock: parameters MODULE.scale and MODULE.bias of shape (1,))")


class _AffineConverter:
    """Mixin of `fx_import._Converter`: scalar affines ``scale * x + bias``."""

    name: str
    alias: dict[fx.Node, str]
    attrs: dict[fx.Node, str]
    last: set[fx.Node]
    traced: fx.GraphModule
    refuse: Callable[..., UsageError]
    parameter: Callable[..., Any]
    claim: Callable[[str, fx.Node], None]
    bind: Callable[..., dict[str, Any]]
    per_channel: Callable[[fx.Node, Any, fx.Node], int | None]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]

    def init_affines(self) -> None:
        self.absorbed: dict[fx.Node, fx.Node] = {}  # the sum that adds an affine's bias → its product

    def affine_sum(self, node: fx.Node) -> bool:
        """The sum that adds a scalar affine's bias: the node the product made. False for any other node."""
        product = self.absorbed.get(node)
        if product is None:
            return False
        self.alias[node] = self.alias[product]
        return True

    def scalar_affine(self, node: fx.Node, a: Any, b: Any) -> bool:
        """x · p with p a parameter of one number: with the sum after it, a ``scalar_affine`` node. False when no
        operand is such a parameter, or when x has one channel and nothing is added (a layer scale of one channel)."""
        if a in self.attrs:
            a, b = b, a
        if b not in self.attrs:
            return False
        scale_path = self.attrs[b]
        scale = self.parameter(scale_path, node)
        if scale.numel() != 1:
            return False
        shape = shape_of(a)
        found = self._bias_sum(node)
        if found is None:
            if shape and shape[-1 if a in self.last else 0] == 1:
                return False  # one channel: its one factor is a layer_scale (`fx_norms`)
            return self._gain(node, a, scale_path, scale)
        total, bias_path = found
        bias = self.parameter(bias_path, node)
        owner, _, leaf = scale_path.rpartition(".")
        if (leaf, bias_path) != ("scale", f"{owner}.bias" if owner else "bias"):
            raise self.refuse(node, f"a scalar affine of the parameters {scale_path!r} and {bias_path!r}; their "
                                    "module must hold them as `scale` and `bias` (timm's LearnableAffineBlock), so "
                                    "that edgecl reads them by name")
        for path, p in ((scale_path, scale), (bias_path, bias)):
            if tuple(p.shape) != (1,):
                raise self.refuse(node, f"the scalar affine's parameter {path!r} has shape {tuple(p.shape)}; "
                                        "edgecl needs (1,), as LearnableAffineBlock's")
            self.claim(path, node)
        if not owner:  # the node's tensors are read from NODE.scale / NODE.bias: a module path must come first
            raise self.refuse(node, "a scalar affine of the network's own parameters 'scale' and 'bias'; edgecl reads "
                                    "them from the submodule that holds them (timm's LearnableAffineBlock): move them "
                                    "into one")
        fields: dict[str, Any] = {}
        start, offset = float(scale.detach().reshape(-1)[0]), float(bias.detach().reshape(-1)[0])
        if start != 1.0:
            fields["init"] = start
        if offset != 0.0:
            fields["init_bias"] = offset
        self._emit(node, "scalar_affine", [self._input(a, node)], owner, **fields)
        self.absorbed[total] = node
        if a in self.last:
            self.last.add(node)
        return True

    def channel_affine(self, node: fx.Node) -> None:
        """``torch.addcmul(beta, alpha, x)`` (ResMLP's Affine): beta + alpha·x, one factor and one offset per channel
        of x, an ``affine`` node named by the module holding ``alpha`` and ``beta``; anything else is refused."""
        args = self.bind(node, ("input", "tensor1", "tensor2", "value"))
        bias, x, weight = args["input"], args["tensor1"], args["tensor2"]
        if x in self.attrs:
            x, weight = weight, x
        if bias not in self.attrs or weight not in self.attrs or x in self.attrs or shape_of(x) is None or \
                args["value"] not in (None, 1):
            raise self.refuse(node, AFFINE)
        paths = (self.attrs[weight], self.attrs[bias])
        owner = paths[0].rpartition(".")[0]
        stored = {tuple(self.parameter(path, node).shape) for path in paths}
        ch = self.per_channel(node, x, weight) if self.per_channel(node, x, bias) is not None else None
        if not owner or paths != (f"{owner}.alpha", f"{owner}.beta") or ch is None or len(stored) != 1:
            raise self.refuse(node, f"{AFFINE}; gets {paths[0]!r} and {paths[1]!r} of shapes {sorted(stored)}")
        for path in paths:
            self.claim(path, node)
        shape = list(stored.pop())
        self._emit(node, "affine", [self._input(x, node)], owner, ch=ch,
                   **({"module_shape": shape} if shape != [ch] else {}))
        if x in self.last:
            self.last.add(node)

    def _gain(self, node: fx.Node, a: Any, path: str, p: Any) -> bool:
        """x · p alone, p a learned number of any name (NFNet's ``skipinit_gain``, shape ()): a ``scalar_affine``
        without bias named by the parameter's path, which is its tensor's state key, as a layer scale's."""
        self.claim(path, node)
        fields: dict[str, Any] = {"bias": False, **({"module_shape": list(p.shape)} if tuple(p.shape) != (1,) else {})}
        if float(p.detach().reshape(-1)[0]) != 1.0:
            fields["init"] = float(p.detach().reshape(-1)[0])
        self._emit(node, "scalar_affine", [self._input(a, node)], path, **fields)
        if a in self.last:
            self.last.add(node)
        return True

    def _bias_sum(self, product: fx.Node) -> tuple[fx.Node, str] | None:
        """(the sum, the bias parameter's path) when the product's only user adds a parameter of one number to it."""
        users = list(product.users)
        if len(users) != 1 or arithmetic_kind(users[0]) != "add" or len(users[0].args) != 2 or users[0].kwargs:
            return None
        total = users[0]
        other = next((arg for arg in total.args if arg is not product), None)
        if other is None or total.args.count(product) != 1:
            return None
        while isinstance(other, fx.Node) and other.op != "get_attr" and other.args and is_view(other.target):
            other = other.args[0]  # bias.view(1, 1, 1, 1): the same number
        if not isinstance(other, fx.Node) or other.op != "get_attr":
            return None
        path = str(other.target)
        try:
            p = self.traced.get_parameter(path)
        except AttributeError:
            return None
        return (total, path) if isinstance(p, nn.Parameter) and p.numel() == 1 else None

