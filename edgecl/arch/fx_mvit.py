"""MViTv2's blocks (timm's ``timm.models.mvitv2``: mvitv2_*) in a user's network, for `fx_import._Converter`. The
tracer keeps each ``MultiScaleBlock`` whole: it views its tokens (B, H·W, C) as per-head maps with the map's size
passed as a Python argument, and writes its relative positions into the scores by item assignment, which the spec
has no nodes for. The patch embedding, the stages' loop, the final norm and the head are traced. On the tokens
(C, H·W, 1) a block becomes, its map viewed as (C, H, W):

    norm1 → [shortcut_proj_attn (1×1 conv)] → [shortcut_pool_attn (max pool)] = shortcut
    attn: qkv (1×1 conv) → slices q, k, v → each [pooled: `head_pool`] → attention {heads, scale, rel_pos (the
    larger of q's and k's maps), rel_dim, rel_mvit (`edgecl.arch.rel_pos`)} → [+ q (residual pooling)] → proj
    → add shortcut → norm2 → [shortcut_proj_mlp (1×1 conv)] → mlp (fc1, act, fc2) → add → tokens (C, H'·W', 1)

A pooling conv is timm's depthwise conv of one head's d channels, its d kernels shared by every head, then a
LayerNorm over those d channels (weight and bias shared too). The spec's conv has its own kernel per channel, so
`head_pool` stacks the heads along the rows instead: the head-major channels regrouped channel-major (``shuffle``),
each head's map padded to a block of rows the stride tiles, the blocks stacked as one (d, heads·L, W) map, the conv
and the LayerNorm of d channels run on it — timm's own tensors, shared as in timm — and each block's valid rows cut
back and the channels regrouped head-major. The zero rows between the blocks are each head's own padding, so no
output reads another head (`edgecl.arch.channels` ties channel j of every head into one pinned unit). The 'max' and
'avg' modes pool each channel alone: the spec's pools. A class token (``use_cls_token``: its query and key meet
the map's without relative positions), other modes, tables built for another size and a layer other than timm's in
any place are refused by name with the user's source line.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.arch.fx_xcit import traced_int
from edgecl.errors import UsageError

_MVIT = "timm.models.mvitv2"


def is_mvit_block(m: Any) -> bool:
    """MViTv2's block (``MultiScaleBlock``), judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_MVIT, "MultiScaleBlock")


