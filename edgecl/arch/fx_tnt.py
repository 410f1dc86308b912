"""TNT (Transformer in Transformer, timm's ``timm.models.tnt``) in a user's network, for `fx_import._Converter`. TNT
folds its patches into the batch — each patch's pixels are (B·N, p², C) tokens of their own — which the spec holds as
one (C, H', W') pixel map whose p × p windows are the patches (row by row, each patch's pixels row by row). The tracer
keeps ``PixelEmbed`` and each ``Block`` whole:

- ``PixelEmbed`` (``nn.Unfold`` of the image into patches, its conv on each): the conv with ``window`` [patch,
  patch] (its zero padding at every patch's border; legacy: the conv on the image, the unfold its p × p windows),
  then ``pixel_pos`` (1, C, p, p) as a ``pos_embed`` {tile [p, p]} added to every window;
- the pixels viewed per patch, ``pixel_embed.reshape(B, N, -1)`` (channel pixel·C + c): ``space_to_depth`` {block
  p} of the pixel map, then its N tokens;
- ``Block``: the inner attention over each patch's pixels (``attention`` {window [p, p]}: q and k of the packed qk
  Linear, v its own), its MLP; the pixels to their patch tokens (norm1_proj, proj, norm2_proj; legacy: the norm
  before) added to the patch tokens after the class token; the outer attention and MLP on the tokens.

Other layers in their places, a patch side the stride does not divide and a dropout that is not an identity at
inference are refused by name with the user's source line.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_attention2d import pointwise
from edgecl.arch.fx_calls import location, pair, shape_of
from edgecl.arch.fx_swin import check_drops, linear
from edgecl.arch.windows import window_length
from edgecl.errors import UsageError

_TNT = "timm.models.tnt"


def is_pixel_embed(m: Any) -> bool:
    """TNT's ``PixelEmbed``, judged by its class; timm is not imported."""
    return (type(m).__module__, type(m).__name__) == (_TNT, "PixelEmbed")


def is_tnt_block(m: Any) -> bool:
    """TNT's ``Block`` (its inner and outer transformers)."""
    return (type(m).__module__, type(m).__name__) == (_TNT, "Block")


