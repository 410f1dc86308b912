"""Swin Transformer layers (timm's ``timm.models.swin_transformer`` and torchvision's ``swin_transformer``) in a
user's network, for `fx_import._Converter`. They read and write channels-last ``(B, H, W, C)`` maps (`fx_norms`);
the tracer keeps them whole, because their windows go through 6-D views, ``torch.roll`` and a mask buffer that the
spec has no values for. Each becomes what its forward computes on the (C, H, W) map, in spec ops:

    timm SwinTransformerBlock: norm1 → qkv (1×1 conv) → slices q, k, v → attention {window, shift, bias table} →
    proj → add the input → norm2 → mlp (fc1, act, fc2) → add
    torchvision ShiftedWindowAttention: qkv → slices → attention {window, shift, bias table} → proj (the block
    around it is traced: its LayerNorms, MLP and residual sums are ordinary layers)
    PatchMerging (both): pad an odd side by one zero row/column → space_to_depth {block 2, order "wh"} → norm →
    reduction (1×1 conv without bias)

The relative position bias is the module's ``relative_position_bias_table`` ``(offsets, heads)`` with its fixed
``relative_position_index`` as the node's ``bias_index`` (``bias_table`` "swin"). The window and shift are the
module's own after its clamping to the map (timm's and torchvision's rules). A map the window does not tile (both
libraries then pad it with zeros that join the attention) is refused by name with the user's source line. Swin V2,
timm's and torchvision's, goes in too (`fx_swin_v2`, its layers dispatched here by class as these are).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch import fx, nn

from edgecl.arch.attention_windows import window_mask
from edgecl.arch.fx_activations import module_activation
from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.errors import UsageError

_TIMM, _TORCHVISION = "timm.models.swin_transformer", "torchvision.models.swin_transformer"
_V2, _CR = "timm.models.swin_transformer_v2", "timm.models.swin_transformer_v2_cr"
# each layer's converter, `_swin_KIND` (timm's Swin V2 and V2-CR ones in `fx_swin_v2`; V2-CR merges as V1)
_KINDS = {(_TIMM, "SwinTransformerBlock"): "timm_block", (_TIMM, "PatchMerging"): "merge",
          (_TORCHVISION, "ShiftedWindowAttention"): "torchvision_attention", (_TORCHVISION, "PatchMerging"): "merge",
          (_TORCHVISION, "ShiftedWindowAttentionV2"): "torchvision_v2_attention",
          (_TORCHVISION, "PatchMergingV2"): "v2_merge",
          (_V2, "SwinTransformerV2Block"): "v2_block", (_V2, "PatchMerging"): "v2_merge",
          (_CR, "SwinTransformerV2CrBlock"): "v2_cr_block", (_CR, "PatchMerging"): "merge"}
_DROPS = ("Dropout", "Identity", "DropPath", "StochasticDepth")  # identities at inference


def is_swin(m: Any) -> bool:
    """A Swin (V1, V2 and timm's V2-CR) layer edgecl keeps whole, judged by its class; nothing is imported."""
    return (type(m).__module__, type(m).__name__) in _KINDS


class _SwinConverter:
    """Mixin of `fx_import._Converter`: Swin's blocks, window attentions and patch mergings, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    _emit: Callable[..., str]
    _activation: Callable[..., None]
    attend_packed: Callable[..., str]
    fused_rows: Callable[..., tuple[str, str, str]]

    def swin(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        kind = _KINDS[(type(m).__module__, type(m).__name__)]
        family = "Swin V2" if type(m).__module__ in (_V2, _CR) or type(m).__name__.endswith("V2") else "Swin"
        where = f"{family} {type(m).__name__} at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] not in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports Swin's layers "
                             "on channels-last (batch, height, width, channels) maps")
        getattr(self, f"_swin_{kind}")(node, m, x, path, where, shape)
        self.last.add(node)

    def _swin_timm_block(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> None:
        check_drops(self.name, where, m, "drop_path1", "drop_path2")
        check_kind(self.name, where, m, "attn", (_TIMM, "WindowAttention"))
        check_timm_mask(self.name, where, m, shape)
        normed = self.swin_norm(node, m.norm1, x, f"{path}.norm1", where)
        attended = self.window_attention(node, m.attn, normed, f"{path}.attn", where, shape, m.window_size,
                                          m.shift_size)
        h = self._emit(node, "add", [x, attended], f"{path}.add1")
        if (type(m.mlp).__module__, type(m.mlp).__name__) != ("timm.layers.mlp", "Mlp") or \
                not isinstance(m.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: its mlp is a {type(m.mlp).__name__} with norm "
                             f"{type(getattr(m.mlp, 'norm', None)).__name__}; edgecl converts timm's Mlp with an "
                             "activation and no norm")
        out = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm2, h, f"{path}.norm2", where), f"{path}.mlp",
                            where)
        self._emit(node, "add", [h, out], f"{path}.add2")

    def norm_mlp(self, node: fx.Node, mlp: Any, x: str, path: str, where: str,
                 parts: tuple[str, str, str] = ("fc1", "act", "fc2")) -> str:
        """An MLP of two Linears over the channels with an activation between (timm's Mlp after the block's norm,
        TinyViT's NormMlp with its own); `parts` name its layers under `path` (torchvision's are numbered)."""
        if module_activation(getattr(mlp, "act", None)) is None:
            raise UsageError(f"{self.name}: {where}: its mlp's act is a {type(getattr(mlp, 'act', None)).__name__}; "
                             "edgecl converts an activation there")
        check_drops(self.name, where, mlp, "drop1", "drop2")
        inner = self._emit(node, "conv", [x], f"{path}.{parts[0]}", **pointwise(linear(self.name, where, mlp.fc1)))
        self._activation(node, mlp.act, inner, f"{path}.{parts[1]}")
        return self._emit(node, "conv", [self.alias[node]], f"{path}.{parts[2]}",
                          **pointwise(linear(self.name, where, mlp.fc2)))

    def _swin_torchvision_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str,
                                    shape: list[int], **v2: Any) -> None:
        """torchvision's window attention (V2's: its `v2` fields, `fx_swin_v2`)."""
        window = [int(w) for w in m.window_size]
        # torchvision's rule: no shift along a side the window covers
        shift = [0 if w >= side else int(s) for w, s, side in zip(window, m.shift_size, shape[:2])]
        self.window_attention(node, m, x, path, where, shape, window, shift, **v2)

    def window_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int],
                          window: Any, shift: Any, bias: dict[str, Any] | None = None,
                          rows: Callable[..., tuple[str, str, str]] | None = None, **fields: Any) -> str:
        """qkv → attention within (shifted) windows with the relative position bias → proj. Swin V2 (`fx_swin_v2`)
        passes its `bias` fields (its MLP-generated table), its q, k and v `rows` (each a conv of its rows of qkv:
        q's and v's biases, k's none; called as `fused_rows`) and its attention's other `fields` (cosine, scale)."""
        window, shift = [int(w) for w in window], [int(s) for s in shift]
        heads = int(m.num_heads)
        if bias is None:  # the module's learned table (offsets, heads), read at its fixed index
            table = m.relative_position_bias_table
            if table.shape[1] != heads:
                raise UsageError(f"{self.name}: {where}: a bias table of {tuple(table.shape)} does not make {heads} "
                                 "heads")
            bias = {"bias_offsets": int(table.shape[0]), "bias_table": "swin", "bias_index":
                    m.relative_position_index.reshape(window[0] * window[1], -1).tolist()}
        if shape[0] % window[0] or shape[1] % window[1]:
            raise UsageError(f"{self.name}: {where}: its {window[0]}×{window[1]} windows do not tile the "
                             f"{shape[0]}×{shape[1]} map (Swin pads it with zeros that join the attention); "
                             "choose an input size whose stage maps the window divides")
        for part in ("attn_drop", "proj_drop"):
            if hasattr(m, part) and type(getattr(m, part)).__name__ not in _DROPS:
                raise UsageError(f"{self.name}: {where}: {part} is a {type(getattr(m, part)).__name__}")
        qkv, proj = linear(self.name, where, m.qkv), linear(self.name, where, m.proj)
        width = qkv.out_features // 3
        if qkv.out_features != 3 * width or width % heads:
            raise UsageError(f"{self.name}: {where}: qkv of {qkv.out_features} outputs does not make {heads} heads")
        # torchvision's (no `scale`) multiplies q by (C / heads)^-½ in its forward; timm's as `applied_scale`
        if "scale" not in fields:
            fields["scale"] = applied_scale(m, width // heads) if type(m).__module__ == _TIMM else \
                (width // heads) ** -0.5
        fields = {"module": path, "heads": heads, "window": window, "shift": shift, **bias, **fields}
        if rows is not None:
            attended = self._emit(node, "attention", list(rows(node, m, x, path, where)),
                                  f"{path}.attend", **fields)
        else:
            attended = self.attend_packed(node, self._emit(node, "conv", [x], f"{path}.qkv", **pointwise(qkv)), path,
                                          width, **fields)
        return self._emit(node, "conv", [attended], f"{path}.proj", **pointwise(proj))

    def _swin_merge(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, shape: list[int]) -> None:
        """Both libraries' PatchMerging: x0..x3 = (0, 0), (1, 0), (0, 1), (1, 1) side by side, norm, reduction."""
        height, width, _ = shape
        if height % 2 or width % 2:  # both pad the bottom / right side by one zero row or column
            x = self._emit(node, "pad", [x], f"{path}.pad", pads=[0, 0, height % 2, width % 2], value=0.0)
        merged = self._emit(node, "space_to_depth", [x], f"{path}.merge", block=2, order="wh")
        normed = self.swin_norm(node, m.norm, merged, f"{path}.norm", where)
        self._emit(node, "conv", [normed], f"{path}.reduction", **pointwise(linear(self.name, where, m.reduction)))

    def swin_norm(self, node: fx.Node, norm: nn.Module, x: str, path: str, where: str) -> str:
        """An nn.LayerNorm over the channels, with its weight and bias (or timm's LayerNorm, the same computation
        where its fast-norm option is off)."""
        timm_norm = (type(norm).__module__, type(norm).__name__) == ("timm.layers.norm", "LayerNorm") and \
            not getattr(norm, "_fast_norm", True)
        if not (type(norm) is nn.LayerNorm or timm_norm) or not norm.elementwise_affine or norm.bias is None or \
                len(norm.normalized_shape) != 1:
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(norm).__name__}; edgecl converts an "
                             "nn.LayerNorm over the channels with a weight and a bias here")
        return self._emit(node, "layer_norm", [x], path, ch=int(norm.normalized_shape[0]), eps=float(norm.eps),
                          affine=True)


