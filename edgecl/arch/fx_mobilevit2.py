"""MobileViTv2's block (timm's ``timm.models.mobilevit.MobileVitV2Block``, `mobilevitv2_*`) in a user's network, for
`fx_import._Converter` (dispatched from `fx_mobilevit`, which keeps both blocks whole and checks that the patch tiles
the map). Its LinearTransformerBlocks run over the unfolded (B, C, P, N) map; every layer of them but the attention's
softmax over the N patches works per position or over the whole map (GroupNorm1), so on the (C, H, W) map it is

    conv_kxk (ConvNormAct) → conv_1x1 → for each LinearTransformerBlock:
        norm1 (layer_norm over "map") → qkv_proj (1×1 conv to 1 + 2C) → slices q (1), k (C), v (C)
        → attention_pool(k, q) {patch [ph, pw]} (the context vector at each offset, given to every patch) · relu(v)
        → out_proj → add; norm2 → ConvMlp → add
    → norm (layer_norm over "map") → conv_proj (ConvNormAct)

with no unfold or fold. Refused by name with the user's source line: another norm, attention or MLP in a place of
the block, a GroupNorm of more than one group, dropouts that are not identities at inference.
"""
from __future__ import annotations

from typing import Callable

from torch import fx, nn

from edgecl.arch.fx_swin import check_drops
from edgecl.errors import UsageError

_MOBILEVIT = "timm.models.mobilevit"


class _MobileVitV2Converter:
    """Mixin of `fx_import._Converter`: MobileViTv2's blocks, kept whole."""

    name: str
    _emit: Callable[..., str]
    _conv: Callable[..., str]  # `fx_split_attn`'s: a plain nn.Conv2d, named by its path
    _mlp: Callable[..., str]  # `fx_global_context`'s: timm's ConvMlp
    _conv_norm_act: Callable[..., str]  # `fx_mobilevit`'s: timm's ConvNormAct

    def mobilevit_v2(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, patch: list[int]) -> None:
        h = self._conv_norm_act(node, m.conv_kxk, x, f"{path}.conv_kxk", where)
        h = self._conv(node, m.conv_1x1, h, f"{path}.conv_1x1", where)
        for i, block in enumerate(m.transformer):
            h = self._linear_transformer(node, block, h, f"{path}.transformer.{i}", where, patch)
        h = self._group_norm1(node, m.norm, h, f"{path}.norm", where)
        self._conv_norm_act(node, m.conv_proj, h, f"{path}.conv_proj", where)

    def _linear_transformer(self, node: fx.Node, block: nn.Module, x: str, path: str, where: str,
                            patch: list[int]) -> str:
        """One LinearTransformerBlock: pre-norm linear self-attention and ConvMlp, each added."""
        if (type(block).__module__, type(block).__name__) != (_MOBILEVIT, "LinearTransformerBlock") or \
                (type(block.attn).__module__, type(block.attn).__name__) != (_MOBILEVIT, "LinearSelfAttention"):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(block).__name__}; edgecl converts timm's "
                             "LinearTransformerBlock with its LinearSelfAttention there")
        check_drops(self.name, where, block, "drop_path1", "drop_path2")
        attn, c = block.attn, int(block.attn.embed_dim)
        check_drops(self.name, where, attn, "attn_drop", "out_drop")
        normed = self._group_norm1(node, block.norm1, x, f"{path}.norm1", where)
        qkv = self._conv(node, attn.qkv_proj, normed, f"{path}.attn.qkv_proj", where)
        q, k, v = (self._emit(node, "slice", [qkv], f"{path}.attn.{part}", start=start, stop=stop)
                   for part, start, stop in (("query", 0, 1), ("key", 1, 1 + c), ("value", 1 + c, 1 + 2 * c)))
        context = self._emit(node, "attention_pool", [k, q], f"{path}.attn.context", patch=list(patch))
        mixed = self._emit(node, "mul", [self._emit(node, "relu", [v], f"{path}.attn.relu"), context],
                           f"{path}.attn.mul")
        h = self._emit(node, "add", [x, self._conv(node, attn.out_proj, mixed, f"{path}.attn.out_proj", where)],
                       f"{path}.add1")
        out = self._mlp(node, block.mlp, self._group_norm1(node, block.norm2, h, f"{path}.norm2", where),
                        f"{path}.mlp", where)
        return self._emit(node, "add", [h, out], f"{path}.add2")

    def _group_norm1(self, node: fx.Node, norm: nn.Module, x: str, path: str, where: str) -> str:
        """A GroupNorm of one group (timm's GroupNorm1): a ``layer_norm`` over the whole map."""
        if not isinstance(norm, nn.GroupNorm) or norm.num_groups != 1:
            groups = getattr(norm, "num_groups", None)
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(norm).__name__}"
                             f"{f' of {groups} groups' if groups else ''}; edgecl converts a GroupNorm of one group "
                             "(timm's GroupNorm1) there")
        return self._emit(node, "layer_norm", [x], path, ch=int(norm.num_channels), eps=float(norm.eps),
                          affine=bool(norm.affine), over="map")