class _MvitConverter:
    """Mixin of `fx_import._Converter`: MViTv2's blocks, kept whole."""

    name: str
    modules: dict[str, nn.Module]
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _module: Callable[..., None]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]

    def mvit_step(self, node: fx.Node) -> bool:
        """Convert `node` when it is an MViTv2 block's call or the tokens of its (tokens, size) result (the size is
        a traced value, read by the next block); False otherwise."""
        blocks = self.__dict__.setdefault("_mvit_blocks", set())
        if node.op == "call_module" and is_mvit_block(self.modules.get(str(node.target))):
            self._module(node, self.modules[str(node.target)])  # one call, unshared tensors, then `mvit_block`
            blocks.add(node)
            return True
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in blocks and \
                node.args[1] == 0:
            self.alias[node] = self.alias[node.args[0]]
            self.last.add(node)
            return True
        return False

    def mvit_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"MViTv2 MultiScaleBlock at {path!r} {location(node)}"
        tokens, size = shape_of(node.args[0]), node.args[1] if len(node.args) > 1 else node.kwargs.get("feat_size")
        if isinstance(size, fx.Node):  # x.shape[-2:], or the size a block before returned
            size = size.meta.get("value")
        hw = [traced_int(s) for s in size] if isinstance(size, (tuple, list)) and len(size) == 2 else [None, None]
        if node.args[0] not in self.last or tokens is None or len(tokens) != 2 or None in hw or \
                tokens[0] != hw[0] * hw[1] or m.has_cls_token:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (B, H·W, C) without a class token "
                             f"(use_cls_token=False), with the map's size (H, W); gets tokens {tokens}, size {size} "
                             f"and has_cls_token {m.has_cls_token}")
        (height, width), ch = hw, tokens[1]
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_MVIT, "MultiScaleAttention"))
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        if int(m.dim) != ch:
            raise UsageError(f"{self.name}: {where}: built for {m.dim} channels, reads {ch}")
        x = self._emit(node, "reshape", [x], f"{path}.map", shape=[ch, height, width])
        h = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        short = x if m.shortcut_proj_attn is None else self._emit(node, "conv", [h], f"{path}.shortcut_proj_attn",
                                                                   **pointwise(linear(self.name, where,
                                                                                      m.shortcut_proj_attn)))
        if m.shortcut_pool_attn is not None:
            short = self._mvit_pool(node, m.shortcut_pool_attn, short, f"{path}.shortcut_pool_attn", where,
                                    [int(m.dim_out if m.shortcut_proj_attn is not None else ch), height, width])[0]
        h, (rows, cols) = self._mvit_attention(node, m.attn, h, f"{path}.attn", where, [ch, height, width])
        x = self._emit(node, "add", [short, h], f"{path}.add1")
        h = self.swin_norm(node, m.norm2, x, f"{path}.norm2", where)
        short = x if m.shortcut_proj_mlp is None else self._emit(
            node, "conv", [h], f"{path}.shortcut_proj_mlp", **pointwise(linear(self.name, where, m.shortcut_proj_mlp)))
        x = self._emit(node, "add", [short, self.norm_mlp(node, m.mlp, h, f"{path}.mlp", where)], f"{path}.add2")
        self._emit(node, "reshape", [x], f"{path}.tokens", shape=[int(m.dim_out), rows * cols, 1])
        self.last.add(node)

    def _mvit_pool(self, node: fx.Node, pool: nn.Module, x: str, name: str, where: str,
                   shape: list[int]) -> tuple[str, list[int]]:
        """timm's max pool (a shortcut's, or q's, k's, v's in mode 'max') or average pool (mode 'avg') on the map:
        the pooled map and its size."""
        avg = type(pool) is nn.AvgPool2d
        if type(pool) not in (nn.MaxPool2d, nn.AvgPool2d) or pool.ceil_mode or \
                not avg and pool.dilation not in (1, (1, 1)) or avg and pool.divisor_override is not None:
            raise UsageError(f"{self.name}: {where}: {name!r} is a {type(pool).__name__}; edgecl converts timm's "
                             "nn.MaxPool2d or nn.AvgPool2d there")
        (kh, kw), (sh, sw), (ph, pw) = (list(v) if isinstance(v, (tuple, list)) else [v, v]
                                        for v in (pool.kernel_size, pool.stride, pool.padding))
        fields = {"count_include_pad": bool(pool.count_include_pad)} if avg else {}
        out = self._emit(node, "avgpool" if avg else "maxpool", [x], name, k=[kh, kw], stride=[sh, sw],
                         pad=[ph, pw], **fields)
        return out, [(shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1]

    def _mvit_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                        shape: list[int]) -> tuple[str, list[int]]:
        """timm's MultiScaleAttention on the (C, H, W) map: the attended map and q's (pooled) size."""
        if m.mode not in ("conv", "max", "avg"):
            raise UsageError(f"{self.name}: {where}: its attention pools in mode {m.mode!r}; edgecl converts 'conv' "
                             "(timm's default: a depthwise conv and LayerNorm per head, shared by the heads), 'max' "
                             "and 'avg'")
        qkv, proj = linear(self.name, where, m.qkv), linear(self.name, where, m.proj)
        heads, dim = int(m.num_heads), int(m.dim_out)
        d = dim // heads
        if dim % heads or qkv.in_features != shape[0] or qkv.out_features != 3 * dim or \
                (proj.in_features, proj.out_features) != (dim, dim) or int(m.head_dim) != d:
            raise UsageError(f"{self.name}: {where}: qkv of {qkv.in_features}→{qkv.out_features}, proj of "
                             f"{proj.in_features}→{proj.out_features} and {heads} heads are not MViTv2's attention "
                             f"from {shape[0]} to {dim} channels")
        packed = self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv))
        parts = {}
        for i, p in enumerate("qkv"):
            part = self._emit(node, "slice", [packed], f"{path}.{p}", start=i * dim, stop=(i + 1) * dim)
            parts[p] = self.head_pool(node, getattr(m, f"pool_{p}"), getattr(m, f"norm_{p}"), part,
                                      [dim, *shape[1:]], heads, f"{path}.{p}", path, p, where)
        (q, q_size), (k, k_size), (v, _) = parts["q"], parts["k"], parts["v"]
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(m, d)}
        if m.rel_pos_type == "spatial":
            extent = [max(a, b) for a, b in zip(q_size, k_size)]
            rows = [tuple(m.rel_pos_h.shape), tuple(m.rel_pos_w.shape)]
            if rows != [(2 * extent[0] - 1, d), (2 * extent[1] - 1, d)]:
                raise UsageError(f"{self.name}: {where}: its rel_pos_h and rel_pos_w are {rows[0]} and {rows[1]}, but "
                                 f"its q on {q_size} and k on {k_size} read tables of {(2 * extent[0] - 1, d)} and "
                                 f"{(2 * extent[1] - 1, d)}; build the model for this input size (img_size) so "
                                 "that its tables fit")
            fields.update(module=path, rel_pos=extent, rel_dim=d, rel_mvit=True)
        h = self._emit(node, "attention", [q, k, v], f"{path}.attend", **fields)
        if m.residual_pooling:
            h = self._emit(node, "add", [h, q], f"{path}.residual")
        return self._emit(node, "conv", [h], f"{path}.proj", **pointwise(proj)), q_size

    def head_pool(self, node: fx.Node, pool: nn.Module | None, norm: nn.Module | None, x: str, shape: list[int],
                  heads: int, name: str, path: str, part: str, where: str) -> tuple[str, list[int]]:
        """One of q, k, v (C = heads·d, H, W) pooled by timm's depthwise conv of d channels shared by the heads, then
        its LayerNorm of d channels (module docstring): the map and its size. Unpooled, the map itself."""
        if pool is None:
            if norm is not None:
                raise UsageError(f"{self.name}: {where}: norm_{part} without pool_{part} is not timm's")
            return x, shape[1:]
        c, height, width = shape
        d = c // heads
        if type(pool) in (nn.MaxPool2d, nn.AvgPool2d) and norm is None:  # modes 'max', 'avg': each channel alone
            return self._mvit_pool(node, pool, x, f"{path}.pool_{part}", where, shape)
        if type(pool) is not nn.Conv2d or pool.in_channels != d or pool.out_channels != d or pool.groups != d or \
                pool.bias is not None or pool.dilation != (1, 1) or isinstance(pool.padding, str) or \
                tuple(getattr(norm, "normalized_shape", ())) != (d,):
            raise UsageError(f"{self.name}: {where}: its pool_{part} {type(pool).__name__} and norm_{part} "
                             f"{type(norm).__name__} are not MViTv2's depthwise conv of {d} channels without bias "
                             f"and LayerNorm of {d}")
        (kh, kw), (sh, sw), (ph, pw) = pool.kernel_size, pool.stride, pool.padding
        rows, cols = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        conv = {"in": d, "out": d, "k": [kh, kw], "stride": [sh, sw], "groups": d, "bias": False}
        if heads == 1:
            h = self._emit(node, "conv", [x], f"{path}.pool_{part}", **conv, pad=[ph, pw])
            return self.swin_norm(node, norm, h, f"{path}.norm_{part}", where), [rows, cols]
        block = -(-(height + 2 * ph) // sh) * sh  # each head's rows with its padding, a multiple of the stride
        h = self._emit(node, "shuffle", [x], f"{name}_by_channel", groups=heads)  # channel j of head i → j·heads + i
        h = self._emit(node, "pad", [h], f"{name}_blocks", pads=[ph, 0, block - height - ph, 0])
        h = self._emit(node, "reshape", [h], f"{name}_stacked", shape=[d, heads * block, width])
        tail = max(kh - sh, 0)  # so that the conv gives block / stride rows per head
        h = self._emit(node, "pad", [h], f"{name}_tail", pads=[0, 0, tail, 0]) if tail else h
        h = self._emit(node, "conv", [h], f"{path}.pool_{part}", **conv, pad=[0, pw])
        h = self.swin_norm(node, norm, h, f"{path}.norm_{part}", where)
        h = self._emit(node, "reshape", [h], f"{name}_unstacked", shape=[d * heads, block // sh, cols])
        if block // sh > rows:
            h = self._emit(node, "pad", [h], f"{name}_crop", pads=[0, 0, rows - block // sh, 0])
        return self._emit(node, "shuffle", [h], f"{name}_by_head", groups=d), [rows, cols]
