"""LeViT's layers (timm's ``timm.models.levit``) in a user's network, for `fx_import._Converter`. The tracer keeps
``LinearNorm``, ``Attention`` and ``AttentionDownsample`` whole; each becomes what its forward computes on the tokens
(a ``(C, T, 1)`` map, `fx_tokens`), in spec ops:

    LinearNorm: linear (1×1 conv: the Linear over the channels) → bn (its BatchNorm1d over the batch's flattened
    tokens is a BatchNorm over the token map: the same statistics per channel)
    Attention: qkv LinearNorm → per head h: slices q_h, k_h, v_h (timm packs each head's q, k and v side by side) →
    cat of the q's, of the k's, of the v's → attention {heads, scale, bias_offsets, bias_index} → proj.act → proj.ln
    AttentionDownsample: kv LinearNorm → per head slices k_h, v_h → cats; q: the tokens as their (C, H, W) grid
    (reshape), every stride-th row and column (avgpool k 1, or timm's use_pool average pool), back to tokens → q.ln;
    attention of the fewer queries over all keys → proj.act → proj.ln

The attention bias is the module's ``attention_biases`` table ``(heads, offsets)`` with its fixed
``attention_bias_idxs`` as the node's ``bias_index`` (`edgecl.arch.ops`): the table trains as in LeViT, every
position pair at one offset sharing a number. The convolutional variant (``use_conv=True``, timm's ``levit_conv_*``)
is refused by name.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, pair, shape_of
from edgecl.errors import UsageError

_LEVIT = "timm.models.levit"
_KINDS = ("LinearNorm", "Attention", "AttentionDownsample")


def is_levit(m: Any) -> bool:
    """timm's LeViT LinearNorm, Attention or AttentionDownsample, judged by its class; timm is not imported."""
    return type(m).__module__ == _LEVIT and type(m).__name__ in _KINDS


def levit_bias_fields(m: nn.Module, path: str, heads: int) -> dict[str, Any]:
    """The ``attention`` fields of a module with LeViT's bias (LeViT's, TinyViT's, EfficientFormerV2's attention):
    heads, its scale, the ``attention_biases`` table (heads, offsets) read at the fixed ``attention_bias_idxs``."""
    return {"module": path, "heads": heads, "scale": float(m.scale), "bias_offsets": int(m.attention_biases.shape[1]),
            "bias_index": m.attention_bias_idxs.tolist()}


class _LevitConverter:
    """Mixin of `fx_import._Converter`: LeViT's layers, kept whole by the tracer."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _batchnorm: Callable[..., None]
    _act: Callable[..., str]

    def levit(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        kind = type(m).__name__
        where = f"LeViT {kind} at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 2 or getattr(m, "use_conv", False):
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports LeViT on "
                             "(batch, tokens, channels) tokens (use_conv=False; timm's levit_conv_* is not "
                             "supported)")
        if kind == "LinearNorm":
            self._linear_norm(node, m, x, path, where)
        else:
            self._levit_attention(node, m, x, path, where, shape[0])
        self.last.add(node)

    def _linear_norm(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's LinearNorm: a Linear over the channels, then BatchNorm1d of each channel over all tokens."""
        if type(m.linear) is not nn.Linear or type(m.bn) is not nn.BatchNorm1d:
            raise UsageError(f"{self.name}: {where}: {path!r} holds a {type(m.linear).__name__} and a "
                             f"{type(m.bn).__name__}; edgecl converts timm's nn.Linear and nn.BatchNorm1d")
        conv = self._emit(node, "conv", [x], f"{path}.linear", **pointwise(m.linear))
        self._batchnorm(node, m.bn, conv, f"{path}.bn")
        return self.alias[node]

    def _levit_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, tokens: int) -> None:
        heads, key_dim, val_dim = int(m.num_heads), int(m.key_dim), int(m.val_dim)
        down = type(m).__name__ == "AttentionDownsample"
        parts = [key_dim, val_dim] if down else [key_dim, key_dim, val_dim]
        packed_path = f"{path}.kv" if down else f"{path}.qkv"
        packed_module = m.kv if down else m.qkv
        packed = self._linear_norm(node, packed_module, x, packed_path, where)
        if packed_module.linear.out_features != heads * sum(parts):
            raise UsageError(f"{self.name}: {where}: {packed_path} has the wrong width for {heads} heads of "
                             f"{parts} channels")
        blocks = self._head_blocks(node, packed, packed_path, heads, parts)
        if down:
            q = self._linear_norm(node, m.q.ln, self._subsample(node, m, x, path, where, tokens), f"{path}.q.ln",
                                  where)
            k, v = blocks
        else:
            q, k, v = blocks
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", **levit_bias_fields(m, path, heads))
        if [name for name, _ in m.proj.named_children()] != ["act", "ln"]:
            raise UsageError(f"{self.name}: {where}: proj has layers {[n for n, _ in m.proj.named_children()]}; "
                             "edgecl converts timm's ['act', 'ln']")
        act = self._act(node, m.proj.act, attended, f"{path}.proj.act", where)
        self._linear_norm(node, m.proj.ln, act, f"{path}.proj.ln", where)

    def _head_blocks(self, node: fx.Node, packed: str, path: str, heads: int, parts: list[int]) -> list[str]:
        """timm packs each head's parts side by side (q_0 k_0 v_0 q_1 …): one block per part with the heads in
        order, as the ``attention`` op reads them, by slices and a cat of each part's slices."""
        width, out = sum(parts), []
        for i, n in enumerate(parts):
            start = sum(parts[:i])
            cut = [self._emit(node, "slice", [packed], f"{path}.part{i}.head{h}", start=h * width + start,
                              stop=h * width + start + n) for h in range(heads)]
            out.append(cut[0] if heads == 1 else self._emit(node, "cat", cut, f"{path}.part{i}"))
        return out

    def _subsample(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, tokens: int) -> str:
        """timm's Downsample of the queries: the tokens as their grid, every stride-th position (or its average
        pool), back to tokens."""
        sub = m.q.down
        rows, cols = (int(r) for r in sub.resolution)
        channels = m.q.ln.linear.in_features
        if [name for name, _ in m.q.named_children()] != ["down", "ln"] or rows * cols != tokens:
            raise UsageError(f"{self.name}: {where}: q must be timm's Downsample then LinearNorm over a {rows}×{cols} "
                             f"grid, and the input has {tokens} tokens")
        grid = self._emit(node, "reshape", [x], f"{path}.q.grid", shape=[channels, rows, cols])
        pool = sub.pool
        fields: dict[str, Any] = {"k": [1, 1], "stride": [sub.stride] * 2}
        if pool is not None:
            fields = {"k": pair(pool.kernel_size), "stride": pair(pool.stride), "pad": pair(pool.padding),
                      "count_include_pad": bool(pool.count_include_pad), "ceil_mode": bool(pool.ceil_mode)}
        picked = self._emit(node, "avgpool", [grid], f"{path}.q.down", **fields)
        out_rows, out_cols = (rows - 1) // sub.stride + 1, (cols - 1) // sub.stride + 1
        return self._emit(node, "reshape", [picked], f"{path}.q.tokens", shape=[channels, out_rows * out_cols, 1])
