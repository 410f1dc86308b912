"""EdgeNeXt's split depth-wise transposed attention block (timm's ``edgenext.SplitTransposeBlock``, SDTA) in a
user's network, for `fx_import._Converter`. The tracer keeps it whole: its position encoding builds a mask with
``torch.zeros(shape)`` in forward, and its XCA runs on (B, N, C) token views the spec has no nodes for. On the
block's (C, H, W) map it is

    chunk into s + 1 parts (slices) → part 0: conv 0; part i: add the previous output, conv i (depthwise 3×3)
    → cat(convs' outputs, last part) → [fourier_pos {hidden, temperature} → pos_embd.token_projection (1×1 conv)
    → add] → norm_xca (LayerNorm over the channels) → xca.qkv (1×1 conv) → slices q, k, v
    → channel_attention {heads} → xca.proj → gamma_xca (layer scale) → add
    → norm → mlp (fc1, act, fc2) → gamma (layer scale) → add the block's input

Every tensor node is named by its module path, so the module's weights read as they are; the Fourier grid is a
function of the map's shape, never a stored tensor (`edgecl.arch.sdta_ops`). A layer other than timm's in any of
those places, a dropout or drop path that is not an identity at inference, a chunking whose parts do not match the
convs, are refused by name with the user's source line.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, map_shape
from edgecl.arch.fx_norms import layer_scale_fields
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

SDTA_BLOCK = ("timm.models.edgenext", "SplitTransposeBlock")
# the same XCA and Fourier encoding in EdgeNeXt and in XCiT (`fx_xcit`): one formula, one conversion
_XCA = (("timm.models.edgenext", "CrossCovarianceAttn"), ("timm.models.xcit", "XCA"))
_POS = (("timm.models.edgenext", "PositionalEncodingFourier"), ("timm.models.xcit", "PositionalEncodingFourier"))


def is_sdta_block(m: Any) -> bool:
    """timm's EdgeNeXt SplitTransposeBlock, judged by its class; timm is not imported for this."""
    return (type(m).__module__, type(m).__name__) == SDTA_BLOCK


