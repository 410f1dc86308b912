"""Hiera (timm's ``timm.models.hiera``: hiera_*) in a user's network, for `fx_import._Converter`. The tracer keeps
its ``Unroll`` and each ``HieraBlock`` whole: Unroll reorders the tokens through views and permutes so that
Hiera's pooling and mask units are contiguous runs of tokens, which the blocks then cut with 5-D views.

The unroll is a fixed permutation of the tokens, and every block computes each token from its own values and from
tokens it reaches by that order's runs only: a q-pool takes the max over the slowest (sy, sx) run, which is the
2 × 2 (``q_stride``) cell of the map around each position; a mask unit is the run of the fastest index, which is a
(Py, Px) block of the map (the product of the strides not yet pooled); global attention is the same for any order.
So edgecl keeps the tokens of an unrolled value as the (C, H, W) map in its spatial order, and each part becomes
an op on the map (``q_stride`` (sy, sx) the first stride still to pool):

    Unroll: a ``reshape`` of the (C, H·W, 1) tokens to the (C, H, W) map, row by row (as its first view reads them)
    HieraBlock: norm1 → [proj (1×1 conv) → maxpool {k = stride = (sy, sx)}, the q-pool of the residual] →
    attn.qkv (1×1 conv) → slices q, k, v → [q maxpool {(sy, sx)}] → attention {window (Py, Px): a mask unit; with
    a pooled q, halo_blocks [Py / sy, Py] and halo 0: each pooled block of q over its unit's keys; none: global} →
    attn.proj → [ls1] → add → norm2 → mlp (fc1, act, fc2) → [ls2] → add

Once the last stride is pooled the order is the map's row-major one again, and the block's output is a ``reshape``
back to (C, H·W, 1) tokens, which anything may read (timm's head averages them). While strides remain, only
another HieraBlock or the mean over the tokens (the same in any order: timm's head where ``q_pool`` leaves strides)
may read the value; anything else would see tokens in another order, and is refused by name. Video (3-D) Hiera,
a mask unit that is not the block of the strides left, a q-pool stride that is not the next unroll stride, a
non-square pooled mask unit, and a layer other than timm's in any place are refused by name with the user's source
line.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import describe, location, shape_of
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

_HIERA = "timm.models.hiera"
_KINDS = {"Unroll": "unroll", "HieraBlock": "block"}


def is_hiera(m: Any) -> bool:
    """Hiera's Unroll or HieraBlock, judged by its class; timm is not imported."""
    return type(m).__module__ == _HIERA and type(m).__name__ in _KINDS


