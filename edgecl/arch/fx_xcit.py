"""XCiT's layers (timm's ``timm.models.xcit``) in a user's network, for `fx_import._Converter`. The tracer keeps three
of them whole, each becoming ops edgecl already has, on tokens as their (C, T, 1) map:

- ``PositionalEncodingFourier`` (called with the batch and the patch grid's height and width, not a tensor: its
  forward builds the grid with ``torch.arange``): EdgeNeXt's ``fourier_pos`` (the same formula: scale 2π, eps 1e-6,
  temperature, t_m = temperature ^ (2⌊m/2⌋ / hidden), `edgecl.arch.sdta_ops`) on the patch map whose sizes it is
  given, then its ``token_projection`` (1×1 conv); the reshape to tokens after it is an ordinary view.
- ``XCA`` (cross-covariance attention over the tokens): qkv (1×1 conv) → slices q, k, v → ``channel_attention``
  {heads} (L2 norms over the tokens, per-head temperature) → proj, as EdgeNeXt's (`fx_edgenext._xca`).
- ``LPI`` (local patch interaction): tokens → their (C, H, W) grid (``reshape``) → conv1 (depthwise) → act →
  BatchNorm → conv2 (depthwise) → tokens again.

CaiT's class attention (``ClassAttn``, XCiT's class-attention layers) is kept whole too (`class_attn`).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.errors import UsageError

_MODULE = "timm.models.xcit"


def _is(m: Any, cls: str) -> bool:
    return (type(m).__module__, type(m).__name__) == (_MODULE, cls)


def is_xcit_pos(m: Any) -> bool:
    """timm's XCiT PositionalEncodingFourier, judged by its class; timm is not imported."""
    return _is(m, "PositionalEncodingFourier")


def is_xcit_xca(m: Any) -> bool:
    """timm's XCiT cross-covariance attention (``XCA``)."""
    return _is(m, "XCA")


# class attentions by class → their q, k, v Linears' names: CaiT's ClassAttn (XCiT's class-attention layers use it)
# and CrossViT's CrossAttention (the one branch's class token attending to the other branch's tokens)
_CLASS_ATTNS = {("timm.models.cait", "ClassAttn"): ("q", "k", "v"),
                ("timm.models.crossvit", "CrossAttention"): ("wq", "wk", "wv")}


def is_class_attn(m: Any) -> bool:
    """timm's class attention: CaiT's ``ClassAttn`` or CrossViT's ``CrossAttention`` (`_CLASS_ATTNS`)."""
    return (type(m).__module__, type(m).__name__) in _CLASS_ATTNS


def is_xcit_lpi(m: Any) -> bool:
    """timm's XCiT local patch interaction (``LPI``)."""
    return _is(m, "LPI")


def traced_int(arg: Any) -> int | None:
    """A size argument's value at the import shape: an int, or a traced scalar (`fx_import._ShapeProp` keeps it)."""
    if isinstance(arg, int):
        return arg
    value = arg.meta.get("value") if isinstance(arg, fx.Node) else None
    return value if isinstance(value, int) else None


def map_behind(node: fx.Node, sizes: list[Any]) -> fx.Node | None:
    """The map (B, C, H, W) of the given height and width that the sizes were read from (``x.shape[2]``), else the
    latest such map computed before the call (the tracer may have made the sizes plain ints); None if there is none.
    ``fourier_pos`` reads it for its height, width and batch only."""
    hw = [traced_int(s) for s in sizes]
    seen, todo = set(), [s for s in sizes if isinstance(s, fx.Node)]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        shape = shape_of(n)
        if shape is None:
            todo.extend(n.all_input_nodes)
        elif len(shape) == 3 and shape[1:] == hw:
            return n
    n = node.prev
    while n.op != "root":
        shape = shape_of(n)
        if shape is not None and len(shape) == 3 and shape[1:] == hw:
            return n
        n = n.prev
    return None


