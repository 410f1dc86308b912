"""Next-ViT's efficient multi-head self-attention (timm's ``timm.models.nextvit``: nextvit_*) in a user's network, for
`fx_import._Converter`. The tracer keeps ``EfficientAttention`` whole (it reshapes q, k and v into heads, and
sub-samples the keys' tokens with an ``nn.AvgPool1d`` over the channels-first transpose). On the tokens' (C, T, 1)
spec value (`fx_tokens`; the block around it, its BatchNorms, NCB blocks and ConvMlps, is traced) it becomes

    q (1×1 conv) of every token;  keys and values of the tokens, or with sr_ratio > 1 of the tokens averaged in runs
    of sr_ratio² (AvgPool1d over the token axis: runs of consecutive tokens, row by row, which need not be
    rectangles of the map) → its BatchNorm1d over the channels;  k, v (1×1 convs) → attention {heads of head_dim}
    → proj

The runs are a ``reshape`` of the (C, T, 1) tokens to (C, T / r², r²) and an average pool of kernel (1, r²): the
same tokens in the same order, so no map shape is assumed. A pool other than timm's (kernel = stride = sr_ratio²,
no padding), tokens the runs do not tile, other layers in its places and a dropout that is not an identity at
inference are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.errors import UsageError

_NEXTVIT = "timm.models.nextvit"


def is_nextvit_attention(m: Any) -> bool:
    """Next-ViT's ``EfficientAttention`` (E-MHSA), judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_NEXTVIT, "EfficientAttention")


class _NextVitConverter:
    """Mixin of `fx_import._Converter`: Next-ViT's E-MHSA, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _batchnorm: Callable[..., None]

    def nextvit_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"Next-ViT EfficientAttention at {path!r} {location(node)}"
        tokens = shape_of(node.args[0])
        if node.args[0] not in self.last or tokens is None or len(tokens) != 2:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (batch, tokens, channels); gets "
                             f"{tokens}")
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        (n, ch), heads = tokens, int(m.num_heads)
        q, k, v, proj = (linear(self.name, where, getattr(m, p)) for p in ("q", "k", "v", "proj"))
        if any(p.in_features != ch or p.out_features != ch for p in (q, k, v)) or proj.in_features != ch or \
                heads * int(m.head_dim) != ch:
            raise UsageError(f"{self.name}: {where}: q, k, v of {q.in_features}→{q.out_features}, "
                             f"{k.in_features}→{k.out_features}, {v.in_features}→{v.out_features} and {heads} heads "
                             f"of {m.head_dim} are not Next-ViT's attention for {ch} channels")
        qs = self._emit(node, "conv", [x], f"{path}.q", **pointwise(q))
        source = x if m.sr is None else self._nextvit_reduce(node, m, x, path, where, n, ch)
        ks = self._emit(node, "conv", [source], f"{path}.k", **pointwise(k))
        vs = self._emit(node, "conv", [source], f"{path}.v", **pointwise(v))
        attended = self._emit(node, "attention", [qs, ks, vs], f"{path}.attend", heads=heads,
                              scale=applied_scale(m, int(m.head_dim)))
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))
        self.last.add(node)

    def _nextvit_reduce(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, n: int, ch: int) -> str:
        """The tokens averaged in runs of sr_ratio² consecutive ones, then the BatchNorm1d over the channels."""
        pool, run = m.sr, int(m.N_ratio)
        if type(pool) is not nn.AvgPool1d or tuple(pool.kernel_size) != (run,) or tuple(pool.stride) != (run,) or \
                tuple(pool.padding) != (0,) or n % run:
            raise UsageError(f"{self.name}: {where}: its sr is a {type(pool).__name__} over {n} tokens; edgecl "
                             f"converts an nn.AvgPool1d of kernel and stride {run} (sr_ratio²), no padding, over "
                             "tokens it tiles")
        if type(m.norm) is not nn.BatchNorm1d or m.norm.num_features != ch:
            raise UsageError(f"{self.name}: {where}: its norm is a {type(m.norm).__name__}; edgecl converts an "
                             f"nn.BatchNorm1d of {ch} channels there")
        runs = self._emit(node, "reshape", [x], f"{path}.sr.runs", shape=[ch, n // run, run])
        pooled = self._emit(node, "avgpool", [runs], f"{path}.sr", k=[1, run], stride=[1, run], pad=[0, 0],
                            ceil_mode=False, count_include_pad=True)
        self._batchnorm(node, m.norm, pooled, f"{path}.norm")
        return self.alias[node]