def check_timm_mask(model: str, where: str, m: nn.Module, shape: list[int]) -> None:
    """timm's block applies the mask it built for its ``input_resolution`` (unless ``dynamic_mask``); on a map of
    another shape with as many windows it runs with that mask, which the spec (masking from the map) would not."""
    window, shift = [int(w) for w in m.window_size], [int(s) for s in m.shift_size]
    if getattr(m, "dynamic_mask", False) or shape[0] % window[0] or shape[1] % window[1]:
        return  # built from the map itself; an untiled map is refused by `window_attention`
    stored, want = getattr(m, "attn_mask", None), window_mask(shape[0], shape[1], *window, *shift)
    if (stored is None) != (want is None) or want is not None and (
            tuple(stored.shape) != want.shape or not np.array_equal(stored.detach().cpu().numpy(), want)):
        built = "×".join(str(int(r)) for r in getattr(m, "input_resolution", getattr(m, "feat_size", ())))
        raise UsageError(f"{model}: {where}: it applies its attention mask built for an {built} map to a "
                         f"{shape[0]}×{shape[1]} one; build it with input_resolution {tuple(shape[:2])} (or "
                         "dynamic_mask=True)")


def check_kind(model: str, where: str, m: nn.Module, part: str, kind: tuple[str, str]) -> None:
    """A library block's sublayer must be the library's own class (another one that runs in its place would be
    read for attributes it lacks, or silently as the library's)."""
    found = getattr(m, part, None)
    if (type(found).__module__, type(found).__name__) != kind:
        raise UsageError(f"{model}: {where}: its {part} is a {type(found).__name__}; edgecl converts {kind[0]}'s "
                         f"{kind[1]} there")


def linear(model: str, where: str, m: nn.Module) -> nn.Module:
    """An nn.Linear (timm's subclass computes the same) inside a Swin layer."""
    if not isinstance(m, nn.Linear):
        raise UsageError(f"{model}: {where}: holds a {type(m).__name__} where edgecl converts an nn.Linear")
    return m


def check_drops(model: str, where: str, m: nn.Module, *parts: str) -> None:
    """Dropouts and drop paths are identities at inference; anything else there is refused."""
    for part in parts:
        kind = type(getattr(m, part, None)).__name__
        if kind not in _DROPS:
            raise UsageError(f"{model}: {where}: {part} is a {kind}; edgecl converts a dropout or drop path there")
