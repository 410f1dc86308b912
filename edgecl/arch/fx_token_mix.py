"""Token mixing in a user's forward (MLP-Mixer, ResMLP, gMLP), for `fx_import._Converter`: an ``nn.Linear`` over the
token axis.

timm's Mixer block computes ``self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)``: tokens ``(B, T, C)``
swapped to ``(B, C, T)`` so that a Linear (and the activation and dropout of its MLP) runs over the T tokens of each
channel, then swapped back. The spec keeps tokens as a channels-first ``(C, T, 1)`` map (`fx_tokens`), so the swap
emits nothing: the fx node is remembered as *token-last* (`tmix`), and

- an ``nn.Linear`` of ``in_features`` T on a token-last value becomes a ``token_mix`` node {in, out, bias} named by
  the module (its weight ``(out, T)`` read as the module stores it): the rows and columns are token positions, so
  the weight belongs to no channel (`ops.ROWLESS_OPS`);
- activations, dropout and identities, and element-wise arithmetic among token-last values (or with numbers)
  follow it, their results token-last;
- ``transpose(1, 2)`` / ``transpose(-1, -2)`` / ``permute(0, 2, 1)`` back makes it tokens again.

Anything else on a token-last value — a LayerNorm, a parameter (which would meet the tokens, not the channels), a
sum with tokens — is refused by name.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_activations import ACTIVATION_MODULES
from edgecl.arch.fx_calls import is_elementwise, is_library_identity, shape_of
from edgecl.arch.fx_tokens import _SWAPS, _is_tokens
from edgecl.errors import UsageError

_FOLLOWED = (*ACTIVATION_MODULES, nn.Dropout, nn.Dropout1d, nn.Identity)
_WHY = ("it reads tokens swapped to (B, C, T) by transpose(1, 2); there edgecl follows an nn.Linear over the tokens "
        "(token mixing), activations, dropout and element-wise ops among such values, then transpose(1, 2) back")


class _TokenMixConverter:
    """Mixin of `fx_import._Converter`: token-last values and the Linear over their tokens."""

    alias: dict[fx.Node, str]
    last: set[fx.Node]
    attrs: dict[fx.Node, str]
    tmix: set[fx.Node]
    modules: dict[str, nn.Module]
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]
    _module: Callable[[fx.Node, nn.Module], None]
    _to_channels_first: Callable[[fx.Node, fx.Node], bool]
    call: Callable[[fx.Node], None]
    one_call: Callable[[str, fx.Node], None]

    def token_axis_step(self, node: fx.Node) -> bool:
        """Convert `node` when it swaps tokens to token-last or reads a token-last value; False otherwise."""
        first = node.args[0] if node.args else None
        if _swaps_last_two(node) and _is_tokens(self.last, first):
            if not self._to_channels_first(node, first):  # not PiT's swap read by a reshape to its grid
                self.alias[node] = self._input(first, node)
                self.tmix.add(node)
            return True
        if not any(a in self.tmix for a in node.all_input_nodes):
            return False
        if _swaps_last_two(node) and first in self.tmix:
            self.alias[node] = self._input(first, node)
            self.last.add(node)
            return True
        tensors = [a for a in node.all_input_nodes if a in self.attrs or shape_of(a) is not None]
        if any(a not in self.tmix for a in tensors):
            raise self.refuse(node, _WHY)
        if node.op == "call_module":
            self._token_module(node, self.modules[node.target])
        elif is_elementwise(node.target):
            self.call(node)
        else:
            raise self.refuse(node, _WHY)
        self.tmix.add(node)
        return True

    def _token_module(self, node: fx.Node, m: nn.Module) -> None:
        """A layer on a token-last value: a Linear over the tokens, or an activation / dropout / identity."""
        tokens = (shape_of(node.args[0]) or (0, 0))[-1]
        if type(m) is nn.Linear and m.in_features == tokens:
            path = str(node.target)
            self.one_call(path, node)
            self._emit(node, "token_mix", [self._input(node.args[0], node)], path,
                       **{"in": m.in_features, "out": m.out_features, "bias": m.bias is not None})
        elif isinstance(m, _FOLLOWED) or is_library_identity(m):
            self._module(node, m)
        else:
            raise self.refuse(node, f"{type(m).__name__} at {node.target!r}: {_WHY}")


def _swaps_last_two(node: fx.Node) -> bool:
    """``x.transpose(1, 2)``, ``transpose(-1, -2)``, ``permute(0, 2, 1)`` of a rank-3 value (batch included)."""
    if node.target not in _SWAPS or len(shape_of(node) or ()) != 2:
        return False
    dims = [*node.args[1:], *(node.kwargs[k] for k in ("dim0", "dim1", "dims") if k in node.kwargs)]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return False
    dims = [d % 3 for d in dims]
    return sorted(dims) == [1, 2] and len(dims) == 2 or dims == [0, 2, 1]
