"""TinyViT's block (timm's ``timm.models.tiny_vit.TinyVitBlock``) in a user's network, for `fx_import._Converter`.
It reads and writes a channels-last ``(B, H, W, C)`` map (`fx_norms`); the tracer keeps it whole (its windows go
through 6-D views chosen by Python branches on the map's size). It becomes, in spec ops on the (C, H, W) map:

    attn.norm → attn.qkv (1×1 conv) → per head slices of q, k, v (packed per head, as LeViT's: `fx_levit`) → cats →
    attention {heads, scale, LeViT's bias table and index; window [ws, ws] unless the map is one window} → proj →
    add the input → local_conv (depthwise conv + BatchNorm on the map) → mlp (norm, fc1, act, fc2) → add

TinyViT's attention bias is LeViT's (``attention_biases`` (heads, offsets) with ``attention_bias_idxs`` over one
window), so the node's bias is LeViT's per window. A map the window does not tile (TinyViT then pads it with zeros
that join the attention) is refused by name with the user's source line; so are other layers in its place.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_levit import levit_bias_fields
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

TINY_VIT_BLOCK = ("timm.models.tiny_vit", "TinyVitBlock")


def is_tiny_vit_block(m: Any) -> bool:
    """timm's TinyVitBlock, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == TINY_VIT_BLOCK


class _TinyVitConverter:
    """Mixin of `fx_import._Converter`: TinyViT's blocks, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _batchnorm: Callable[..., None]
    _conv_fields: Callable[..., dict[str, Any]]
    _head_blocks: Callable[..., list[str]]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]

    def tiny_vit_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"TinyViT TinyVitBlock at {path!r} {location(node)}"
        shape, ws = shape_of(node.args[0]), int(m.window_size)
        if node.args[0] not in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports it on "
                             "channels-last (batch, height, width, channels) maps")
        if shape[0] % ws or shape[1] % ws:
            raise UsageError(f"{self.name}: {where}: its {ws}×{ws} windows do not tile the {shape[0]}×{shape[1]} map "
                             "(TinyViT pads it with zeros that join the attention); choose an input size whose "
                             "stage maps the windows divide (224 for tiny_vit_*_224)")
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", ("timm.models.tiny_vit", "Attention"))
        attended = self._tiny_vit_attention(node, m.attn, x, f"{path}.attn", where,
                                            None if shape[:2] == [ws, ws] else [ws, ws])
        h = self._emit(node, "add", [x, attended], f"{path}.add1")
        local = m.local_conv
        if [name for name, _ in local.named_children()] != ["conv", "bn"] or type(local.conv) is not nn.Conv2d or \
                not isinstance(local.bn, nn.BatchNorm2d):
            raise UsageError(f"{self.name}: {where}: local_conv must be timm's ConvNorm (an nn.Conv2d then a "
                             "BatchNorm2d)")
        conv = self._emit(node, "conv", [h], f"{path}.local_conv.conv",
                          **self._conv_fields(node, local.conv, f"{path}.local_conv.conv"))
        self._batchnorm(node, local.bn, conv, f"{path}.local_conv.bn")
        h = self.alias[node]
        mlp = m.mlp
        if type(mlp).__name__ != "NormMlp":
            raise UsageError(f"{self.name}: {where}: its mlp is a {type(mlp).__name__}; edgecl converts TinyViT's "
                             "NormMlp")
        out = self.norm_mlp(node, mlp, self.swin_norm(node, mlp.norm, h, f"{path}.mlp.norm", where), f"{path}.mlp",
                            where)
        self._emit(node, "add", [h, out], f"{path}.add2")
        self.last.add(node)

    def _tiny_vit_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                            window: list[int] | None) -> str:
        """TinyViT's Attention: its norm, qkv packed per head, LeViT's bias (per window), proj."""
        heads, key_dim, val_dim = int(m.num_heads), int(m.key_dim), int(m.val_dim)
        qkv, proj = linear(self.name, where, m.qkv), linear(self.name, where, m.proj)
        if qkv.out_features != heads * (2 * key_dim + val_dim):
            raise UsageError(f"{self.name}: {where}: {path}.qkv has the wrong width for {heads} heads")
        normed = self.swin_norm(node, m.norm, x, f"{path}.norm", where)
        packed = self._emit(node, "conv", [normed], f"{path}.qkv", **pointwise(qkv))
        q, k, v = self._head_blocks(node, packed, f"{path}.qkv", heads, [key_dim, key_dim, val_dim])
        fields: dict[str, Any] = {"window": window} if window else {}
        fields["scale"] = applied_scale(m, key_dim)  # LeViT's fields, but TinyViT's fused path ignores m.scale
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **{**levit_bias_fields(m, path, heads),
                                                                                 **fields})
        return self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))
