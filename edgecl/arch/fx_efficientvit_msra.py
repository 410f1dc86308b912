"""EfficientViT-MSRA's window attention (timm's ``timm.models.efficientvit_msra.LocalWindowAttention`` holding a
``CascadedGroupAttention``) in a user's network, for `fx_import._Converter`. The tracer keeps it whole: its forward
chooses by the map's size whether to window it, through channels-last views. On the (C, H, W) map it is, in spec
ops:

    pad (zeros right and bottom up to a multiple of the window, when the window does not tile the map) → per head h:
    slice h of the channels (timm's chunk), plus the previous head's output from the second head on (the cascade) →
    qkvs.h (1×1 conv + BatchNorm) → slices q, k, v → dws.h on q (depthwise conv + BatchNorm) → attention {heads 1,
    scale, LeViT's bias: row h of the module's table, ``bias_rows`` [h, heads]} → cat of the heads → proj (ReLU, 1×1
    conv + BatchNorm) → crop (a negative pad) back to the map

The padded positions are zeros before the qkv convs, so they join the attention as timm's do (their keys are the
BatchNorms' shifts); the crop drops their outputs. Each head is its own attention node because its input depends on
the previous head's output; its bias is its row of the one ``attention_biases`` table (`module_state` reads rows).
A (padded) map of several windows: timm runs the whole cascade in each window on its own; the 1×1 convs, BatchNorms,
slices, cat and ReLU act per position, so only the depthwise conv on q (zeros at every window's border, which no conv
on the whole map computes) and the attention need the window: the conv's ``window`` and the attention's (Swin's side
by side windows, no shift; LeViT's bias per window). Other layers in the block's place are refused by name with the
user's source line.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.arch.fx_levit import levit_bias_fields
from edgecl.arch.fx_swin import check_kind
from edgecl.errors import UsageError

_MSRA = "timm.models.efficientvit_msra"
LOCAL_WINDOW_ATTENTION = (_MSRA, "LocalWindowAttention")


def is_local_window_attention(m: Any) -> bool:
    """timm's EfficientViT-MSRA LocalWindowAttention, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == LOCAL_WINDOW_ATTENTION


class _EfficientVitMsraConverter:
    """Mixin of `fx_import._Converter`: EfficientViT-MSRA's LocalWindowAttention, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _conv_norm: Callable[..., str]  # `fx_efficientformer`'s: timm's ConvNorm (conv, bn)
    _act: Callable[..., str]

    def local_window_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"EfficientViT-MSRA LocalWindowAttention at {path!r} {location(node)}"
        channels, height, width = map_shape(node, self.name, where)
        check_kind(self.name, where, m, "attn", (_MSRA, "CascadedGroupAttention"))
        ws = int(m.attn.resolution)
        # timm pads right and bottom up to a multiple of the window (zeros that join the attention), then crops
        pad = [0, 0, -height % ws, -width % ws]  # (top, left, bottom, right)
        several = height + pad[2] > ws or width + pad[3] > ws
        h = self._emit(node, "pad", [x], f"{path}.pad", pads=pad) if any(pad) else x
        h = self._cascade(node, m.attn, h, f"{path}.attn", where, channels, [ws, ws] if several else None)
        if any(pad):
            self._emit(node, "pad", [h], f"{path}.crop", pads=[-p for p in pad])

    def _cascade(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, channels: int,
                 window: list[int] | None) -> str:
        """CascadedGroupAttention on one window, or on each ``window`` of the map (the depthwise conv on q and the
        attention windowed): each head reads its channels plus the previous head's output."""
        heads, key_dim, val_dim = len(m.qkvs), int(m.key_dim), int(m.val_dim)
        part = channels // heads
        if heads != int(m.num_heads) or len(m.dws) != heads or part * heads != channels or \
                heads > 1 and val_dim != part:  # one head has no cascade: its value width is free
            raise UsageError(f"{self.name}: {where}: {heads} heads of {val_dim} value channels must split its "
                             f"{channels} channels evenly (timm's chunk and cascade)")
        bias = levit_bias_fields(m, path, heads)
        outs: list[str] = []
        for i in range(heads):
            feat = x if heads == 1 else self._emit(node, "slice", [x], f"{path}.chunk{i}", start=i * part,
                                                   stop=(i + 1) * part)
            if outs:
                feat = self._emit(node, "add", [outs[-1], feat], f"{path}.cascade{i}")
            packed = self._conv_norm(node, m.qkvs[i], feat, f"{path}.qkvs.{i}", where)
            q, k, v = (self._emit(node, "slice", [packed], f"{path}.qkvs.{i}.{n}", start=a, stop=b) for n, a, b in
                       (("q", 0, key_dim), ("k", key_dim, 2 * key_dim), ("v", 2 * key_dim, 2 * key_dim + val_dim)))
            q = self._conv_norm(node, m.dws[i], q, f"{path}.dws.{i}", where)
            if window:
                self._conv_in_windows(q, window)
            fields = {**bias, "heads": 1, "bias_rows": [i, heads], **({"window": window} if window else {})}
            outs.append(self._emit(node, "attention", [q, k, v], f"{path}.attend{i}", **fields))
        h = outs[0] if heads == 1 else self._emit(node, "cat", outs, f"{path}.heads")
        if len(m.proj) != 2 or type(m.proj[0]) is not nn.ReLU:
            raise UsageError(f"{self.name}: {where}: its proj must be timm's ReLU then ConvNorm")
        h = self._act(node, m.proj[0], h, f"{path}.proj.0", where)
        return self._conv_norm(node, m.proj[1], h, f"{path}.proj.1", where)

    def _conv_in_windows(self, normed: str, window: list[int]) -> None:
        """The conv of the ConvNorm just emitted (its BatchNorm ``normed`` reads it) runs in each window."""
        nodes = {n["name"]: n for n in self.nodes}
        nodes[nodes[normed]["inputs"][0]]["window"] = window
