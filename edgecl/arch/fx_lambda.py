"""LambdaNetworks' lambda layer (timm's ``LambdaLayer``, ``lambda_resnet*``) in a user's network, for
`fx_import._Converter`. The tracer keeps it whole: its forward reshapes q, k, v to (B, heads, M, K) views and runs
a Conv3d over v as a volume, which the spec has no nodes for. On the (C, H, W) map it is

    qkv (1×1 conv) → slices q (heads·dim), k (dim), v (dv) → norm_q, norm_v (BatchNorms)
    → lambda_layer {heads, dim, r} (tensors: conv_lambda's weight and bias) → pool (2×2 average, where stride 2)

Every tensor node is named by its module path, so the module's weights read as they are. The relative position
variant (``r=None``, ``lambda_resnet26rpt_256``: a learned ``pos_emb`` gathered by index) is a ``lambda_layer``
{heads, dim, rel_pos [H, W]} named ``….lambda`` with its module's path, its tensor the module's ``pos_emb``. Norms
other than BatchNorm2d, a relative embedding built for another map, and a position conv other
than timm's (1 → dim, kernel (r, r, 1), zero padding (r // 2, r // 2, 0), stride 1, bias) are refused by name with
the user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.arch.lambda_ops import lambda_rel_index
from edgecl.errors import UsageError

LAMBDA = ("timm.layers.lambda_layer", "LambdaLayer")


def is_lambda_layer(m: Any) -> bool:
    """timm's LambdaLayer (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == LAMBDA


class _LambdaConverter:
    """Mixin of `fx_import._Converter`: timm's LambdaLayer modules kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _norm: Callable[..., str]

    def lambda_layer(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"LambdaLayer at {path!r} {location(node)}"
        shape = map_shape(node, self.name, where)
        heads, dim, dv = int(m.num_heads), int(m.dim_qk), int(m.dim_v)
        conv = m.conv_lambda
        r = conv.kernel_size[0] if isinstance(conv, nn.Conv3d) else 0
        if conv is None:
            self._relative_lambda(m, where, shape[1:])
        elif not isinstance(conv, nn.Conv3d) or (conv.in_channels, conv.out_channels) != (1, dim) or \
                tuple(conv.kernel_size) != (r, r, 1) or r % 2 == 0 or tuple(conv.padding) != (r // 2, r // 2, 0) or \
                tuple(conv.stride) != (1, 1, 1) or tuple(conv.dilation) != (1, 1, 1) or conv.bias is None or \
                conv.groups != 1 or conv.padding_mode != "zeros":
            raise UsageError(f"{self.name}: {where}: conv_lambda is {conv}; edgecl converts timm's Conv3d(1, "
                             f"{dim}, (r, r, 1), padding (r // 2, r // 2, 0)) of zeros, with bias and an odd r")
        if not isinstance(m.qkv, nn.Conv2d):  # its outputs are read as q, k and v by their count
            raise UsageError(f"{self.name}: {where}: qkv is a {type(m.qkv).__name__}; edgecl converts timm's Conv2d")
        if m.qkv.out_channels != heads * dim + dim + dv:
            raise UsageError(f"{self.name}: {where}: qkv has {m.qkv.out_channels} outputs, not heads {heads} × dim "
                             f"{dim} + dim + dv {dv}")
        if not isinstance(m.pool, (nn.Identity, nn.AvgPool2d)):
            raise UsageError(f"{self.name}: {where}: pool is a {type(m.pool).__name__}; edgecl converts timm's "
                             "identity or AvgPool2d(2, 2)")
        packed = self._conv(node, m.qkv, x, f"{path}.qkv", where)
        bounds = [0, heads * dim, heads * dim + dim, heads * dim + dim + dv]
        q, k, v = (self._emit(node, "slice", [packed], f"{path}.{part}", start=a, stop=b)
                   for part, a, b in zip("qkv", bounds, bounds[1:]))
        q = self._norm(node, m.norm_q, q, f"{path}.norm_q", where, required=True)
        v = self._norm(node, m.norm_v, v, f"{path}.norm_v", where, required=True)
        out = self._emit(node, "lambda_layer", [q, k, v], f"{path}.conv_lambda", heads=heads, dim=dim, r=r) \
            if conv is not None else self._emit(node, "lambda_layer", [q, k, v], f"{path}.lambda", module=path,
                                                heads=heads, dim=dim, rel_pos=shape[1:])
        if isinstance(m.pool, nn.AvgPool2d):
            out = self._lambda_pool(node, m.pool, out, f"{path}.pool", where)
        self.alias[node] = out

    def _relative_lambda(self, m: nn.Module, where: str, side: list[int]) -> None:
        """The relative position variant: timm's pos_emb (2H − 1, 2W − 1, dim) for this map, read at timm's
        offsets (its rel_pos_indices, a buffer: edited, it would be another network)."""
        rows, cols = (2 * s - 1 for s in side)
        if list(m.feat_size) != side or tuple(m.pos_emb.shape) != (rows, cols, int(m.dim_qk)) or \
                not torch.equal(m.rel_pos_indices[0].cpu() * cols + m.rel_pos_indices[1].cpu(),
                                torch.from_numpy(lambda_rel_index(*side))):
            raise UsageError(f"{self.name}: {where}: built for a {tuple(m.feat_size)} map (pos_emb "
                             f"{tuple(m.pos_emb.shape)}), reads {side[0]}×{side[1]}; edgecl converts timm's "
                             "relative embedding at its feat_size with its rel_pos_indices")

    def _lambda_pool(self, node: fx.Node, pool: nn.AvgPool2d, x: str, path: str, where: str) -> str:
        """timm's AvgPool2d(2, 2): no padding, floor mode, dividing by the window (a divisor_override would
        otherwise be dropped silently: another network)."""
        if (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.divisor_override) != (2, 2, 0, False,
                                                                                                    None):
            raise UsageError(f"{self.name}: {where}: {path!r} is {pool}; edgecl converts timm's AvgPool2d(2, 2)")
        return self._emit(node, "avgpool", [x], path, k=[2, 2], stride=[2, 2], pad=[0, 0], ceil_mode=False,
                          count_include_pad=True)
