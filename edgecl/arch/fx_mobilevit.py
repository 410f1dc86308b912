"""MobileViT's block (timm's ``timm.models.mobilevit.MobileVitBlock``) in a user's network, for
`fx_import._Converter`. The tracer keeps it whole: its unfold into patches reshapes with the batch folded into the
rows (``B·C·n_h``), which no spec op follows, and a Python branch on the map's size picks a bilinear resize. Its
transformer runs over the N = n_h·n_w patches once for each of the P = p_h·p_w pixel offsets inside a patch: every
other layer of it (LayerNorm, the Linears, the MLP) works per position, so on the (C, H, W) map the block is

    conv_kxk (conv, BatchNormAct) → conv_1x1 → for each timm Block: norm1 → qkv (1×1 conv) → slices q, k, v →
    attention {window [n_h, n_w], dilated: the positions p_h, p_w apart} → proj → add → norm2 → mlp → add →
    norm → conv_proj → conv_fusion over cat(shortcut, x)

with no unfold or fold at all: a dilated window holds exactly the patches' pixels at one offset, in the unfold's
patch order (`edgecl.arch.attention_windows`). Refused by name with the user's source line: a map the patch does not
tile (MobileViT then resizes it bilinearly to a multiple and back), a layer scale, qk-norm or any other layer in a
place of the block. MobileViTv2's block, kept whole here too, is converted by `fx_mobilevit2`.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_attention import check_plain_attention
from edgecl.arch.fx_attention2d import applied_scale, pointwise
from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.fx_mobilevit2 import _MobileVitV2Converter
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.arch.op_shapes import output_shape
from edgecl.errors import UsageError

_MOBILEVIT = "timm.models.mobilevit"
_BLOCKS = {"MobileVitBlock": True, "MobileVitV2Block": False}
_VIT_BLOCK = ("timm.models.vision_transformer", "Block")


def is_mobilevit(m: Any) -> bool:
    """MobileViT's block or MobileViTv2's, judged by its class; timm is not imported."""
    return type(m).__module__ == _MOBILEVIT and type(m).__name__ in _BLOCKS


class _MobileVitConverter(_MobileVitV2Converter):
    """Mixin of `fx_import._Converter`: MobileViT's blocks, kept whole (MobileViTv2's by its base)."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _batchnorm: Callable[..., None]
    _conv_fields: Callable[..., dict[str, Any]]
    attend_packed: Callable[..., str]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]

    def mobilevit(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"MobileViT {type(m).__name__} at {path!r} {location(node)}"
        shape, (ph, pw) = shape_of(node.args[0]), (int(p) for p in m.patch_size)
        if shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports it on "
                             "(batch, channels, height, width) maps")
        # the patches tile the map conv_kxk makes (a strided one halves it), not the block's input
        shape = output_shape({"op": "conv", **self._conv_fields(node, m.conv_kxk.conv, f"{path}.conv_kxk.conv")},
                             [shape], where)
        if shape[1] % ph or shape[2] % pw:
            raise UsageError(f"{self.name}: {where}: its {ph}×{pw} patches do not tile the {shape[1]}×{shape[2]} map "
                             "(MobileViT then resizes the map bilinearly to a multiple of the patch and back); "
                             "choose an input size whose stage maps the patch divides (64 or 256 for mobilevit_*)")
        if not _BLOCKS[type(m).__name__]:
            return self.mobilevit_v2(node, m, x, path, where, [ph, pw])  # `fx_mobilevit2`
        h = self._conv_norm_act(node, m.conv_kxk, x, f"{path}.conv_kxk", where)
        if type(m.conv_1x1) is not nn.Conv2d:
            raise UsageError(f"{self.name}: {where}: conv_1x1 is a {type(m.conv_1x1).__name__}; edgecl converts an "
                             "nn.Conv2d there")
        h = self._emit(node, "conv", [h], f"{path}.conv_1x1", **self._conv_fields(node, m.conv_1x1,
                                                                                  f"{path}.conv_1x1"))
        grid = [shape[1] // ph, shape[2] // pw]  # the patches, p_h and p_w pixels apart at one offset
        for i, block in enumerate(m.transformer):
            h = self._mobilevit_transformer(node, block, h, f"{path}.transformer.{i}", where, grid)
        h = self.swin_norm(node, m.norm, h, f"{path}.norm", where)
        h = self._conv_norm_act(node, m.conv_proj, h, f"{path}.conv_proj", where)
        if m.conv_fusion is not None:
            h = self._emit(node, "cat", [x, h], f"{path}.cat")
            self._conv_norm_act(node, m.conv_fusion, h, f"{path}.conv_fusion", where)

    def _mobilevit_transformer(self, node: fx.Node, block: nn.Module, x: str, path: str, where: str,
                               grid: list[int]) -> str:
        """One timm ViT Block over the patches at each offset: pre-norm attention and MLP, each added."""
        if (type(block).__module__, type(block).__name__) != _VIT_BLOCK:
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(block).__name__}; edgecl converts timm's "
                             "vision_transformer Block there")
        check_drops(self.name, where, block, "drop_path1", "drop_path2", "ls1", "ls2")
        attn = block.attn
        check_plain_attention(self.name, f"{where}: {path}.attn", attn)
        check_drops(self.name, where, attn, "attn_drop", "proj_drop")
        qkv, proj, heads = linear(self.name, where, attn.qkv), linear(self.name, where, attn.proj), int(attn.num_heads)
        packed = self._emit(node, "conv", [self.swin_norm(node, block.norm1, x, f"{path}.norm1", where)],
                            f"{path}.attn.qkv", **pointwise(qkv))
        width = qkv.out_features // 3
        attended = self.attend_packed(node, packed, f"{path}.attn", width, heads=heads,
                                      scale=applied_scale(attn, width // heads), window=grid, dilated=True)
        h = self._emit(node, "add", [x, self._emit(node, "conv", [attended], f"{path}.attn.proj",
                                                   **pointwise(proj))], f"{path}.add1")
        if (type(block.mlp).__module__, type(block.mlp).__name__) != ("timm.layers.mlp", "Mlp") or \
                not isinstance(block.mlp.norm, nn.Identity):
            raise UsageError(f"{self.name}: {where}: {path}.mlp is a {type(block.mlp).__name__}; edgecl converts "
                             "timm's Mlp with an activation and no norm")
        out = self.norm_mlp(node, block.mlp, self.swin_norm(node, block.norm2, h, f"{path}.norm2", where),
                            f"{path}.mlp", where)
        return self._emit(node, "add", [h, out], f"{path}.add2")

    def _conv_norm_act(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> str:
        """timm's ConvNormAct: an nn.Conv2d, then a BatchNormAct2d (its activation inside), no anti-aliasing."""
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d) or \
                getattr(m, "aa", None) is not None and not isinstance(m.aa, nn.Identity):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__} with conv "
                             f"{type(conv).__name__} and norm {type(bn).__name__}; edgecl converts timm's ConvNormAct "
                             "(an nn.Conv2d and a BatchNormAct2d) there")
        h = self._emit(node, "conv", [x], f"{path}.conv", **self._conv_fields(node, conv, f"{path}.conv"))
        self._batchnorm(node, bn, h, f"{path}.bn")
        return self.alias[node]
