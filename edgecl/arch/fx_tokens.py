"""Tokens in a user's forward (Vision Transformers), for `fx_import._Converter`: how a ViT's ``(B, T, C)`` tokens
become a spec's channels-first ``(C, T, 1)`` map.

A spec keeps tokens channels-first so that everything edgecl knows about channels still holds: a Linear on tokens is
a 1×1 ``conv`` over the channels (ConvNeXt's channels-last Linear, `fx_norms`), LayerNorm over the channels is
``layer_norm``, GELU, dropout and residual adds act on each value, and channel groups, node masks, compaction and
permutations still mean channels. The torch value ``(B, T, C)`` is remembered as the channels-last view of its spec
node (`_NormConverter.last`), as after ``permute(0, 2, 3, 1)``:

- a map ``(B, C, H, W)`` flattened to ``(B, C, T)`` (``flatten(2)``, a reshape) then ``transpose(1, 2)`` /
  ``permute(0, 2, 1)`` (timm's PatchEmbed, torchvision's ``_process_input``) → a ``reshape`` to ``(C, T, 1)``;
- ``torch.cat([cls.expand(B, -1, -1), reg.expand(B, -1, -1), x], dim=1)`` → a ``class_token`` node per parameter
  of n tokens (class token, DeiT's distillation token, register tokens; the parameter's path names it);
- ``x + param`` with a parameter of shape ``(1, T, C)`` → ``pos_embed``, ``frozen`` when the parameter has
  ``requires_grad=False`` (MAE's fixed sin-cos embedding: a constant no method trains); ``x + param`` with a
  channels-first map ``(B, C, H, W)`` and a parameter ``(1, C, H, W)`` (PiT, Visformer) → ``pos_embed`` over the
  map's H·W positions, the parameter's storage kept as ``module_shape`` (a channels-last map ``(B, H, W, C)`` and a
  ``(1, H, W, C)`` parameter, VOLO's: ``channels_last`` too);
- a channels-last map ``(B, H, W, C)`` reshaped to ``(B, H·W, C)`` (VOLO's tokens) → a ``reshape`` to ``(C, H·W, 1)``;
- ``x[:, i]`` → ``token`` i then a flatten (class-token pooling); ``x.mean(dim=1)`` → ``gap`` then a flatten;
  ``x[:, n:]`` → ``token`` n of count T - n (still tokens: timm's average without the class and register tokens);
  ``x[:, :n]`` → ``token`` 0 of count n (PiT's class tokens split off before its pooling); any range ``x[:, a:b]``
  (``x[:, 0:1, ...]``: CrossViT's class token) → ``token`` a of count b − a; ``x[:, 0:]`` is ``x``. Other indexing of
  tokens (steps, an empty range) is refused by name.
- ``x.transpose(1, 2)`` of tokens read only by a reshape to a map ``(B, C, H, W)`` (PiT's tokens back to its grid)
  → that ``reshape`` of the ``(C, T, 1)`` value to ``(C, H, W)``;
- ``torch.cat((cls_tokens, x), dim=1)`` of computed tokens (PiT's class tokens after their own Linear) → each part a
  ``pad`` of the token axis to the whole length at its place, the parts summed (``add``).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx

from edgecl.arch.fx_calls import shape_of
from edgecl.errors import UsageError

_SWAPS = ("transpose", torch.transpose, "permute", torch.permute)
_CATS = (torch.cat, torch.concat, torch.concatenate)
_MEANS = (torch.mean, "mean")


class _TokenConverter:
    """Mixin of `fx_import._Converter`: the token layout and the learned tokens and position embeddings."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    attrs: dict[fx.Node, str]
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]
    parameter: Callable[[str, fx.Node], torch.Tensor]
    claim: Callable[[str, fx.Node], None]

    def tokens_step(self, node: fx.Node) -> bool:
        """Convert `node` when it is a step of the token layout; False when it is none."""
        first = node.args[0] if node.args else None
        if node.target in _SWAPS and isinstance(first, fx.Node) and first not in self.last and \
                first not in self.attrs:
            return self._to_tokens(node, first)
        if node.target == "expand" and first in self.attrs:  # a parameter broadcast over the batch: the same values
            self.attrs[node] = self.attrs[first]
            return True
        if node.target in _CATS and any(a in self.attrs for a in _tensors(node)):
            self._class_token(node)
            return True
        if node.target in _CATS and len(_tensors(node)) > 1 and all(_is_tokens(self.last, t) for t in _tensors(node)) \
                and _cat_dim(node) % 3 != 2:  # along the channels (gMLP's parts): `concatenate`, as a map's
            self._join_tokens(node)
            return True
        if node.target in _SWAPS and _is_tokens(self.last, first):
            return self._to_channels_first(node, first)
        tokens = first in self.last and len(shape_of(first) or ()) == 2  # not a channels-last map (B, H, W, C)
        if node.target is operator.getitem and tokens:
            self._token_index(node, first)
            return True
        if node.target in _MEANS and tokens:
            self._token_mean(node, first)
            return True
        if node.target in ("reshape", "view", torch.reshape) and tokens:
            return self._tokens_to_grid(node, first)
        if node.target in ("reshape", "view", torch.reshape) and first in self.last and \
                len(shape_of(first) or ()) == 3:
            return self._map_to_tokens(node, first)
        if node.target in _MEANS and first in self.last:
            self._last_map_mean(node, first)
            return True
        return False

    def _to_tokens(self, node: fx.Node, source: fx.Node) -> bool:
        shape = shape_of(source)
        dims = [d for d in node.args[1:]] + [node.kwargs[k] for k in ("dim0", "dim1", "dims") if k in node.kwargs]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
        if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in dims):
            return False
        dims = [d % 3 for d in dims]
        if dims not in ([1, 2], [2, 1], [0, 2, 1]):
            return False
        ch, tokens = shape
        self._emit(node, "reshape", [self._input(source, node)], f"{node.name}.tokens", shape=[ch, tokens, 1])
        self.last.add(node)
        return True

    def _to_channels_first(self, node: fx.Node, source: fx.Node) -> bool:
        """``x.transpose(1, 2)`` of tokens (B, T, C) read only by a reshape to a map (B, C, H, W) with H·W = T (PiT's
        tokens back to its grid): the (C, T, 1) value itself, which that reshape (`fx_calls` view) turns into the
        map. False for other swaps, which stay refused as channels-last values."""
        dims = [d % 3 for d in node.args[1:] if isinstance(d, int)]
        tokens, ch = shape_of(source)
        maps = all(u.target in ("reshape", "view", torch.reshape) and len(shape_of(u) or ()) == 3 and
                   (shape_of(u)[0], shape_of(u)[1] * shape_of(u)[2]) == (ch, tokens) for u in node.users)
        if sorted(dims) != [1, 2] or len(node.args) != 3 or node.kwargs or not node.users or not maps:
            return False
        self.alias[node] = self._input(source, node)
        return True

    def _tokens_to_grid(self, node: fx.Node, source: fx.Node) -> bool:
        """``x.reshape(B, H, W, C)`` of tokens (B, H·W, C) (Twins' tokens back to a map between stages): the
        channels-last map of the (C, T, 1) value, a ``reshape`` to (C, H, W). False for other reshapes."""
        (tokens, ch), shape = shape_of(source), shape_of(node)
        if shape is None or len(shape) != 3 or shape[2] != ch or shape[0] * shape[1] != tokens:
            return False
        self._emit(node, "reshape", [self._input(source, node)], shape=[ch, shape[0], shape[1]])
        self.last.add(node)
        return True

    def _map_to_tokens(self, node: fx.Node, source: fx.Node) -> bool:
        """A channels-last map (B, H, W, C) viewed as its H·W tokens (B, H·W, C), row by row (VOLO)."""
        (h, w, ch), shape = shape_of(source), shape_of(node)
        if shape != [h * w, ch]:
            return False
        self._emit(node, "reshape", [self._input(source, node)], shape=[ch, h * w, 1])
        self.last.add(node)
        return True

    def _join_tokens(self, node: fx.Node) -> None:
        """``torch.cat((cls_tokens, x), dim=1)`` of computed tokens (PiT's class tokens after their own Linear, put
        back before the pooled map's tokens): each part zero-padded to the whole length at its place (a ``pad`` of
        the token axis) and the parts summed — exactly the concatenation, with ops every method already knows
        (the parts share channels, as an ``add`` ties them)."""
        tensors = _tensors(node)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        shapes = [shape_of(t) for t in tensors]
        if dim not in (1, -2) or len({s[1] for s in shapes}) != 1:
            raise self.refuse(node, f"a concatenation of tokens of shapes {shapes} along dim {dim}; edgecl supports "
                                    "tokens of one width joined along the tokens (dim=1)")
        total, start, joined = sum(s[0] for s in shapes), 0, None
        for i, (t, s) in enumerate(zip(tensors, shapes)):
            part = self._emit(node, "pad", [self._input(t, node)], f"{node.name}.part{i}",
                              pads=[start, 0, total - start - s[0], 0])
            joined = part if joined is None else self._emit(node, "add", [joined, part],
                                                            None if i == len(tensors) - 1 else f"{node.name}.sum{i}")
            start += s[0]
        self.last.add(node)

    def _class_token(self, node: fx.Node) -> None:
        """``torch.cat([cls.expand(B, -1, -1), dist.expand(B, -1, -1), reg.expand(B, -1, -1), x], dim=1)``:
        learned tokens put before the others, each parameter ``(1, n, C)`` one ``class_token`` node of n tokens
        (a class token, DeiT's distillation token, register tokens), emitted from the last, so the first parameter's
        tokens come first."""
        tensors = _tensors(node)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        x = tensors[-1] if tensors else None
        shape = shape_of(x)
        if len(tensors) < 2 or any(t not in self.attrs for t in tensors[:-1]) or x not in self.last or \
                shape is None or len(shape) != 2 or dim not in (1, -2):
            raise self.refuse(node, "a concatenation with a parameter; edgecl supports learned tokens put before "
                                    "the tokens (torch.cat([cls_token.expand(B, -1, -1), …, x], dim=1)), not other "
                                    "places or mixtures")
        ch, paths = shape[1], [self.attrs[t] for t in tensors[:-1]]
        counts = [self._prepended(path, node, ch) for path in paths]
        out = shape_of(node)  # the tokens given: not a token expanded to several copies (expand(B, 2, -1))
        if out is None or list(out) != [shape[0] + sum(counts), ch]:
            raise self.refuse(node, f"the token parameters {paths} ({counts} tokens) put before {shape[0]} tokens "
                                    f"gives {out}; edgecl "
                                    f"supports parameters of shape (1, n, {ch}) put before the tokens as they are "
                                    "(copies of a token are refused)")
        h = self._input(x, node)
        for path, n in reversed(list(zip(paths, counts))):
            self.claim(path, node)
            fields: dict[str, Any] = {"ch": ch, "tokens": n}
            if n == 1 and list(self.parameter(path, node).shape) != [ch]:
                fields["module_shape"] = list(self.parameter(path, node).shape)
            h = self._emit(node, "class_token", [h], path, **fields)
        self.last.add(node)
        self._read_again(node, h, tensors[:-1], counts)

    def _read_again(self, node: fx.Node, joined: str, params: list[fx.Node], counts: list[int]) -> None:
        """A prepended parameter's expansion read again after the concatenation (CaiT's class token, the first
        class-attention block's ``x_cls + …``): those values are its tokens of the joined map, so a ``token`` node
        of them (one parameter, one use: nothing is claimed twice)."""
        start = 0
        for t, n in zip(params, counts):
            if len(t.users) > 1 and t.op != "get_attr":
                self._emit(t, "token", [joined], f"{node.name}.{t.name}", index=start, count=n)
                del self.attrs[t]
                self.last.add(t)
            start += n

    def _prepended(self, path: str, node: fx.Node, ch: int) -> int:
        """How many tokens the parameter at `path` holds: n of shape (1, n, ch), or 1 of shape (ch,) / (1, ch)."""
        p = self.parameter(path, node)
        if p.shape[-1] != ch or p.dim() > 3 or p.dim() == 3 and p.shape[0] != 1 or p.dim() == 2 and p.shape[0] != 1:
            raise self.refuse(node, f"the token parameter {path!r} of shape {tuple(p.shape)} put before tokens of "
                                    f"{ch} channels; edgecl supports learned tokens of shape (1, n, {ch})")
        return p.shape[-2] if p.dim() == 3 else 1

    def position_embedding(self, node: fx.Node, a: Any, b: Any) -> bool:
        """``x + pos_embed`` with tokens x and a parameter of shape (1, T, C), or with a channels-first map x
        (B, C, H, W) and a parameter of its shape (1, C, H, W) (PiT, Visformer): a ``pos_embed`` node. False when
        neither operand is a parameter or the other is neither tokens nor a channels-first map of the parameter's
        shape."""
        if a in self.attrs:
            a, b = b, a
        shape = shape_of(a)
        tokens = a in self.last and shape is not None and len(shape) == 2
        feature_map = shape is not None and len(shape) == 3  # channels-first, or channels-last (VOLO's)
        if b not in self.attrs or not tokens and not feature_map:
            return False
        path = self.attrs[b]
        p = self.parameter(path, node)
        if feature_map and list(p.shape) != [1, *shape]:  # no embedding (a bias broadcast over the map): the
            return False  # converter's refusal of a parameter used directly in forward stands
        if list(p.shape) != [1, *shape]:
            raise self.refuse(node, f"a sum with the parameter {path!r} of shape {tuple(p.shape)}; edgecl supports "
                                    "a position embedding of shape (1, tokens, channels) added to the tokens")
        self.claim(path, node)
        fields: dict[str, Any] = {"frozen": True} if not p.requires_grad else {}  # MAE's fixed sin-cos: a constant
        if tokens:
            fields.update(ch=shape[1], tokens=shape[0])
        elif a in self.last:  # a channels-last map (B, H, W, C) and its (1, H, W, C) embedding (VOLO)
            fields.update(ch=shape[2], tokens=shape[0] * shape[1], module_shape=list(p.shape), channels_last=True)
        else:  # one vector per position of the map; the module keeps it channels-first
            fields.update(ch=shape[0], tokens=shape[1] * shape[2], module_shape=list(p.shape))
        self._emit(node, "pos_embed", [self._input(a, node)], path, **fields)
        if a in self.last:
            self.last.add(node)
        return True

    def _token_index(self, node: fx.Node, source: fx.Node) -> None:
        """``x[:, i]`` picks token i (class-token pooling); ``x[:, a:b]`` the tokens a to b − 1 (still tokens:
        timm's average after the prefix, PiT's class tokens, CrossViT's class token ``x[:, 0:1, ...]``; a trailing
        ``...`` or ``:`` takes every channel, CoaT's ``x[:, 1:, :]``); ``x[:, 0:]`` is x."""
        index = node.args[1]
        if isinstance(index, tuple) and len(index) == 3 and index[2] in (slice(None), Ellipsis):
            index = index[:2]
        x, t = self._input(source, node), shape_of(source)[0]
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None):
            i = index[1]
            if isinstance(i, int) and 0 <= i < t:
                picked = self._emit(node, "token", [x], f"{node.name}.token", index=i)
                self._emit(node, "flatten", [picked])
                return
            if isinstance(i, slice) and all(v is None or type(v) is int for v in (i.start, i.stop)) and \
                    i.step in (None, 1):
                start, stop, _ = i.indices(t)
                if (start, stop) == (0, t):
                    self.alias[node] = x
                    self.last.add(node)
                    return
                if start < stop:
                    self._emit(node, "token", [x], f"{node.name}.tokens", index=start, count=stop - start)
                    self.last.add(node)
                    return
        raise self.refuse(node, f"indexing tokens with {index!r}; edgecl supports x[:, i] (one token, as the class "
                                "token's pooling), x[:, a:b] (a range of tokens, no step) and the mean over tokens")

    def _token_mean(self, node: fx.Node, source: fx.Node) -> None:
        """``x.mean(dim=1)``: the average token (``gap`` over the token map, then a flatten)."""
        dim, keep = _mean_args(node)
        if dim not in (1, -2, (1,), [1]) or keep or "dtype" in node.kwargs:
            raise self.refuse(node, f"a mean over dims {dim} of tokens; edgecl supports the mean over the tokens "
                                    "(dim=1)")
        pooled = self._emit(node, "gap", [self._input(source, node)], f"{node.name}.pool")
        self._emit(node, "flatten", [pooled])

    def _last_map_mean(self, node: fx.Node, source: fx.Node) -> None:
        """``x.mean((1, 2))`` of a channels-last (B, H, W, C) map (timm's NHWC global pooling, Swin's head): ``gap``,
        then a flatten unless keepdim (which stays channels-last)."""
        dim, keep = _mean_args(node)
        dims = sorted(d % 4 for d in (dim if isinstance(dim, (list, tuple)) else [dim] if isinstance(dim, int) else []))
        if dims != [1, 2] or "dtype" in node.kwargs:
            raise self.refuse(node, f"a mean over dims {dim} of a channels-last map; edgecl supports the mean over "
                                    "its height and width (dims 1 and 2)")
        pooled = self._emit(node, "gap", [self._input(source, node)], None if keep else f"{node.name}.pool")
        if keep:
            self.last.add(node)
        else:
            self._emit(node, "flatten", [pooled])


