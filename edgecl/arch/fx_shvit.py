"""SHViT's single-head self-attention (timm's ``timm.models.shvit``: shvit_*) in a user's network, for
`fx_import._Converter`. The tracer keeps ``SHSA`` whole (it flattens q, k and v of a channel split and multiplies
them with ``@``, which the spec has no values for); the blocks, patch merging and FFNs around it are traced. On
the (C, H, W) map it reads it becomes

    slices x1 (the first pdim channels) and x2 (the rest) → pre_norm (GroupNorm of one group: a ``layer_norm`` over
    x1's map) → qkv (1×1 conv, BatchNorm) → slices q, k (qk_dim each), v (pdim) → attention {1 head, scale
    qk_dim^-0.5} of every position over every position → cat with x2 → proj (ReLU, 1×1 conv, BatchNorm)

timm's forward always multiplies by ``m.scale`` (no fused path). Other layers in its places, and a split that is
not the module's (pdim of dim channels) are refused by name with the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.errors import UsageError

_SHVIT = "timm.models.shvit"


def is_shvit_attention(m: Any) -> bool:
    """SHViT's single-head self-attention (``SHSA``), judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_SHVIT, "SHSA")


class _ShvitConverter:
    """Mixin of `fx_import._Converter`: SHViT's SHSA, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _batchnorm: Callable[..., None]
    _act: Callable[..., str]
    _group_norm1: Callable[..., str]

    def shvit_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"SHViT SHSA at {path!r} {location(node)}"
        ch = map_shape(node, self.name, where)[0]
        dim, pdim, qk = int(m.dim), int(m.pdim), int(m.qk_dim)
        if ch != dim or not 0 < pdim <= dim or qk < 1:
            raise UsageError(f"{self.name}: {where}: a map of {ch} channels with dim {dim}, pdim {pdim} and qk_dim "
                             f"{qk} is not SHViT's split")
        x1 = self._emit(node, "slice", [x], f"{path}.x1", start=0, stop=pdim)
        h = self._group_norm1(node, m.pre_norm, x1, f"{path}.pre_norm", where)
        qkv = self._shvit_conv_norm(node, m.qkv, h, f"{path}.qkv", where, pdim, 2 * qk + pdim)
        q, k, v = (self._emit(node, "slice", [qkv], f"{path}.{p}", start=a, stop=b)
                   for p, a, b in (("q", 0, qk), ("k", qk, 2 * qk), ("v", 2 * qk, 2 * qk + pdim)))
        h = self._emit(node, "attention", [q, k, v], f"{path}.attend", heads=1, scale=float(m.scale))
        if pdim < dim:
            x2 = self._emit(node, "slice", [x], f"{path}.x2", start=pdim, stop=dim)
            h = self._emit(node, "cat", [h, x2], f"{path}.cat")
        proj = m.proj
        if not isinstance(proj, nn.Sequential) or len(proj) != 2:
            raise UsageError(f"{self.name}: {where}: its proj is a {type(proj).__name__}; edgecl converts SHViT's "
                             "(an activation, then a Conv2dNorm)")
        h = self._act(node, proj[0], h, f"{path}.proj.0", where)
        self._shvit_conv_norm(node, proj[1], h, f"{path}.proj.1", where, dim, dim)

    def _shvit_conv_norm(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, ch_in: int,
                         ch_out: int) -> str:
        """timm's Conv2dNorm: a 1×1 conv of `ch_in` to `ch_out` channels, then its BatchNorm."""
        if (type(m).__module__, type(m).__name__) != (_SHVIT, "Conv2dNorm") or type(m.c) is not nn.Conv2d or \
                type(m.bn) is not nn.BatchNorm2d or m.c.in_channels != ch_in or m.c.out_channels != ch_out or \
                m.c.kernel_size != (1, 1) or m.c.stride != (1, 1) or m.c.groups != 1:
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__}; edgecl converts SHViT's "
                             f"Conv2dNorm there (a 1×1 nn.Conv2d of {ch_in} to {ch_out} channels and a BatchNorm2d)")
        self._batchnorm(node, m.bn, self._conv(node, m.c, x, f"{path}.c", where), f"{path}.bn")
        return self.alias[node]
