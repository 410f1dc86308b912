"""Swin Transformer V2 layers (timm's ``timm.models.swin_transformer_v2`` and ``swin_transformer_v2_cr``,
torchvision's ``ShiftedWindowAttentionV2`` and ``PatchMergingV2``) in a user's network, for `fx_import._Converter`,
dispatched by Swin V1's `fx_swin._SwinConverter.swin` (by class: ``_swin_v2_*``). Kept whole by the tracer as Swin
V1's are (channels-last maps, windows through 6-D views, ``torch.roll``, a mask buffer) and converted to the same
spec ops, on the (C, H, W) map:

    SwinTransformerV2Block: q, k, v (1×1 convs of their rows of qkv, q's and v's biases the module's q_bias and v_bias,
    k's none; one qkv conv without them) → attention {window, shift, ``cosine``, bias table "mlp" of form "swin_v2"}
    → proj → norm1 → add the input → mlp (fc1, act, fc2) → norm2 → add (post-norm: each norm after its branch,
    before the residual sum)
    PatchMerging: pad an odd side by one zero row/column → space_to_depth {block 2, order "wh"} → reduction (1×1
    conv without bias) → norm (the norm after the reduction)
    V2-CR (``swinv2_cr_*``): the same block with a plain qkv Linear, a (heads,) logit scale, its bias table "mlp" of
    form "swin_v2_cr" (meta_mlp), an optional norm3 after the block; its PatchMerging is Swin V1's (norm, then
    reduction)
    torchvision's ShiftedWindowAttentionV2 (its block around it traced): q, k, v as V2's, their biases the same rows
    of its one qkv.bias (``fused_bias``; k's part, which its forward zeroes, none) → attention (V2's, the window and
    shift by torchvision's V1 rules) → proj; PatchMergingV2 as V2's PatchMerging

Scaled cosine attention is the attention's ``cosine``, its ``logit_scale`` the module's (`edgecl.arch.ops`). The
continuous position bias, 16·sigmoid(cpb_mlp(relative_coords_table)) read at the fixed relative_position_index (V2-CR:
meta_mlp(relative_coordinates_log) for every pair), goes in as that MLP (`edgecl.arch.mlp_bias`): its weights are
the spec's tensors under the module's own keys, so training updates the MLP and the trained values go back into the
module exactly (`module_state.to_module_state`). Its coordinates are checked against the module's buffer. q and v
have biases and k none, as in the module: a bias on k would turn a cosine attention's scores (k is normalised), so
one packed bias with k's part trained could not go back into the module's zero buffer.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_maxvit import is_relu_mlp
from edgecl.arch.fx_swin import check_drops, check_kind, check_timm_mask, linear
from edgecl.arch.mlp_bias import mlp_coords, offset_index
from edgecl.errors import UsageError

_V2, _CR = "timm.models.swin_transformer_v2", "timm.models.swin_transformer_v2_cr"


class _SwinV2Converter:
    """Mixin of `fx_import._Converter`: timm's Swin V2 blocks and patch mergings, kept whole."""

    name: str
    _emit: Callable[..., str]
    window_attention: Callable[..., str]
    norm_mlp: Callable[..., str]
    swin_norm: Callable[..., str]

    def _swin_v2_block(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> None:
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_V2, "WindowAttention"))
        check_timm_mask(self.name, where, m, shape)
        attn = m.attn
        if tuple(attn.window_size) != tuple(m.window_size) or tuple(attn.relative_position_index.shape) != \
                (m.window_size[0] * m.window_size[1],) * 2:
            raise UsageError(f"{self.name}: {where}: its attention's window {tuple(attn.window_size)} is not the "
                             f"block's {tuple(m.window_size)} (set it with the block's set_input_size)")
        attended = self.window_attention(node, attn, x, f"{path}.attn", where, shape, m.window_size, m.shift_size,
                                         bias=_cpb_fields(self.name, where, attn),
                                         rows=self.fused_rows if attn.q_bias is not None else None, cosine=True,
                                         scale=1.0)
        self._post_norm_rest(node, m, x, attended, path, where)

    def _post_norm_rest(self, node: fx.Node, m: nn.Module, x: str, attended: str, path: str, where: str) -> str:
        """A post-norm block after its attention: norm1 → add → mlp → norm2 → add (→ V2-CR's norm3)."""
        h = self._emit(node, "add", [x, self.swin_norm(node, m.norm1, attended, f"{path}.norm1", where)],
                       f"{path}.add1")
        if (type(m.mlp).__module__, type(m.mlp).__name__) != ("timm.layers.mlp", "Mlp") or \
                not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: its mlp is a {type(m.mlp).__name__} with norm "
                             f"{type(getattr(m.mlp, 'norm', None)).__name__}; edgecl converts timm's Mlp with an "
                             "activation and no norm")
        out = self.swin_norm(node, m.norm2, self.norm_mlp(node, m.mlp, h, f"{path}.mlp", where), f"{path}.norm2",
                             where)
        out = self._emit(node, "add", [h, out], f"{path}.add2")
        norm3 = getattr(m, "norm3", None)  # V2-CR's extra main-branch norm (huge and giant models, stage ends)
        return out if norm3 is None or isinstance(norm3, nn.Identity) else \
            self.swin_norm(node, norm3, out, f"{path}.norm3", where)

    def _swin_v2_cr_block(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                          shape: list[int]) -> None:
        """V2-CR's block: V2's, its qkv a plain Linear, its logit scale (heads,), its position bias its meta MLP's
        (`_meta_mlp_fields`)."""
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_CR, "WindowMultiHeadAttention"))
        check_timm_mask(self.name, where, m, shape)
        attn = m.attn
        if attn.sequential_attn or tuple(attn.window_size) != tuple(m.window_size):
            raise UsageError(f"{self.name}: {where}: its attention is sequential or its window "
                             f"{tuple(attn.window_size)} is not the block's {tuple(m.window_size)}; edgecl converts "
                             "timm's parallel window attention")
        attended = self.window_attention(node, attn, x, f"{path}.attn", where, shape, m.window_size, m.shift_size,
                                         bias=_meta_mlp_fields(self.name, where, attn), cosine=True, scale=1.0)
        self._post_norm_rest(node, m, x, attended, path, where)

    def _swin_torchvision_v2_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                                       shape: list[int]) -> None:
        """torchvision's ShiftedWindowAttentionV2 (its block around it traced): V1's window attention with V2's
        cosine attention, logit scale and cpb_mlp, its q, k and v rows of qkv (`_torchvision_rows`)."""
        self._swin_torchvision_attention(node, m, x, path, where, shape, bias=_cpb_fields(self.name, where, m),
                                         rows=self._torchvision_rows, cosine=True, scale=1.0)

    def _torchvision_rows(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> tuple[str, str, str]:
        """q, k and v, each a 1×1 conv of its rows of torchvision's qkv (``weight_rows``); q's and v's biases its rows
        of qkv.bias (``fused_bias``), k's none: the forward zeroes k's part (a key bias would turn a cosine
        attention's scores), so k's rows go back into the module as zeros (`op_rules.zero_rows`)."""
        qkv = linear(self.name, where, m.qkv)
        width = qkv.out_features // 3
        base = {**pointwise(qkv), "out": width, "module_shape": [width, qkv.in_features], "module": f"{path}.qkv"}
        biased = {"bias": True, "fused_bias": True} if qkv.bias is not None else {"bias": False}
        return tuple(self._emit(node, "conv", [x], f"{path}.{part}", **{**base, "weight_rows": [i, 3], **(
            biased if part != "k" else {"bias": False})}) for i, part in enumerate("qkv"))

    def _swin_v2_merge(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> None:
        """x0..x3 = (0, 0), (1, 0), (0, 1), (1, 1) side by side (Swin V1's order), reduction, then norm."""
        height, width, _ = shape
        if height % 2 or width % 2:  # padded at the bottom / right by one zero row or column
            x = self._emit(node, "pad", [x], f"{path}.pad", pads=[0, 0, height % 2, width % 2], value=0.0)
        merged = self._emit(node, "space_to_depth", [x], f"{path}.merge", block=2, order="wh")
        reduced = self._emit(node, "conv", [merged], f"{path}.reduction",
                             **pointwise(linear(self.name, where, m.reduction)))
        self.swin_norm(node, m.norm, reduced, f"{path}.norm", where)


def _cpb_fields(model: str, where: str, attn: nn.Module) -> dict[str, Any]:
    """V2's continuous position bias as the attention's bias fields: cpb_mlp = Linear(2 → hidden, bias), ReLU,
    Linear(hidden → heads, no bias) over the log-spaced coordinates its buffer holds (normalised by the pretrained
    window, or its own), read at relative_position_index."""
    mlp, heads, window = attn.cpb_mlp, int(attn.num_heads), [int(w) for w in attn.window_size]
    pretrained = [int(p) for p in getattr(attn, "pretrained_window_size", (0, 0))]  # torchvision's: none
    span = [max(s, 1) for s in (pretrained if pretrained[0] > 0 else window)]  # timm divides by max(s − 1, 1)
    fields = {"bias_offsets": (2 * window[0] - 1) * (2 * window[1] - 1), "bias_table": "mlp",
              "bias_mlp_form": "swin_v2", "bias_mlp_span": span}
    plain = isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(mlp[1]) is nn.ReLU and \
        all(type(fc) is nn.Linear for fc in (mlp[0], mlp[2])) and mlp[0].bias is not None and mlp[2].bias is None \
        and mlp[0].in_features == 2 and mlp[2].out_features == heads and \
        _same_coords(attn.relative_coords_table, mlp_coords(fields, *window))
    if not plain:
        raise UsageError(f"{model}: {where}: its cpb_mlp is not timm's Linear(2, hidden) + ReLU + Linear(hidden, "
                         f"{heads}, no bias) over its own log-spaced coordinates; edgecl converts that one")
    index = attn.relative_position_index.reshape(window[0] * window[1], -1).tolist()
    return {**fields, "bias_mlp": mlp[0].out_features, "bias_index": index}


def _meta_mlp_fields(model: str, where: str, attn: nn.Module) -> dict[str, Any]:
    """V2-CR's position bias as the attention's bias fields: its meta_mlp (timm's Mlp, fc1 and fc2 with biases,
    ReLU) over each pair's log coordinates, which are its window's offsets' (`mlp_coords`, "cr") pair by pair: the
    offsets' table read at Swin's index (`offset_index`)."""
    window = [int(w) for w in attn.window_size]
    index = offset_index(*window)
    fields = {"bias_offsets": (2 * window[0] - 1) * (2 * window[1] - 1), "bias_table": "mlp",
              "bias_mlp_form": "swin_v2_cr"}
    if not is_relu_mlp(attn.meta_mlp, int(attn.num_heads)) or \
            not _same_coords(attn.relative_coordinates_log, mlp_coords(fields, *window)[index.reshape(-1)]):
        raise UsageError(f"{model}: {where}: its meta_mlp is not timm's Mlp (fc1 2 → hidden, ReLU, fc2 hidden → "
                         f"{attn.num_heads}, both with biases) over its own log coordinates; edgecl converts that one")
    return {**fields, "bias_mlp": attn.meta_mlp.fc1.out_features, "bias_index": index.tolist()}


def _same_coords(buffer: Any, want: np.ndarray) -> bool:
    """The module's coordinates buffer holds `want` (the spec's constants), as float32 computes them."""
    held = buffer.detach().cpu().float().numpy().reshape(-1, 2)
    return held.shape == want.shape and np.allclose(held, want, atol=1e-6)
