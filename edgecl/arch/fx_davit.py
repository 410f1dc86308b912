"""DaViT's dual attention (timm's ``timm.models.davit``: davit_*) in a user's network, for `fx_import._Converter`.
The tracer keeps two of its layers whole; each becomes ops edgecl already has:

- ``SpatialBlock`` (on the (C, H, W) map; its windows go through 6-D views and a channels-last ``F.pad``): cpe1
  (depthwise 3×3 conv, act, add) → norm1 (LayerNorm over the channels) → pad zeros right and bottom to a multiple
  of the window → attn.qkv (1×1 conv) → slices q, k, v → attention {window, heads, scale} → crop (a negative pad) →
  attn.proj → add → cpe2 → norm2 → mlp (fc1, act, fc2) → add. As in Twins (`fx_twins`) the padded positions are
  zeros before qkv, so their keys (the qkv bias) join the attention as timm's do, and the crop drops their outputs.
- ``ChannelAttention`` (on tokens, their (C, T, 1) value): qkv (1×1 conv) → slices q, k, v → ``channel_attention``
  {heads, normalize false, scale head_dim^-0.5} of inputs (k, v, q): per head, softmax over v's channels of
  scale·kᵀv, applied to q (timm's ``attn @ q^T``) → proj. ``ChannelAttentionV2`` (DaViT v2) is the same op on
  (q, k, v) with its scale (N^-0.5 of the import shape's tokens when dynamic, else head_dim^-0.5).

The ChannelBlock around the channel attention (ConvPosEnc, norms, MLP, residual sums, the tokens' view back to a
map), the stem and the downsampling are traced. A layer other than timm's in any of those places, and a dropout or
drop path that is not an identity at inference, are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_activations import module_activation
from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, map_shape, shape_of
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

_DAVIT = "timm.models.davit"
_KINDS = {"SpatialBlock": "spatial", "ChannelAttention": "channel", "ChannelAttentionV2": "channel_v2"}


def _kind(m: Any) -> str | None:
    return _KINDS.get(type(m).__name__) if type(m).__module__ == _DAVIT else None


def is_davit_spatial(m: Any) -> bool:
    """DaViT's window-attention block (``SpatialBlock``), judged by its class; timm is not imported."""
    return _kind(m) == "spatial"


def is_davit_channel(m: Any) -> bool:
    """DaViT's channel attention (``ChannelAttention`` or v2's ``ChannelAttentionV2``), on tokens."""
    return _kind(m) in ("channel", "channel_v2")


class _DavitConverter:
    """Mixin of `fx_import._Converter`: DaViT's spatial blocks and channel attentions, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _activation: Callable[..., None]
    attend_packed: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]

    def davit_spatial(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"DaViT SpatialBlock at {path!r} {location(node)}"
        ch, *hw = map_shape(node, self.name, where)
        check_drops(self.name, where, m, "drop_path1", *(("drop_path2",) if m.mlp is not None else ()))
        check_kind(self.name, where, m, "attn", (_DAVIT, "WindowAttention"))
        attn, ws = m.attn, [int(w) for w in m.window_size]
        qkv, proj, heads = linear(self.name, where, attn.qkv), linear(self.name, where, attn.proj), int(attn.num_heads)
        if qkv.in_features != ch or qkv.out_features != 3 * ch or proj.in_features != ch or \
                proj.out_features != ch or ch % heads:
            raise UsageError(f"{self.name}: {where}: qkv of {qkv.in_features}→{qkv.out_features}, proj of "
                             f"{proj.in_features}→{proj.out_features} and {heads} heads are not DaViT's for {ch} "
                             "channels")
        shortcut = self._cpe(node, m.cpe1, x, f"{path}.cpe1", where)
        h = self.swin_norm(node, m.norm1, shortcut, f"{path}.norm1", where)
        pad = [0, 0, -hw[0] % ws[0], -hw[1] % ws[1]]  # (top, left, bottom, right): timm pads right and bottom
        h = self._emit(node, "pad", [h], f"{path}.pad", pads=pad) if any(pad) else h
        packed = self._emit(node, "conv", [h], f"{path}.attn.qkv", **pointwise(qkv))
        h = self.attend_packed(node, packed, f"{path}.attn", ch, heads=heads, scale=applied_scale(attn, ch // heads),
                                window=ws)
        h = self._emit(node, "pad", [h], f"{path}.crop", pads=[-p for p in pad]) if any(pad) else h
        h = self._emit(node, "conv", [h], f"{path}.attn.proj", **pointwise(proj))
        h = self._cpe(node, m.cpe2, self._emit(node, "add", [shortcut, h], f"{path}.add1"), f"{path}.cpe2", where)
        if m.mlp is not None:
            check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
            if not isinstance(m.mlp.norm, nn.Identity):
                raise UsageError(f"{self.name}: {where}: its mlp has a {type(m.mlp.norm).__name__} norm; edgecl "
                                 "converts timm's Mlp without one")
            out = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, h, f"{path}.norm2", where),
                                f"{path}.mlp", where)
            self._emit(node, "add", [h, out], f"{path}.add2")

    def _cpe(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's ConvPosEnc: x + act(depthwise conv of x), act a GELU or nothing."""
        check_kind(self.name, where, m, "proj", ("torch.nn.modules.conv", "Conv2d"))
        if (type(m).__module__, type(m).__name__) != (_DAVIT, "ConvPosEnc"):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__}; edgecl converts DaViT's "
                             "ConvPosEnc there")
        h = self._conv(node, m.proj, x, f"{path}.proj", where)
        if not isinstance(m.act, nn.Identity):
            if module_activation(m.act) is None:
                raise UsageError(f"{self.name}: {where}: {path}.act is a {type(m.act).__name__}; edgecl converts "
                                 "an activation or an identity there")
            self._activation(node, m.act, h, f"{path}.act")
            h = self.alias[node]
        return self._emit(node, "add", [x, h], f"{path}.add")

    def davit_channel(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """DaViT's channel attention over tokens (B, N, C): ``channel_attention`` without normalisation, its fixed
        scale, on (k, v, q) (v1: kᵀv applied to q) or (q, k, v) (v2: qᵀk applied to v)."""
        where = f"DaViT {type(m).__name__} at {path!r} {location(node)}"
        tokens = shape_of(node.args[0])
        if tokens is None or len(tokens) != 2:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (batch, tokens, channels); gets "
                             f"{tokens}")
        (n, ch), v2 = tokens, _kind(m) == "channel_v2"
        qkv, proj = linear(self.name, where, m.qkv), linear(self.name, where, m.proj)
        heads = int(m.groups if v2 else m.num_heads)
        if qkv.in_features != ch or qkv.out_features != 3 * ch or proj.in_features != ch or \
                proj.out_features != ch or ch % heads:
            raise UsageError(f"{self.name}: {where}: qkv of {qkv.in_features}→{qkv.out_features}, proj of "
                             f"{proj.in_features}→{proj.out_features} and {heads} heads are not DaViT's for {ch} "
                             "channels")
        scale = (n ** -0.5 if m.dynamic_scale else m.head_dim ** -0.5) if v2 else m.scale
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv))
        q, k, v = (self._emit(node, "slice", [packed], f"{path}.{p}", start=i * ch, stop=(i + 1) * ch)
                   for i, p in enumerate("qkv"))
        attended = self._emit(node, "channel_attention", [q, k, v] if v2 else [k, v, q], f"{path}.attend",
                              heads=heads, normalize=False, scale=float(scale))
        self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))
