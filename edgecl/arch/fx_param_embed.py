"""Position embeddings computed from parameters in a user's forward (SAM 2's HieraDet, timm's
``hieradet_sam2.HieraDet._pos_embed``), for `fx_import._Converter`:

    pos_embed = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")   # (1, C, gh, gw) → (1, C, H, W)
    pos_embed = pos_embed + self.pos_embed_window.tile((th, tw))            # (1, C, wh, ww) over every window
    x + pos_embed.permute(0, 2, 3, 1)                                        # the channels-last map

Each part is a term of the sum the map finally gets, and each becomes a ``pos_embed`` node of its parameter
(learned as the module learns it, its storage ``(1, C, gh, gw)`` kept as ``module_shape``): a bicubic resize of the
parameter to the map (``resize`` [gh, gw]; torch's ``F.interpolate`` bicubic, ``align_corners`` false, no
antialias), or the parameter repeated over the map's windows (``tile`` [wh, ww], TNT's). The terms are recorded
where they are computed and added to the map where the sum with it is; anything else done with them (another mode
or an antialiased resize, a product, a slice, a sum with anything but the map of their shape) is refused by name
with the user's source line."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from edgecl.arch.fx_calls import shape_of
from edgecl.errors import UsageError

_ADDS = (operator.add, torch.add, "add")
# the identity permute and the one to channels-last, of a (1, C, H, W) term
_LAYOUTS = {(0, 1, 2, 3): False, (0, 2, 3, 1): True}


class _ParamEmbedConverter:
    """Mixin of `fx_import._Converter`: position embeddings resized or tiled from parameters in forward."""

    name: str
    last: set[fx.Node]
    attrs: dict[fx.Node, str]
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]
    parameter: Callable[..., torch.Tensor]
    claim: Callable[[str, fx.Node], None]

    def _embed_terms(self) -> dict[fx.Node, tuple[list[tuple[str, str, list[int]]], bool]]:
        """fx node → (its terms: (field, parameter path, the parameter's grid), channels-last)."""
        return self.__dict__.setdefault("param_terms", {})

    def param_embed_step(self, node: fx.Node) -> bool:
        """Convert `node` when it computes or adds an embedding term; False when it touches none."""
        terms = self._embed_terms()
        term_inputs = [a for a in node.all_input_nodes if a in terms]
        if not term_inputs:
            return self._new_term(node)
        if node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if a in terms and b in terms:
                (ta, last_a), (tb, last_b) = terms[a], terms[b]
                if last_a != last_b or shape_of(a) != shape_of(b):
                    raise self.refuse(node, f"a sum of position embeddings of shapes {shape_of(a)} and {shape_of(b)}")
                terms[node] = (ta + tb, last_a)
                return True
            self._add_terms(node, a, b) if b in terms else self._add_terms(node, b, a)
            return True
        if node.target in ("permute", torch.permute) and node.args[0] in terms:
            dims = node.kwargs.get("dims", node.args[1:])
            dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)
            parts, last = terms[node.args[0]]
            if dims not in _LAYOUTS or last:
                raise self.refuse(node, f"a position embedding computed from parameters permuted by {dims}; edgecl "
                                        "follows its permute(0, 2, 3, 1) to a channels-last map")
            terms[node] = (parts, _LAYOUTS[dims])
            return True
        raise self.refuse(node, "it reads a position embedding computed from parameters in forward; edgecl follows "
                                "a bicubic F.interpolate of one, a .tile of one over the map's windows, their sum, a "
                                "permute(0, 2, 3, 1) and the sum with the map")

    def _new_term(self, node: fx.Node) -> bool:
        """F.interpolate(param, size=map, mode="bicubic") or param.tile((th, tw)) of a (1, C, gh, gw) parameter."""
        source = node.args[0] if node.args else None
        if source not in self.attrs:
            return False
        resize = node.target is F.interpolate
        if not resize and node.target != "tile":
            return False
        path, out = self.attrs[source], shape_of(node)
        p = self.parameter(path, node)
        if p.dim() != 4 or p.shape[0] != 1 or out is None or len(out) != 3 or out[0] != p.shape[1]:
            raise self.refuse(node, f"the parameter {path!r} of shape {tuple(p.shape)} resized or tiled to {out}; "
                                    "edgecl converts a (1, C, h, w) position embedding")
        grid = [int(p.shape[2]), int(p.shape[3])]
        if resize:
            args = dict(zip(("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                             "antialias"), node.args))
            args.update(node.kwargs)
            if args.get("mode") != "bicubic" or args.get("align_corners") or args.get("antialias") or \
                    args.get("scale_factor") is not None:
                raise self.refuse(node, f"F.interpolate of the parameter {path!r} with mode {args.get('mode')!r}, "
                                        f"align_corners {args.get('align_corners')}, antialias "
                                        f"{args.get('antialias', False)}; edgecl converts mode='bicubic' to a size, "
                                        "align_corners False, no antialias (torch's default)")
        elif out[1] % grid[0] or out[2] % grid[1]:
            raise self.refuse(node, f"the parameter {path!r} tiled to {out}: edgecl converts whole copies")
        self._embed_terms()[node] = ([("resize" if resize else "tile", path, grid)], False)
        return True

    def _add_terms(self, node: fx.Node, x: Any, term: fx.Node) -> None:
        """x + the terms: one ``pos_embed`` node per term, in the order computed."""
        parts, last = self._embed_terms()[term]
        shape, want = shape_of(x), shape_of(term)
        if not isinstance(x, fx.Node) or (x in self.last) != last or shape != want:
            layout = "channels-last" if last else "channels-first"
            raise self.refuse(node, f"a position embedding of shape {want} ({layout}) added to a value of shape "
                                    f"{shape}; edgecl converts its sum with the map of its shape and layout")
        h = self._input(x, node)
        for field, path, grid in parts:
            p = self.parameter(path, node)
            self.claim(path, node)
            fields: dict[str, Any] = {"frozen": True} if not p.requires_grad else {}
            h = self._emit(node, "pos_embed", [h], path, ch=want[2 if last else 0], tokens=grid[0] * grid[1], module_shape=list(
                p.shape), **{field: grid}, **fields)
        if last:
            self.last.add(node)