class _HieraConverter:
    """Mixin of `fx_import._Converter`: Hiera's Unroll and blocks, kept whole; the unrolled values as maps."""

    name: str
    last: set[fx.Node]
    modules: dict[str, nn.Module]
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]
    packed_slices: Callable[..., tuple[str, str, str]]
    timm_layer_scale: Callable[..., str]  # timm's LayerScale or an identity

    def hiera(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        kind = _KINDS[type(m).__name__]
        where = f"Hiera {type(m).__name__} at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 2:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl converts it on "
                             "(batch, tokens, channels) tokens")
        if kind == "unroll":
            strides, grid = self._hiera_unroll(node, m, x, where, shape)
        else:
            strides, grid = self._hiera_block(node, m, x, path, where, shape)
        self.last.add(node)
        self._hiera_orders()[node] = (strides, grid)
        if strides:
            for user in node.users:  # tokens in the unrolled order: a block, or their mean (any order's)
                if not (self._is_hiera_block(user) or user.target in ("mean", torch.mean)):
                    raise UsageError(f"{self.name}: {describe(user)} reads the output of {where}, "
                                     f"whose tokens are in Hiera's unrolled order ({len(strides)} strides not yet "
                                     "pooled); edgecl converts a HieraBlock or the mean over the tokens there, or "
                                     "anything once every stride is pooled (the map's own order)")
        elif kind == "block" and self._hiera_orders()[node.args[0]][0]:  # the last stride pooled: tokens again
            self._emit(node, "reshape", [self.alias[node]], f"{path}.tokens", shape=[int(m.dim_out),
                                                                                   grid[0] * grid[1], 1])

    def _is_hiera_block(self, node: fx.Node) -> bool:
        return node.op == "call_module" and type(self.modules[str(node.target)]).__module__ == _HIERA and \
            type(self.modules[str(node.target)]).__name__ == "HieraBlock"

    def _hiera_orders(self) -> dict[fx.Node, tuple[list[tuple[int, int]], tuple[int, int]]]:
        """fx node → (the unroll strides not yet pooled, the (H, W) grid) of each value in an unrolled order."""
        return self.__dict__.setdefault("hiera_order", {})

    def _hiera_unroll(self, node: fx.Node, m: nn.Module, x: str, where: str,
                      shape: list[int]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        size, strides = [int(s) for s in m.size], [tuple(int(s) for s in step) for step in m.schedule]
        if len(size) != 2 or any(len(step) != 2 for step in strides):
            raise UsageError(f"{self.name}: {where}: it unrolls a {len(size)}-D grid {size} with strides {strides}; "
                             "edgecl converts image Hiera (2-D tokens), not video")
        if shape[0] != size[0] * size[1] or math.prod(s[0] for s in strides) > size[0] or \
                size[0] % math.prod(s[0] for s in strides) or size[1] % math.prod(s[1] for s in strides):
            raise UsageError(f"{self.name}: {where}: {shape[0]} tokens are not its {size[0]}×{size[1]} grid in "
                             f"whole cells of its strides {strides}")
        if strides:
            self._emit(node, "reshape", [x], f"{node.name}.map", shape=[shape[1], size[0], size[1]])
        else:
            self.alias[node] = x
        return strides, (size[0], size[1])

    def _hiera_block(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                     shape: list[int]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        order = self._hiera_orders().get(node.args[0])
        if order is None:
            raise UsageError(f"{self.name}: {where} reads tokens that no Hiera Unroll ordered; its mask units and "
                             "q-pooling are runs of the unrolled order, so edgecl converts it after timm's Unroll")
        strides, grid = order
        attn = m.attn
        check_kind(self.name, where, m, "attn", (_HIERA, "MaskUnitAttention"))
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        if not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: its mlp has a {type(m.mlp.norm).__name__} norm; edgecl converts "
                             "timm's Mlp without one")
        q_stride, pooled = int(attn.q_stride), strides[0] if strides else (1, 1)
        if q_stride > 1 and q_stride != pooled[0] * pooled[1]:
            raise UsageError(f"{self.name}: {where}: it pools q over {q_stride} tokens where the next unroll stride "
                             f"is {pooled if strides else 'none (every stride is pooled)'}; edgecl converts a q-pool "
                             "of one whole stride")
        step = pooled if q_stride > 1 else (1, 1)
        dim, dim_out, heads = int(m.dim), int(m.dim_out), int(attn.heads)
        if shape[1] != dim or int(attn.dim) != dim or int(attn.dim_out) != dim_out or dim_out % heads:
            raise UsageError(f"{self.name}: {where}: its widths (block {dim} → {dim_out}, attention {attn.dim} → "
                             f"{attn.dim_out} in {heads} heads) do not fit its {shape[1]}-channel input")
        normed = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        residual = self._hiera_residual(node, m, x, normed, path, where, step)
        attended = self._hiera_attention(node, attn, normed, f"{path}.attn", where, strides, grid, step)
        h = self._emit(node, "add", [residual, self.timm_layer_scale(node, m.ls1, attended, f"{path}.ls1", where)],
                       f"{path}.add1")
        out = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, h, f"{path}.norm2", where), f"{path}.mlp",
                            where)
        self._emit(node, "add", [h, self.timm_layer_scale(node, m.ls2, out, f"{path}.ls2", where)], f"{path}.add2")
        if q_stride > 1:
            return strides[1:], (grid[0] // step[0], grid[1] // step[1])
        return strides, grid

    def _hiera_residual(self, node: fx.Node, m: nn.Module, x: str, normed: str, path: str, where: str,
                        step: tuple[int, int]) -> str:
        """The block's shortcut: x, or where it widens, proj(norm1(x)) max-pooled over the q-pool's cells (without
        proj: x max-pooled and average-pooled side by side, timm's ``use_expand_proj=False``)."""
        if not m.do_expand:
            if step != (1, 1):
                raise UsageError(f"{self.name}: {where}: it pools q but keeps its width, so its shortcut (not pooled) "
                                 "and attention differ in tokens")
            return x
        pool = {"k": list(step), "stride": list(step)}
        if m.proj is None:
            parts = [self._emit(node, kind, [x], f"{path}.{kind}", **pool) if step != (1, 1) else x
                     for kind in ("maxpool", "avgpool")]
            return self._emit(node, "cat", parts, f"{path}.expand")
        projected = self._emit(node, "conv", [normed], f"{path}.proj", **pointwise(linear(self.name, where, m.proj)))
        return self._emit(node, "maxpool", [projected], f"{path}.pool", **pool) if step != (1, 1) else projected

    def _hiera_attention(self, node: fx.Node, attn: nn.Module, x: str, path: str, where: str,
                         strides: list[tuple[int, int]], grid: tuple[int, int], step: tuple[int, int]) -> str:
        """MaskUnitAttention on the map: q pooled over `step`, attending within mask units (the blocks of the
        strides not yet pooled) or over the whole map."""
        heads, width = int(attn.heads), int(attn.dim_out)
        qkv = linear(self.name, where, attn.qkv)
        if qkv.out_features != 3 * width:
            raise UsageError(f"{self.name}: {where}: its qkv makes {qkv.out_features} channels, not 3 × {width}")
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(attn, width // heads)}
        unit = (math.prod(s[0] for s in strides), math.prod(s[1] for s in strides))
        if attn.use_mask_unit_attn and unit != grid:
            tokens = grid[0] * grid[1]
            windows = tokens // (step[0] * step[1] * int(attn.window_size))
            if windows != tokens // (unit[0] * unit[1]):
                raise UsageError(f"{self.name}: {where}: its {windows} mask units ({attn.window_size} query "
                                 f"tokens each) are not the {unit[0]}×{unit[1]} blocks of the {grid[0]}×{grid[1]} "
                                 f"map that its unroll strides {strides} leave; edgecl converts those")
            if step == (1, 1):
                fields["window"] = list(unit)
            elif unit[0] != unit[1] or step[0] != step[1]:
                raise UsageError(f"{self.name}: {where}: a pooled q in {unit[0]}×{unit[1]} mask units (stride "
                                 f"{step}); edgecl converts square ones")
            else:
                fields.update(halo_blocks=[unit[0] // step[0], unit[0]], halo=0)
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv))
        q, k, v = self.packed_slices(node, packed, path, width)
        if step != (1, 1):
            q = self._emit(node, "maxpool", [q], f"{path}.q_pool", k=list(step), stride=list(step))
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **fields)
        return self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(linear(self.name, where, attn.proj)))