class _TntConverter:
    """Mixin of `fx_import._Converter`: TNT's pixel embedding and blocks, kept whole."""

    name: str
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    attrs: dict[fx.Node, str]
    modules: dict[str, nn.Module]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]
    _conv_fields: Callable[..., dict[str, Any]]
    parameter: Callable[[str, fx.Node], torch.Tensor]
    claim: Callable[[str, fx.Node], None]
    one_call: Callable[[str, fx.Node], None]
    swin_norm: Callable[..., str]
    norm_mlp: Callable[..., str]

    def tnt_step(self, node: fx.Node) -> bool:
        """Convert `node` when it is a TNT block's call, a part of its (pixels, patches) result, or the pixels viewed
        per patch; False otherwise."""
        pixels, blocks = self._tnt_state()
        if node.op == "call_module" and is_tnt_block(self.modules.get(str(node.target))):
            self._tnt_block(node, self.modules[str(node.target)], str(node.target))
            return True
        first = node.args[0] if node.args else None
        if node.op == "call_function" and node.target is operator.getitem and first in blocks:
            (x, p, grid), y = blocks[first]
            if node.args[1] == 0:
                self.alias[node], pixels[node] = x, (p, grid)
            else:
                self.alias[node] = y
                self.last.add(node)
            return True
        if node.target in ("reshape", "view") and first in pixels:
            self.alias[node] = self._per_patch(node, self._input(first, node), *pixels[first], shape_of(node))
            self.last.add(node)
            return True
        return False

    def _tnt_state(self) -> tuple[dict, dict]:
        """The pixel maps met so far (fx node → patch side p and the map's (C, H', W')) and the blocks' results (fx
        node → the pixel map's spec node, p and shape; the patch tokens' spec node)."""
        return self.__dict__.setdefault("_tnt_pixels", {}), self.__dict__.setdefault("_tnt_blocks", {})

    def tnt_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:  # `tnt_step` converts it first
        self._tnt_block(node, m, path)

    def pixel_embed(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"TNT PixelEmbed at {path!r} {location(node)}"
        image, pos = shape_of(node.args[0]), node.args[1] if len(node.args) > 1 else node.kwargs.get("pixel_pos")
        conv = m.proj
        if pos not in self.attrs or not isinstance(conv, nn.Conv2d) or image is None or len(image) != 3:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on an image map with a pixel_pos parameter "
                             "and its Conv2d proj")
        patch, side = pair(m.patch_size), pair(m.new_patch_size)
        unfold = m.unfold
        tile = side if m.legacy else patch
        if not isinstance(unfold, nn.Unfold) or pair(unfold.kernel_size) != tile or pair(unfold.stride) != tile or \
                pair(unfold.padding) != [0, 0] or pair(unfold.dilation) != [1, 1] or \
                image[1] != m.img_size[0] or image[2] != m.img_size[1] or patch[0] != patch[1]:
            raise UsageError(f"{self.name}: {where}: its Unfold must cut the image into its square patches "
                             f"{patch} (legacy: the conv's map into {side}), without padding or dilation, on the "
                             f"model's image size {m.img_size}; gets {image[1:]}")
        fields = self._conv_fields(node, conv, f"{path}.proj")
        if not m.legacy:
            fields["window"] = patch
        h = self._emit(node, "conv", [x], f"{path}.proj", **fields)
        out = shape_of(node)
        pos_path, p = self.attrs[pos], side[0]
        embed = self.parameter(pos_path, node)
        if out != [p * p, conv.out_channels] or side[0] != side[1] or \
                tuple(embed.shape) != (1, conv.out_channels, p, p):
            raise UsageError(f"{self.name}: {where}: its patches give {out} pixels (tokens, channels) and pixel_pos "
                             f"{tuple(embed.shape)}; edgecl converts square patches of {side} pixels with pixel_pos "
                             f"(1, {conv.out_channels}, {p}, {p})")
        self.claim(pos_path, node)
        frozen = {"frozen": True} if not embed.requires_grad else {}
        self._emit(node, "pos_embed", [h], pos_path, ch=conv.out_channels, tokens=p * p, tile=[p, p],
                   module_shape=[1, conv.out_channels, p, p], **frozen)
        grid = [conv.out_channels, m.grid_size[0] * p, m.grid_size[1] * p]
        padding = conv.padding if isinstance(conv.padding, tuple) else (-1, -1)  # 'same': no patches' map
        conv_map = [window_length(d, conv.kernel_size[a], conv.stride[a], padding[a], conv.dilation[a], False)
                    for a, d in enumerate(image[1:])]
        if m.legacy and conv_map != grid[1:]:  # the unfold would drop the rows and columns past whole patches
            raise UsageError(f"{self.name}: {where}: its conv's {conv_map} map is not the patches' {grid[1:]} "
                             "pixels")
        self._tnt_state()[0][node] = (p, grid)

    def _per_patch(self, node: fx.Node, pixels: str, p: int, grid: list[int], want: list[int] | None) -> str:
        """The pixel map's p × p windows as tokens of p²·C channels, pixel-major: space_to_depth, then a reshape."""
        ch = grid[0] * p * p
        if want != [grid[1] // p * (grid[2] // p), ch]:
            raise UsageError(f"{self.name}: the TNT pixels are viewed as {want} {location(node)}; edgecl converts "
                             f"their view per patch, ({grid[1] // p * (grid[2] // p)}, {ch})")
        h = self._emit(node, "space_to_depth", [pixels], f"{node.name}.patches", block=p)
        return self._emit(node, "reshape", [h], f"{node.name}.tokens", shape=[ch, grid[1] // p * (grid[2] // p), 1])

    def _tnt_block(self, node: fx.Node, m: nn.Module, path: str) -> None:
        where = f"TNT Block at {path!r} {location(node)}"
        self.one_call(path, node)
        pixels_in, patches_in = node.args[:2]
        pixels, blocks = self._tnt_state()
        if pixels_in not in pixels or patches_in not in self.last:
            raise UsageError(f"{self.name}: {where}: edgecl converts it on TNT's pixel embedding and patch tokens")
        check_drops(self.name, where, m, "drop_path")
        (p, grid), x, tokens = pixels[pixels_in], self._input(pixels_in, node), self._input(patches_in, node)
        h = self._tnt_attention(node, m.attn_in, self.swin_norm(node, m.norm_in, x, f"{path}.norm_in", where),
                                f"{path}.attn_in", where, window=[p, p])
        x = self._emit(node, "add", [x, h], f"{path}.add_in")
        h = self.norm_mlp(node, m.mlp_in, self.swin_norm(node, m.norm_mlp_in, x, f"{path}.norm_mlp_in", where),
                          f"{path}.mlp_in", where)
        x = self._emit(node, "add", [x, h], f"{path}.add_mlp_in")
        per_patch = [grid[1] // p * (grid[2] // p), grid[0] * p * p]
        if m.legacy:
            h = self._per_patch(node, self.swin_norm(node, m.norm1_proj, x, f"{path}.norm1_proj", where), p, grid,
                                per_patch)
        else:
            h = self._per_patch(node, x, p, grid, per_patch)
            h = self.swin_norm(node, m.norm1_proj, h, f"{path}.norm1_proj", where)
        h = self._emit(node, "conv", [h], f"{path}.proj", **pointwise(linear(self.name, where, m.proj)))
        if not m.legacy:
            h = self.swin_norm(node, m.norm2_proj, h, f"{path}.norm2_proj", where)
        t = shape_of(patches_in)[0]
        cls = self._emit(node, "token", [tokens], f"{path}.cls", index=0, count=1)
        rest = self._emit(node, "token", [tokens], f"{path}.patches", index=1, count=t - 1)
        rest = self._emit(node, "add", [rest, h], f"{path}.add_proj")
        joined = self._emit(node, "add", [self._emit(node, "pad", [cls], f"{path}.cls_part", pads=[0, 0, t - 1, 0]),
                                          self._emit(node, "pad", [rest], f"{path}.patch_part", pads=[1, 0, 0, 0])],
                            f"{path}.joined")
        h = self._tnt_attention(node, m.attn_out, self.swin_norm(node, m.norm_out, joined, f"{path}.norm_out", where),
                                f"{path}.attn_out", where)
        y = self._emit(node, "add", [joined, h], f"{path}.add_out")
        h = self.norm_mlp(node, m.mlp, self.swin_norm(node, m.norm_mlp, y, f"{path}.norm_mlp", where), f"{path}.mlp",
                          where)
        y = self._emit(node, "add", [y, h], f"{path}.add_mlp")
        blocks[node] = ((x, p, grid), y)

    def _tnt_attention(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str, **fields: Any) -> str:
        """TNT's Attention: q and k the halves of one packed Linear, v its own, times ``m.scale`` (timm computes it
        by hand), proj."""
        if (type(m).__module__, type(m).__name__) != (_TNT, "Attention"):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(m).__name__}; edgecl converts TNT's "
                             "Attention there")
        check_drops(self.name, where, m, "attn_drop", "proj_drop")
        qk, v, proj = (linear(self.name, where, getattr(m, part)) for part in ("qk", "v", "proj"))
        heads, hidden = int(m.num_heads), int(m.hidden_dim)
        if qk.out_features != 2 * hidden or v.out_features != hidden or qk.in_features != v.in_features or \
                proj.in_features != hidden or hidden % heads or int(m.head_dim) * heads != hidden:
            raise UsageError(f"{self.name}: {where}: {path!r} is not TNT's attention of {heads} heads over {hidden} "
                             "channels (a packed qk Linear, v and proj)")
        packed = self._emit(node, "conv", [x], f"{path}.qk", **pointwise(qk))
        q, k = (self._emit(node, "slice", [packed], f"{path}.{part}", start=i * hidden, stop=(i + 1) * hidden)
                for i, part in enumerate("qk"))
        vs = self._emit(node, "conv", [x], f"{path}.v", **pointwise(v))
        h = self._emit(node, "attention", [q, k, vs], f"{path}.attend", heads=heads, scale=float(m.scale), **fields)
        return self._emit(node, "conv", [h], f"{path}.proj", **pointwise(proj))