def _mean_args(node: fx.Node) -> tuple[Any, Any]:
    """A mean's dims and keepdim, by position or keyword, numpy's names too (torch takes ``axis`` and ``keepdims``:
    read as absent, ``keepdims=True`` made a (B, C) where torch keeps (B, 1, 1, C))."""
    dim = node.kwargs.get("dim", node.kwargs.get("axis", node.args[1] if len(node.args) > 1 else None))
    return dim, node.kwargs.get("keepdim", node.kwargs.get("keepdims", node.args[2] if len(node.args) > 2 else False))


def _is_tokens(last: set[fx.Node], value: Any) -> bool:
    """A (B, T, C) token sequence edgecl follows (a channels-last value of rank 2 without the batch)."""
    return isinstance(value, fx.Node) and value in last and len(shape_of(value) or ()) == 2


def _cat_dim(node: fx.Node) -> Any:
    """The dim a ``torch.cat`` call joins along (0 unless given)."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim if type(dim) is int else 1  # anything else: `_join_tokens` refuses it by name


def _tensors(node: fx.Node) -> list[Any]:
    """The tensors a ``torch.cat`` call concatenates."""
    tensors = node.kwargs.get("tensors", node.args[0] if node.args else ())
    return list(tensors) if isinstance(tensors, (list, tuple)) else []