class _XcitConverter:
    """Mixin of `fx_import._Converter`: XCiT's position encoding, XCA and LPI, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _fourier: Callable[..., str]
    _xca: Callable[..., str]
    _batchnorm: Callable[..., None]
    _activation: Callable[..., None]
    one_call: Callable[..., None]

    def xcit_pos(self, node: fx.Node, m: nn.Module, path: str) -> None:
        """pos_embed(B, Hp, Wp): the Fourier grid of the patch map those sizes were read from, projected."""
        where = f"XCiT PositionalEncodingFourier at {path!r} {location(node)}"
        sizes = [*node.args[1:3], *(node.kwargs[k] for k in ("H", "W") if k in node.kwargs)]
        source = map_behind(node, sizes) if len(sizes) == 2 else None
        if source is None or source not in self.alias or shape_of(node)[1:] != shape_of(source)[1:]:
            raise UsageError(f"{self.name}: {where}: edgecl converts it called with the height and width of a map "
                             f"computed before it from the input (the patch map); gets {[str(s) for s in sizes]}")
        self.one_call(path, node)
        self._fourier(node, m, self.alias[source], path, where)

    def xcit_xca(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """XCA over the tokens: EdgeNeXt's channel attention, the tokens as a (C, T, 1) map."""
        self._xca(node, m, x, path, f"XCiT XCA at {path!r} {location(node)}")

    def class_attn(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """CaiT's class attention on tokens (C, T, 1): q of the class token (token 0) only, k and v of every token,
        ``attention`` {heads, scale} of that one query over them, proj; the class token's new value (C, 1, 1)."""
        where = f"class attention ({type(m).__name__}) at {path!r} {location(node)}"
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        names = (*_CLASS_ATTNS[(type(m).__module__, type(m).__name__)], "proj")
        q, k, v, proj = (linear(self.name, where, getattr(m, p)) for p in names)
        ch, heads = q.in_features, int(m.num_heads)
        if any(lin.in_features != ch or lin.out_features != ch for lin in (q, k, v, proj)) or ch % heads:
            raise UsageError(f"{self.name}: {where}: q, k, v and proj must map {ch} channels to {ch} of {heads} heads")
        cls = self._emit(node, "token", [x], f"{path}.cls", index=0, count=1)
        qs = self._emit(node, "conv", [cls], f"{path}.{names[0]}", **pointwise(q))
        ks, vs = (self._emit(node, "conv", [x], f"{path}.{p}", **pointwise(lin)) for p, lin in zip(names[1:3], (k, v)))
        attended = self._emit(node, "attention", [qs, ks, vs], f"{path}.attend", heads=heads,
                              scale=applied_scale(m, ch // heads))
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))

    def xcit_lpi(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """LPI(x, H, W): the tokens as their H × W grid, two depthwise convs with act and BatchNorm, tokens again."""
        where = f"XCiT LPI at {path!r} {location(node)}"
        tokens = shape_of(node.args[0])
        h, w = (traced_int(a) for a in [*node.args[1:3], *(node.kwargs[k] for k in ("H", "W") if k in node.kwargs)])
        if tokens is None or len(tokens) != 2 or h is None or w is None or h * w != tokens[0]:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (B, H·W, C) with the grid's H and W; "
                             f"gets tokens {tokens} and H, W = {h}, {w}")
        ch = tokens[1]
        for conv in ("conv1", "conv2"):
            c = getattr(m, conv)
            if not isinstance(c, nn.Conv2d) or c.stride != (1, 1) or c.groups != ch or c.out_channels != ch or \
                    c.kernel_size != (2 * c.padding[0] + 1, 2 * c.padding[1] + 1):
                raise UsageError(f"{self.name}: {where}: its {conv} is not a depthwise stride-1 'same' nn.Conv2d of "
                                 f"{ch} channels (timm's LPI)")
        if not isinstance(m.bn, nn.BatchNorm2d):
            raise UsageError(f"{self.name}: {where}: its bn is a {type(m.bn).__name__}; edgecl converts a BatchNorm2d")
        h_map = self._emit(node, "reshape", [x], f"{path}.grid", shape=[ch, h, w])
        h_map = self._conv(node, m.conv1, h_map, f"{path}.conv1", where)
        self._activation(node, m.act, h_map, f"{path}.act")
        self._batchnorm(node, m.bn, self.alias[node], f"{path}.bn")
        h_map = self._conv(node, m.conv2, self.alias[node], f"{path}.conv2", where)
        self._emit(node, "reshape", [h_map], f"{path}.tokens", shape=[ch, h * w, 1])
