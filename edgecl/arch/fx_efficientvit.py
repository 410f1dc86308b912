"""EfficientViT's (MIT, timm ``efficientvit_b*``) lightweight multi-scale linear attention (``LiteMLA``) in a user's
network, for `fx_import._Converter`. The tracer keeps it whole: its forward reshapes the multi-scale q, k, v to
(B, heads, T, 3·dim) and pads v with ones, views the spec has no nodes for. On the (C, H, W) map it is

    qkv (ConvNormAct: 1×1 conv) → for each scale s: aggreg (depthwise s×s conv, grouped 1×1 conv per head)
    → cat(qkv, aggregated…) → per head (dim q, dim k, dim v side by side) slices → q, k, v
    → linear_attention {heads (1 + scales)·heads, eps, kernel relu} → proj (ConvNormAct)

Every tensor node is named by its module path, so the module's weights read as they are. A kernel other than ReLU,
another conv or norm in a ConvNormAct, a dropout that is not an identity at inference are refused by name with the
user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError

LITE_MLA = ("timm.models.efficientvit_mit", "LiteMLA")


def is_lite_mla(m: Any) -> bool:
    """timm's LiteMLA (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == LITE_MLA


class _EfficientVitConverter:
    """Mixin of `fx_import._Converter`: LiteMLA modules kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]  # `fx_split_attn`'s: a plain nn.Conv2d, named by its path
    _norm: Callable[..., str]
    _act: Callable[..., str]
    _head_blocks: Callable[..., list[str]]

    def lite_mla(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"LiteMLA at {path!r} {location(node)}"
        map_shape(node, self.name, where)
        if type(m.kernel_func) is not nn.ReLU:
            raise UsageError(f"{self.name}: {where}: kernel_func is a {type(m.kernel_func).__name__}; edgecl's "
                             "linear_attention has the ReLU kernel (timm's default)")
        dim, total = int(m.dim), m.qkv.conv.out_channels // 3
        if total % dim or m.qkv.conv.out_channels != 3 * total:
            raise UsageError(f"{self.name}: {where}: qkv has {m.qkv.conv.out_channels} outputs, not 3 × heads × "
                             f"dim {dim}")
        qkv = self._vit_conv_norm_act(node, m.qkv, x, f"{path}.qkv", where)
        scales = [qkv]
        for i, seq in enumerate(m.aggreg):
            parts = list(seq) if isinstance(seq, nn.Sequential) else []
            if len(parts) != 2 or parts[1].groups != 3 * total // dim:
                raise UsageError(f"{self.name}: {where}: aggreg.{i} must be an nn.Sequential of a depthwise conv and "
                                 f"a 1×1 conv of {3 * total // dim} groups (one per head)")
            h = self._conv(node, parts[0], qkv, f"{path}.aggreg.{i}.0", where)
            scales.append(self._conv(node, parts[1], h, f"{path}.aggreg.{i}.1", where))
        packed = scales[0] if len(scales) == 1 else self._emit(node, "cat", scales, f"{path}.multi_scale")
        heads = len(scales) * total // dim
        q, k, v = self._head_blocks(node, packed, path, heads, [dim, dim, dim])
        out = self._emit(node, "linear_attention", [q, k, v], f"{path}.attend", heads=heads, eps=float(m.eps))
        self.alias[node] = self._vit_conv_norm_act(node, m.proj, out, f"{path}.proj", where)

    def _vit_conv_norm_act(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """EfficientViT's ConvNormAct: dropout (an identity at inference), conv, norm (BatchNorm or none), act."""
        if [n for n, _ in m.named_children()] != ["dropout", "conv", "norm", "act"] or \
                not isinstance(m.dropout, (nn.Dropout, nn.Identity)):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__}; edgecl converts "
                             "EfficientViT's ConvNormAct (dropout, conv, norm, act) there")
        h = self._norm(node, m.norm, self._conv(node, m.conv, x, f"{path}.conv", where), f"{path}.norm", where)
        return h if isinstance(m.act, nn.Identity) else self._act(node, m.act, h, f"{path}.act", where)