class _EdgeNextConverter:
    """Mixin of `fx_import._Converter`: EdgeNeXt's SDTA blocks, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]

    def sdta_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"EdgeNeXt SplitTransposeBlock at {path!r} {location(node)}"
        shape = map_shape(node, self.name, where)
        check_drops(self.name, where, m, "drop_path")
        h = self._split_convs(node, m, x, path, where, shape[0])
        if m.pos_embd is not None:
            h = self._emit(node, "add", [h, self._fourier(node, m.pos_embd, h, f"{path}.pos_embd", where)],
                           f"{path}.add_pos")
        normed = self.swin_norm(node, m.norm_xca, h, f"{path}.norm_xca", where)
        attended = self._scaled(node, m, "gamma_xca", self._xca(node, m.xca, normed, f"{path}.xca", where), path,
                                where)
        h = self._emit(node, "add", [h, attended], f"{path}.add_xca")
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        if not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: its mlp has a {type(m.mlp.norm).__name__} norm; edgecl converts "
                             "timm's Mlp without one")
        out = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm, h, f"{path}.norm", where), f"{path}.mlp", where)
        self._emit(node, "add", [x, self._scaled(node, m, "gamma", out, path, where)], f"{path}.add")

    def _split_convs(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch: int) -> str:
        """x.chunk(len(convs) + 1) along the channels, each part but the last through its depthwise conv after the
        previous conv's output is added (Res2Net's hierarchy), then all side by side again."""
        for i, conv in enumerate(m.convs):
            if not isinstance(conv, nn.Conv2d):
                raise UsageError(f"{self.name}: {where}: its convs.{i} is a {type(conv).__name__}; edgecl converts "
                                 "an nn.Conv2d there (timm's depthwise 3×3)")
        parts = len(m.convs) + 1
        size = math.ceil(ch / parts)
        bounds = [(i * size, min(ch, (i + 1) * size)) for i in range(parts)]
        if bounds[-1][0] >= ch or any(c.in_channels != size or c.out_channels != size for c in m.convs):
            raise UsageError(f"{self.name}: {where}: chunking {ch} channels into {parts} parts gives {size}-channel "
                             f"parts; its convs read {[c.in_channels for c in m.convs]}")
        cut = [self._emit(node, "slice", [x], f"{path}.split{i}", start=a, stop=b) for i, (a, b) in enumerate(bounds)]
        outs: list[str] = []
        for i, conv in enumerate(m.convs):
            sp = cut[0] if i == 0 else self._emit(node, "add", [outs[-1], cut[i]], f"{path}.sum{i}")
            outs.append(self._conv(node, conv, sp, f"{path}.convs.{i}", where))
        return self._emit(node, "cat", [*outs, cut[-1]], f"{path}.cat")

    def _fourier(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's PositionalEncodingFourier: the sine–cosine grid of the map's shape and its learned 1×1 conv."""
        check_kind(self.name, where, m, "token_projection", ("torch.nn.modules.conv", "Conv2d"))
        if (type(m).__module__, type(m).__name__) not in _POS or m.scale != 2 * math.pi or \
                getattr(m, "eps", 1e-6) != 1e-6 or m.token_projection.in_channels != 2 * m.hidden_dim:
            raise UsageError(f"{self.name}: {where}: pos_embd is a {type(m).__name__}; edgecl converts timm's "
                             "PositionalEncodingFourier (scale 2π, eps 1e-6, a 1×1 conv of its 2·hidden_dim channels)")
        grid = self._emit(node, "fourier_pos", [x], f"{path}.grid", hidden=int(m.hidden_dim),
                          temperature=float(m.temperature))
        return self._conv(node, m.token_projection, grid, f"{path}.token_projection", where)

    def _xca(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's CrossCovarianceAttn on the map: qkv packs q, k and v as three blocks of heads; channel attention
        with the per-head temperature; proj."""
        if (type(m).__module__, type(m).__name__) not in _XCA:
            raise UsageError(f"{self.name}: {where}: its xca is a {type(m).__name__}; edgecl converts timm's "
                             "CrossCovarianceAttn (EdgeNeXt) or XCA (XCiT)")
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        qkv, proj, heads = linear(self.name, where, m.qkv), linear(self.name, where, m.proj), int(m.num_heads)
        ch = qkv.in_features
        shape = tuple(m.temperature.shape) if isinstance(m.temperature, torch.Tensor) else type(m.temperature).__name__
        if qkv.out_features != 3 * ch or ch % heads or shape != (heads, 1, 1):
            raise UsageError(f"{self.name}: {where}: qkv of {qkv.out_features} outputs and a temperature of {shape} "
                             f"(a tensor of its heads) do not make q, k, v of {heads} heads of {ch} channels")
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv))
        q, k, v = (self._emit(node, "slice", [packed], f"{path}.{part}", start=i * ch, stop=(i + 1) * ch)
                   for i, part in enumerate("qkv"))
        attended = self._emit(node, "channel_attention", [q, k, v], f"{path}.attend", module=path, heads=heads)
        return self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))

    def _scaled(self, node: fx.Node, m: nn.Module, gamma: str, x: str, path: str, where: str) -> str:
        """The block's layer scale γ (a per-channel parameter), or x where timm has none (ls_init_value 0)."""
        p = getattr(m, gamma)
        if p is None:
            return x
        if not isinstance(p, torch.Tensor):
            raise UsageError(f"{self.name}: {where}: its {gamma} is a {type(p).__name__}; edgecl converts a "
                             "per-channel tensor (timm's layer scale) or None there")
        return self._emit(node, "layer_scale", [x], f"{path}.{gamma}", **layer_scale_fields(p, int(p.numel())))
