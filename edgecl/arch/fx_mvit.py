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
'avg' modes pool each channel alone: the spec's pools. With a class token (``use_cls_token``: tokens (C, 1 + H·W,
1)) the block stays on its tokens: before each pooling (the shortcut's, q's, k's, v's) the token is split off
(``token`` nodes) and the map's tokens viewed as the map, after it joined back before the pooled map's tokens (each
zero-padded, added); the pooling LayerNorm norms the token's heads too, as timm does, in the same node
(`_norm_with_cls`), and the attention's ``rel_prefix`` 1 with ``rel_query`` / ``rel_key`` (q's and k's maps) gives
the token no relative logits (`edgecl.arch.rel_pos`). Other modes, tables built for another size and a layer other
than timm's in any place are refused by name with the user's source line.
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
        prefix = 1 if m.has_cls_token else 0
        if node.args[0] not in self.last or tokens is None or len(tokens) != 2 or None in hw or \
                tokens[0] != prefix + hw[0] * hw[1] or m.attn.has_cls_token != m.has_cls_token:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on tokens (B, [1 +] H·W, C) (a class token "
                             f"first where use_cls_token), with the map's size (H, W); gets tokens {tokens}, size "
                             f"{size} and has_cls_token {m.has_cls_token} (its attention's {m.attn.has_cls_token})")
        (height, width), ch = hw, tokens[1]
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_MVIT, "MultiScaleAttention"))
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        if int(m.dim) != ch:
            raise UsageError(f"{self.name}: {where}: built for {m.dim} channels, reads {ch}")
        if not prefix:  # a class token keeps the tokens: each pooling splits it off and joins it back (`_cls_split`)
            x = self._emit(node, "reshape", [x], f"{path}.map", shape=[ch, height, width])
        h = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        short = x if m.shortcut_proj_attn is None else self._emit(node, "conv", [h], f"{path}.shortcut_proj_attn",
                                                                   **pointwise(linear(self.name, where,
                                                                                      m.shortcut_proj_attn)))
        if m.shortcut_pool_attn is not None:
            short_ch = int(m.dim_out if m.shortcut_proj_attn is not None else ch)
            cls, short = self._cls_split(node, short, f"{path}.shortcut", short_ch, hw) if prefix else (None, short)
            short, pooled = self._mvit_pool(node, m.shortcut_pool_attn, short, f"{path}.shortcut_pool_attn", where,
                                            [short_ch, height, width])
            short = self._cls_join(node, cls, short, f"{path}.shortcut", short_ch, pooled) if prefix else short
        h, (rows, cols) = self._mvit_attention(node, m.attn, h, f"{path}.attn", where, [ch, height, width], prefix)
        x = self._emit(node, "add", [short, h], f"{path}.add1")
        h = self.swin_norm(node, m.norm2, x, f"{path}.norm2", where)
        short = x if m.shortcut_proj_mlp is None else self._emit(
            node, "conv", [h], f"{path}.shortcut_proj_mlp", **pointwise(linear(self.name, where, m.shortcut_proj_mlp)))
        x = self._emit(node, "add", [short, self.norm_mlp(node, m.mlp, h, f"{path}.mlp", where)], f"{path}.add2")
        if not prefix:
            self._emit(node, "reshape", [x], f"{path}.tokens", shape=[int(m.dim_out), rows * cols, 1])
        self.last.add(node)

    def _cls_split(self, node: fx.Node, x: str, name: str, ch: int, size: list[int]) -> tuple[str, str]:
        """Tokens (C, 1 + H·W, 1) as the class token (C, 1, 1) and the map (C, H, W), as timm's
        ``reshape_pre_pool`` and ``_shortcut_pool`` split them before a pooling."""
        cls = self._emit(node, "token", [x], f"{name}_cls", index=0, count=1)
        grid = self._emit(node, "token", [x], f"{name}_grid", index=1, count=size[0] * size[1])
        return cls, self._emit(node, "reshape", [grid], f"{name}_map", shape=[ch, *size])

    def _cls_join(self, node: fx.Node, cls: str, grid: str, name: str, ch: int, size: list[int]) -> str:
        """The class token put back before the (pooled) map's tokens: each zero-padded to 1 + H·W tokens, added."""
        t = size[0] * size[1]
        tokens = self._emit(node, "reshape", [grid], f"{name}_tokens", shape=[ch, t, 1])
        return self._emit(node, "add", [self._emit(node, "pad", [cls], f"{name}_cls_part", pads=[0, 0, t, 0]),
                                         self._emit(node, "pad", [tokens], f"{name}_grid_part", pads=[1, 0, 0, 0])],
                          f"{name}_joined")

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
                        shape: list[int], prefix: int = 0) -> tuple[str, list[int]]:
        """timm's MultiScaleAttention on the (C, H, W) map, or with a class token (`prefix`) on its (C, 1 + H·W, 1)
        tokens: the attended map or tokens and q's (pooled) size."""
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
            pool = getattr(m, f"pool_{p}")
            cls, part = self._cls_split(node, part, f"{path}.{p}", dim, shape[1:]) if prefix and pool is not None \
                else (None, part)
            pooled, size, cls = self.head_pool(node, pool, getattr(m, f"norm_{p}"), part, [dim, *shape[1:]], heads,
                                               f"{path}.{p}", path, p, where, cls)
            parts[p] = (self._cls_join(node, cls, pooled, f"{path}.{p}", dim, size) if cls else pooled), size
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
            if prefix:  # the class token's query and key get none (timm's cal_rel_pos_type)
                fields.update(rel_prefix=prefix, rel_query=list(q_size), rel_key=list(k_size))
        h = self._emit(node, "attention", [q, k, v], f"{path}.attend", **fields)
        if m.residual_pooling:
            h = self._emit(node, "add", [h, q], f"{path}.residual")
        return self._emit(node, "conv", [h], f"{path}.proj", **pointwise(proj)), q_size

    def head_pool(self, node: fx.Node, pool: nn.Module | None, norm: nn.Module | None, x: str, shape: list[int],
                  heads: int, name: str, path: str, part: str, where: str,
                  cls: str | None = None) -> tuple[str, list[int], str | None]:
        """One of q, k, v (C = heads·d, H, W) pooled by timm's depthwise conv of d channels shared by the heads, then
        its LayerNorm of d channels (module docstring): the map, its size and the class token `cls` (C, 1, 1) through
        the same LayerNorm (`_norm_with_cls`). Unpooled, the map itself."""
        if pool is None:
            if norm is not None:
                raise UsageError(f"{self.name}: {where}: norm_{part} without pool_{part} is not timm's")
            return x, shape[1:], cls
        c, height, width = shape
        d = c // heads
        if type(pool) in (nn.MaxPool2d, nn.AvgPool2d) and norm is None:  # modes 'max', 'avg': each channel alone
            return (*self._mvit_pool(node, pool, x, f"{path}.pool_{part}", where, shape), cls)
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
            h, cls = self._norm_with_cls(node, norm, h, cls, f"{path}.norm_{part}", where, [1, d, rows, cols])
            return h, [rows, cols], cls
        block = -(-(height + 2 * ph) // sh) * sh  # each head's rows with its padding, a multiple of the stride
        h = self._emit(node, "shuffle", [x], f"{name}_by_channel", groups=heads)  # channel j of head i → j·heads + i
        h = self._emit(node, "pad", [h], f"{name}_blocks", pads=[ph, 0, block - height - ph, 0])
        h = self._emit(node, "reshape", [h], f"{name}_stacked", shape=[d, heads * block, width])
        tail = max(kh - sh, 0)  # so that the conv gives block / stride rows per head
        h = self._emit(node, "pad", [h], f"{name}_tail", pads=[0, 0, tail, 0]) if tail else h
        h = self._emit(node, "conv", [h], f"{path}.pool_{part}", **conv, pad=[0, pw])
        h, cls = self._norm_with_cls(node, norm, h, cls, f"{path}.norm_{part}", where,
                                     [heads, d, heads * block // sh, cols])
        h = self._emit(node, "reshape", [h], f"{name}_unstacked", shape=[d * heads, block // sh, cols])
        if block // sh > rows:
            h = self._emit(node, "pad", [h], f"{name}_crop", pads=[0, 0, rows - block // sh, 0])
        return self._emit(node, "shuffle", [h], f"{name}_by_head", groups=d), [rows, cols], cls

    def _norm_with_cls(self, node: fx.Node, norm: nn.Module, h: str, cls: str | None, name: str, where: str,
                       dims: list[int]) -> tuple[str, str | None]:
        """The pooling's LayerNorm of d channels (one node, timm's tensors) on the (d, n, cols) stacked map `h` and,
        where there is one, on the class token's (heads·d, 1, 1) head-major channels too, as timm norms the token
        with the map: the token's heads as d channels × heads rows (``shuffle`` to channel-major, ``reshape``), padded
        to the map's width and put above its rows, normed with it, then cut out and regrouped head-major. `dims`:
        heads, d, n, cols."""
        if cls is None:
            return self.swin_norm(node, norm, h, name, where), None
        heads, d, n, cols = dims
        c = self._emit(node, "shuffle", [cls], f"{name}_cls_by_channel", groups=heads) if heads > 1 else cls
        c = self._emit(node, "reshape", [c], f"{name}_cls_rows", shape=[d, heads, 1])
        c = self._emit(node, "pad", [c], f"{name}_cls_part", pads=[0, 0, n, cols - 1])
        joined = self._emit(node, "add", [c, self._emit(node, "pad", [h], f"{name}_grid_part", pads=[heads, 0, 0, 0])],
                            f"{name}_with_cls")
        normed = self.swin_norm(node, norm, joined, name, where)
        c = self._emit(node, "pad", [normed], f"{name}_cls_out", pads=[0, 0, -n, 1 - cols])
        c = self._emit(node, "reshape", [c], f"{name}_cls_channels", shape=[heads * d, 1, 1])
        c = self._emit(node, "shuffle", [c], f"{name}_cls_by_head", groups=d) if heads > 1 else c
        return self._emit(node, "pad", [normed], f"{name}_grid_out", pads=[-heads, 0, 0, 0]), c
