"""SAM 2's HieraDet blocks (timm's ``timm.models.hieradet_sam2``: ``MultiScaleBlock``) in a user's network, for
`fx_import._Converter`. The tracer keeps each block whole: it pads the channels-last map to whole windows and cuts
it into them through 6-D views, pools q inside each window, and puts the windows back and crops them. On the (C, H,
W) map x (channels-last in torch), with windows of side w (0: global) and a q-pool of stride s (or none):

    norm1 → [proj (1×1 conv) → maxpool {s}: the shortcut, where the block widens] → [pad with zeros to whole w × w
    windows (they join the attention as keys: qkv's bias)] → attn.qkv (1×1 conv) → slices q, k, v → [q maxpool {s}]
    → attention {window [w, w]; with a pooled q, halo_blocks [w / s, w] and halo 0: each pooled window of q over
    its window's keys; global: neither} → attn.proj → [crop the padding: a negative pad] → [ls1] → add → norm2 →
    mlp (fc1, act, fc2) → [ls2] → add

A map of odd side pools as timm's windows do: the windows' pooled rows past the shortcut's (its max pool drops the
odd row) are cropped. A window that a square stride does not divide, a q-pool other than timm's MaxPool2d of
kernel = stride, and a layer other than timm's in any place are refused by name with the user's source line.
HieraDet's own position embedding (its ``pos_embed`` parameter resized with ``F.interpolate`` in forward) is
`fx_param_embed`'s.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, pair, shape_of
from edgecl.arch.fx_swin import check_drops, check_kind, linear
from edgecl.errors import UsageError

_HIERADET = "timm.models.hieradet_sam2"


def is_hieradet_block(m: Any) -> bool:
    """HieraDet's MultiScaleBlock, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_HIERADET, "MultiScaleBlock")


class _HieraDetConverter:
    """Mixin of `fx_import._Converter`: HieraDet's MultiScaleBlock, kept whole."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]
    packed_slices: Callable[..., tuple[str, str, str]]
    timm_layer_scale: Callable[..., str]  # timm's LayerScale or an identity

    def hieradet_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"HieraDet MultiScaleBlock at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl converts it on a "
                             "channels-last (batch, height, width, channels) map")
        check_kind(self.name, where, m, "attn", (_HIERADET, "MultiScaleAttention"))
        check_kind(self.name, where, m, "mlp", ("timm.layers.mlp", "Mlp"))
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        if not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: its mlp has a {type(m.mlp.norm).__name__} norm; edgecl converts "
                             "timm's Mlp without one")
        height, width, ch = shape
        step = self._hieradet_stride(m, where)
        if int(m.dim) != ch or int(m.attn.dim) != ch or int(m.attn.dim_out) != int(m.dim_out):
            raise UsageError(f"{self.name}: {where}: its widths (block {m.dim} → {m.dim_out}, attention "
                             f"{m.attn.dim} → {m.attn.dim_out}) do not fit its {ch}-channel input")
        normed = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        shortcut = x
        if m.dim != m.dim_out:
            shortcut = self._emit(node, "conv", [normed], f"{path}.proj", **pointwise(linear(self.name, where, m.proj)))
            if step:
                shortcut = self._emit(node, "maxpool", [shortcut], f"{path}.pool", k=step, stride=step)
        elif step:
            raise UsageError(f"{self.name}: {where}: it pools q but keeps its width, so its shortcut (not pooled) "
                             "and attention differ in positions")
        attended = self._hieradet_attention(node, m, normed, path, where, (height, width), step)
        h = self._emit(node, "add", [shortcut, self.timm_layer_scale(node, m.ls1, attended, f"{path}.ls1", where)],
                       f"{path}.add1")
        out = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, h, f"{path}.norm2", where), f"{path}.mlp",
                            where)
        self._emit(node, "add", [h, self.timm_layer_scale(node, m.ls2, out, f"{path}.ls2", where)], f"{path}.add2")
        self.last.add(node)

    def _hieradet_stride(self, m: nn.Module, where: str) -> list[int] | None:
        """The q-pool's stride, the block's and its attention's pools alike (timm's MaxPool2d, kernel = stride)."""
        if m.q_stride is None and m.pool is None and m.attn.q_pool is None:
            return None
        step = pair(m.q_stride) if m.q_stride is not None else None
        for pool in (m.pool, m.attn.q_pool):
            if type(pool) is not nn.MaxPool2d or step is None or pair(pool.kernel_size) != step or \
                    pair(pool.stride) != step or pair(pool.padding) != [0, 0] or pair(pool.dilation) != [1, 1] or \
                    pool.ceil_mode:
                raise UsageError(f"{self.name}: {where}: its q-pool is {pool!r} with q_stride {m.q_stride}; edgecl "
                                 "converts timm's MaxPool2d of kernel = stride = q_stride in the block and its "
                                 "attention")
        return [int(s) for s in step]

    def _hieradet_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, hw: tuple[int, int],
                            step: list[int] | None) -> str:
        """MultiScaleAttention in its windows (the map padded to whole ones, the padding cropped after) or global."""
        attn, window = m.attn, [int(w) for w in m.window_size]
        heads, out = int(attn.num_heads), int(attn.dim_out)
        qkv = linear(self.name, where, attn.qkv)
        if qkv.out_features != 3 * out or out % heads:
            raise UsageError(f"{self.name}: {where}: its qkv makes {qkv.out_features} channels, not 3 × {out} in "
                             f"{heads} heads")
        fields: dict[str, Any] = {"heads": heads, "scale": applied_scale(attn, out // heads)}
        pads = [0, 0]
        if m.is_windowed:
            if window[0] != window[1] or step and (step[0] != step[1] or window[0] % step[0]):
                # halo_blocks pools each square window to a square block: a (1, 2) stride is no such block
                raise UsageError(f"{self.name}: {where}: its {window[0]}×{window[1]} windows with q_stride {step}; "
                                 "edgecl converts square windows that a square stride divides")
            pads = [-hw[0] % window[0], -hw[1] % window[1]]
            if any(pads):  # timm pads norm1's map with zeros: they join the attention as keys
                x = self._emit(node, "pad", [x], f"{path}.pad", pads=[0, 0, *pads], value=0.0)
            fields.update({"halo_blocks": [window[0] // step[0], window[0]], "halo": 0} if step else
                          {"window": window})
        packed = self._emit(node, "conv", [x], f"{path}.attn.qkv", **pointwise(qkv))
        q, k, v = self.packed_slices(node, packed, f"{path}.attn", out)
        if step:
            q = self._emit(node, "maxpool", [q], f"{path}.attn.q_pool", k=step, stride=step)
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attn.attend", **fields)
        projected = self._emit(node, "conv", [attended], f"{path}.attn.proj",
                               **pointwise(linear(self.name, where, attn.proj)))
        # the pooled windows hold (side + pad) / s rows and columns; timm keeps those of the pooled shortcut
        crop = [(side + p) // s - side // s for side, p, s in zip(hw, pads, step or [1, 1])]
        return self._emit(node, "pad", [projected], f"{path}.crop", pads=[0, 0, -crop[0], -crop[1]]) \
            if any(crop) else projected
