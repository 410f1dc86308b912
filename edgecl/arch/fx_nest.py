"""NesT's levels (timm's ``timm.models.nest``: nest_*, jx_nest_*) in a user's network, for `fx_import._Converter`.
The tracer keeps each ``NestLevel`` whole: it cuts the channels-last map into blocks through 6-D views
(``blockify``/``deblockify``) the spec has no values for. On the (C, H, W) map it reads, a level becomes

    ConvPool (levels after the first): conv (3×3) → LayerNorm over the channels → maxpool 3×3 stride 2 (padding 1,
    or TensorFlow's "same" as a -inf pad right and bottom and the plain pool) → pos_embed {block s} → per
    TransformerLayer: norm1 → attn.qkv (1×1 conv) → slices q, k, v → attention {window [s, s], heads, scale} →
    shuffle {groups heads} (timm's attention lays its output out head_dim by heads: channel c·heads + head) →
    attn.proj → add → norm2 → mlp (fc1, act, fc2) → add

Attention within blockify's blocks is the window attention over the map's s × s windows (blocks row by row, each
block's positions row by row), and the norms and MLP act per position, so the whole level runs on the map. The
position embedding timm stores block by block, ``(1, blocks, s·s, C)``; the spec holds it in map order and its
``block`` field tells `module_state` how to read the module's tensor (the sum is the one timm's forward adds). A
layer other than timm's in any place, a dropout or drop path that is not an identity at inference, and a map that
is not square or not whole blocks are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, map_shape, pair, shape_of
from edgecl.arch.fx_padding import same_kind, same_padding
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

_NEST = "timm.models.nest"


def is_nest_level(m: Any) -> bool:
    """NesT's hierarchical level (``NestLevel``), judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_NEST, "NestLevel")


class _NestConverter:
    """Mixin of `fx_import._Converter`: NesT's levels, kept whole."""

    name: str
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    parameter: Callable[..., Any]
    claim: Callable[..., None]
    attend_packed: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]

    def nest_level(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"NesT NestLevel at {path!r} {location(node)}"
        map_shape(node, self.name, where)
        if not isinstance(m.pool, nn.Identity):
            x = self._conv_pool(node, m.pool, x, f"{path}.pool", where)
        ch, *hw = shape_of(node)
        s, embed = int(m.block_size), self.parameter(f"{path}.pos_embed", node)
        if hw[0] != hw[1] or hw[0] % s or tuple(embed.shape) != (1, (hw[0] // s) ** 2, s * s, ch):
            raise UsageError(f"{self.name}: {where}: edgecl converts it on a square map of whole {s} × {s} blocks "
                             f"with a position embedding of shape (1, blocks, {s * s}, {ch}); gets a {hw} map of "
                             f"{ch} channels and an embedding of shape {tuple(embed.shape)}")
        self.claim(f"{path}.pos_embed", node)
        frozen = {"frozen": True} if not embed.requires_grad else {}
        h = self._emit(node, "pos_embed", [x], f"{path}.pos_embed", ch=ch, tokens=hw[0] * hw[1], block=s, **frozen)
        for i, layer in enumerate(m.transformer_encoder):
            h = self._layer(node, layer, h, f"{path}.transformer_encoder.{i}", where, ch, s)

    def _layer(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch: int, s: int) -> str:
        """timm's TransformerLayer on the map: attention within the s × s blocks, then the MLP, each residual."""
        if (type(m).__module__, type(m).__name__) != (_NEST, "TransformerLayer"):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__}; edgecl converts NesT's "
                             "TransformerLayer there")
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_NEST, "Attention"))
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        attn = m.attn
        check_drops(self.name, where, attn, "attn_drop", "proj_drop")
        qkv, proj, heads = linear(self.name, where, attn.qkv), linear(self.name, where, attn.proj), int(attn.num_heads)
        if qkv.in_features != ch or qkv.out_features != 3 * ch or proj.in_features != ch or \
                proj.out_features != ch or ch % heads or not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: qkv of {qkv.in_features}→{qkv.out_features}, proj of "
                             f"{proj.in_features}→{proj.out_features}, {heads} heads and an mlp norm "
                             f"{type(m.mlp.norm).__name__} are not NesT's for {ch} channels")
        h = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        packed = self._emit(node, "conv", [h], f"{path}.attn.qkv", **pointwise(qkv))
        h = self.attend_packed(node, packed, f"{path}.attn", ch, heads=heads, scale=applied_scale(attn, ch // heads),
                                window=[s, s])
        if heads > 1:  # timm's output channels are (head_dim, heads), c·heads + head: the heads shuffled in
            h = self._emit(node, "shuffle", [h], f"{path}.attn.heads", groups=heads)
        h = self._emit(node, "conv", [h], f"{path}.attn.proj", **pointwise(proj))
        x = self._emit(node, "add", [x, h], f"{path}.add1")
        out = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, x, f"{path}.norm2", where), f"{path}.mlp",
                            where)
        return self._emit(node, "add", [x, out], f"{path}.add2")

    def _conv_pool(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's ConvPool: conv, LayerNorm over the channels (of the channels-last view), max pool."""
        if (type(m).__module__, type(m).__name__) != (_NEST, "ConvPool"):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__}; edgecl converts NesT's "
                             "ConvPool there")
        h = self._conv(node, m.conv, x, f"{path}.conv", where)
        h = self.swin_norm(node, m.norm, h, f"{path}.norm", where)
        pool, side = m.pool, shape_of(node.args[0])[1:]
        if type(pool) is nn.MaxPool2d and not pool.ceil_mode and pool.dilation in (1, (1, 1)):
            return self._emit(node, "maxpool", [h], f"{path}.pool", k=pair(pool.kernel_size), dilation=[1, 1],
                              stride=pair(pool.stride), pad=pair(pool.padding), ceil_mode=False)
        if same_kind(pool) != "max" or pool.ceil_mode or pair(pool.dilation) != [1, 1]:
            raise UsageError(f"{self.name}: {where}: its pool is a {type(pool).__name__}; edgecl converts timm's "
                             "max pool (nn.MaxPool2d or MaxPool2dSame, no dilation or ceil mode) there")
        k, stride = pair(pool.kernel_size), pair(pool.stride)
        (top, bottom), (left, right) = (same_padding(side[a], k[a], stride[a], 1) for a in range(2))
        h = self._emit(node, "pad", [h], f"{path}.pool.same_pad", pads=[top, left, bottom, right], value="-inf")
        return self._emit(node, "maxpool", [h], f"{path}.pool", k=k, stride=stride, pad=[0, 0], dilation=[1, 1],
                          ceil_mode=False)
