"""EfficientViM (timm's ``timm.models.efficientvim``) in a user's network, for `fx_import._Converter`. The tracer
keeps its blocks (``EfficientViMBlock``) and its hidden-state mixer (``HSMSSD``) whole (they gate with a sigmoid of
a bare parameter, flatten the map, multiply with ``@`` and return pairs). On the (C, H, W) map x a block becomes

    x ← gate 0 of dwconv1 (3×3 depthwise conv, BatchNorm) → x ← gate 1 of the mixer of norm(x) (LayerNorm2d: a
    ``layer_norm`` over the channels) → x ← gate 2 of dwconv2 → x ← gate 3 of the FFN (1×1 conv, BatchNorm, ReLU,
    1×1 conv, BatchNorm)

each gate x + σ(α[i])·(f(x) − x): ``scale`` −1 of x, ``add`` to f(x), a ``layer_scale`` with ``sigmoid`` whose
weight is row i of the block's one (4, C) ``alpha`` (``weight_rows`` [i, 4], ``module`` PATH.alpha: the four rows
go back into that one tensor), ``add`` to x. The mixer becomes

    BCdt_proj (1×1 conv to 3·S, the module's Conv1d) → dw (3×3 depthwise conv) → slices b, c, dt (S each) →
    ``state_pool`` [x, dt, b] (h: the map summed into S states, (C, S, 1)) → hz_proj (1×1 conv to 2·D on the
    states) → slices h, z → h·silu(z) + h·D (``mul``; D a bare parameter: ``scalar_affine`` of module
    ``PATH.D=``) → out_proj (1×1 conv to C): the hidden state → ``state_read`` [it, c] (y: the states read back
    at each position)

and their results, the pairs (map, hidden state), are taken apart by the getitems that follow them: the hidden
state, (B, C, S) in torch, is the spec's (C, S, 1) state tokens swapped to token-last (`fx_token_mix`), so the
head's LayerNorm over its channels (between two transposes) follows, and its mean over the states, as a map's
``flatten(2).mean(-1)``, is a ``gap`` (`_state_mean`); the head's weighted sum of heads: `fx_vim_head`. The
per-state ``A`` the mixer adds to dt before the softmax over the positions cancels in that softmax (the same number
added at every position of a state), so it is left out: it changes no output and no gradient. Layers other than
timm's in their places (a norm or activation in a ConvLayer where timm has none, another activation than SiLU, a
fused block) are refused by name with the user's source line."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape, shape_of
from edgecl.errors import UsageError

_EFFICIENTVIM = "timm.models.efficientvim"


def _kind(m: Any) -> tuple[str, str]:
    """A module's class, as (module, name): timm's classes are judged so, timm not imported."""
    return type(m).__module__, type(m).__name__


def is_hsm_ssd(m: Any) -> bool:
    """EfficientViM's HSMSSD mixer, judged by its class; timm is not imported."""
    return _kind(m) == (_EFFICIENTVIM, "HSMSSD")


def is_vim_block(m: Any) -> bool:
    """EfficientViM's block (``EfficientViMBlock``), judged by its class."""
    return _kind(m) == (_EFFICIENTVIM, "EfficientViMBlock")


class _EfficientVimConverter:
    """Mixin of `fx_import._Converter`: EfficientViM's blocks and HSM-SSD mixer, kept whole, and their results."""

    name: str
    alias: dict[fx.Node, str]
    modules: dict[str, nn.Module]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]
    _conv_fields: Callable[..., dict[str, Any]]
    one_call: Callable[[str, fx.Node], None]
    _batchnorm: Callable[..., None]
    tmix: set[fx.Node]
    vim_head_step: Callable[[fx.Node], bool]
    _act: Callable[..., str]

    def efficientvim_step(self, node: fx.Node) -> bool:
        """Convert `node` when it is a block's or an HSMSSD's call or a part of its (map, hidden state) result; False
        otherwise."""
        mixers = self.__dict__.setdefault("_hsm_results", {})
        if self._state_mean(node) or self.vim_head_step(node):
            return True
        m = self.modules.get(str(node.target)) if node.op == "call_module" else None
        if is_hsm_ssd(m) or is_vim_block(m):
            path = str(node.target)
            self.one_call(path, node)
            convert = self._hsm_ssd if is_hsm_ssd(m) else self._vim_block
            mixers[node] = convert(node, m, self._input(node.args[0], node), path)
            return True
        if node.op != "call_function" or node.target is not operator.getitem or node.args[0] not in mixers:
            return False
        y, state, path = mixers[node.args[0]]
        if node.args[1] not in (0, 1, -1, -2):
            raise UsageError(f"{self.name}: EfficientViM {type(self.modules[path]).__name__} at {path!r}: its result "
                             f"(map, hidden state) is read as [{node.args[1]!r}] {location(node)}; edgecl follows "
                             "its two items")
        self.alias[node] = y if node.args[1] in (0, -2) else state
        if node.args[1] in (1, -1):  # (B, C, S) in torch, (C, S, 1) in the spec: token-last (`fx_token_mix`)
            self.tmix.add(node)
        return True

    def _state_mean(self, node: fx.Node) -> bool:
        """``t.mean(-1)`` of a token-last (B, C, T) value (EfficientViM's head pools each hidden state over its
        states) or of a map's ``flatten(2)`` (its last map over the positions): ``gap`` over the (C, T, 1) tokens
        or the map, then ``flatten`` to (B, C) features."""
        first = node.args[0] if node.args else None
        if not (node.op == "call_method" and node.target == "mean" or
                node.op == "call_function" and node.target is torch.mean):
            return False
        flat = isinstance(first, fx.Node) and _flattened_map(first)
        if first not in self.tmix and not flat:
            return False
        dims = [*node.args[1:], *(node.kwargs[k] for k in ("dim",) if k in node.kwargs)]
        if dims not in ([-1], [2], [(-1,)], [(2,)], [[-1]], [[2]]) or node.kwargs.get("keepdim"):
            return False  # anything else on token-last values: `fx_token_mix` refuses it
        source = first.args[0] if flat else first  # a map's flatten(2): its mean over the positions, as gap's
        pooled = self._emit(node, "gap", [self._input(source, node)], f"{node.name}.pool")
        self._emit(node, "flatten", [pooled], node.name)
        return True

    def hsm_ssd(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:  # `efficientvim_step` converts it
        raise UsageError(f"{self.name}: EfficientViM {type(m).__name__} at {path!r} {location(node)} must be called "
                         "as timm calls it")

    vim_block = hsm_ssd

    def _vim_block(self, node: fx.Node, m: nn.Module, x: str, path: str) -> tuple[str, str, str]:
        where = f"EfficientViM EfficientViMBlock at {path!r} {location(node)}"
        ch = map_shape(node, self.name, where)[0]
        norm, ffn = m.norm, m.ffn
        if m.fused or tuple(m.alpha.shape) != (4, ch) or _kind(norm) != ("timm.layers.norm", "LayerNorm2d") or \
                getattr(norm, "_fast_norm", True) or norm.weight is None or norm.bias is None or \
                not is_hsm_ssd(m.mixer) or _kind(ffn) != (_EFFICIENTVIM, "FFN") or \
                not (isinstance(m.drop_path, nn.Identity) or _kind(m.drop_path) == ("timm.layers.drop", "DropPath")):
            raise UsageError(f"{self.name}: {where}: fused {m.fused}, alpha {tuple(m.alpha.shape)}, norm "
                             f"{type(norm).__name__}, mixer {type(m.mixer).__name__}, ffn {type(ffn).__name__}; "
                             f"edgecl converts an unfused block with an alpha of (4, {ch}), timm's LayerNorm2d (no "
                             "fast norm), HSMSSD, FFN and drop paths")
        x = self._vim_gate(node, 0, x, self._vim_conv_layer(node, m.dwconv1, x, f"{path}.dwconv1", where, ch, ch), path)
        normed = self._emit(node, "layer_norm", [x], f"{path}.norm", ch=ch, eps=float(norm.eps), affine=True)
        y, state, _ = self._hsm_ssd(node, m.mixer, normed, f"{path}.mixer")
        x = self._vim_gate(node, 1, x, y, path)
        x = self._vim_gate(node, 2, x, self._vim_conv_layer(node, m.dwconv2, x, f"{path}.dwconv2", where, ch, ch), path)
        hidden = int(getattr(getattr(ffn.fc1, "conv", None), "out_channels", 0))
        h = self._vim_conv_layer(node, ffn.fc1, x, f"{path}.ffn.fc1", where, ch, hidden, act=True)
        h = self._vim_conv_layer(node, ffn.fc2, h, f"{path}.ffn.fc2", where, hidden, ch)
        return self._vim_gate(node, 3, x, h, path), state, path

    def _vim_gate(self, node: fx.Node, i: int, x: str, f: str, path: str) -> str:
        """x + σ(α[i])·(f − x), α[i] row i of the block's (4, C) ``alpha``."""
        delta = self._emit(node, "add", [f, self._emit(node, "scale", [x], f"{path}.minus{i}", factor=-1.0)],
                           f"{path}.delta{i}")
        ch = int(self.modules[path].alpha.shape[1])
        gated = self._emit(node, "layer_scale", [delta], f"{path}.gate{i}", ch=ch, init=1e-4, sigmoid=True,
                           weight_rows=[i, 4], module=f"{path}.alpha")
        return self._emit(node, "add", [x, gated], f"{path}.gated{i}")

    def _vim_conv_layer(self, node: fx.Node, layer: nn.Module, x: str, path: str, where: str, ch_in: int, ch_out: int,
                    act: bool = False) -> str:
        """timm's ConvLayer2d: a bias-less nn.Conv2d, its BatchNorm2d and (`act`) a ReLU."""
        conv, norm, relu = (getattr(layer, p, None) for p in ("conv", "norm", "act"))
        if _kind(layer) != (_EFFICIENTVIM, "ConvLayer2d") or type(conv) is not nn.Conv2d or conv.bias is not None or \
                (conv.in_channels, conv.out_channels) != (ch_in, ch_out) or type(norm) is not nn.BatchNorm2d or \
                (relu is not None) != act:
            parts = ", ".join(f"{p} {type(getattr(layer, p, None)).__name__}" for p in ("conv", "norm", "act"))
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(layer).__name__} ({parts}); edgecl converts "
                             f"timm's ConvLayer2d there (a bias-less nn.Conv2d of {ch_in} to {ch_out} channels, a "
                             f"BatchNorm2d{', an activation' if act else ', no activation'})")
        h = self._emit(node, "conv", [x], f"{path}.conv", **self._conv_fields(node, conv, f"{path}.conv"))
        self._batchnorm(node, norm, h, f"{path}.norm")
        h = self.alias[node]
        return self._act(node, relu, h, f"{path}.act", where) if act else h

    def _hsm_ssd(self, node: fx.Node, m: nn.Module, x: str, path: str) -> tuple[str, str, str]:
        where = f"EfficientViM HSMSSD at {path!r} {location(node)}"
        ch = map_shape(node, self.name, where)[0]
        states, inner = int(m.state_dim), int(m.d_inner)
        if type(m.act) is not nn.SiLU or tuple(m.D.shape) != (1,) or tuple(m.A.shape) != (states,):
            raise UsageError(f"{self.name}: {where}: its act is {type(m.act).__name__} (D {tuple(m.D.shape)}); edgecl "
                             "converts timm's nn.SiLU and a D of one number")
        bcdt = self._vim_state_conv(node, m.BCdt_proj, x, f"{path}.BCdt_proj", where, ch, 3 * states, 1)
        dw = m.dw
        self._vim_plain(dw, f"{path}.dw", where, nn.Conv2d, (3 * states, 3 * states), 3 * states)
        fields = self._conv_fields(node, dw.conv, f"{path}.dw.conv")
        bcdt = self._emit(node, "conv", [bcdt], f"{path}.dw.conv", **fields)
        b, c, dt = (self._emit(node, "slice", [bcdt], f"{path}.{p}", start=i * states, stop=(i + 1) * states)
                    for i, p in enumerate(("b", "c", "dt")))
        h = self._emit(node, "state_pool", [x, dt, b], f"{path}.state")
        hz = self._vim_state_conv(node, m.hz_proj, h, f"{path}.hz_proj", where, ch, 2 * inner, 1)
        h, z = (self._emit(node, "slice", [hz], f"{path}.{p}", start=i * inner, stop=(i + 1) * inner)
                for i, p in enumerate(("h", "z")))
        gated = self._emit(node, "mul", [h, self._emit(node, "silu", [z], f"{path}.act")], f"{path}.gated")
        skip = self._emit(node, "scalar_affine", [h], f"{path}.D", bias=False, module=f"{path}.D=")
        h = self._emit(node, "add", [gated, skip], f"{path}.mixed")
        state = self._vim_state_conv(node, m.out_proj, h, f"{path}.out_proj", where, inner, ch, 1)
        return self._emit(node, "state_read", [state, c], f"{path}.read"), state, path

    def _vim_state_conv(self, node: fx.Node, layer: nn.Module, x: str, path: str, where: str, ch_in: int, ch_out: int,
                    k: int) -> str:
        """timm's ConvLayer1d of a bias-less k=1 nn.Conv1d and no norm or act: a 1×1 conv, its weight stored
        (out, in, 1)."""
        self._vim_plain(layer, path, where, nn.Conv1d, (ch_in, ch_out), 1)
        conv = layer.conv
        if conv.kernel_size != (k,) or conv.bias is not None or conv.stride != (1,) or conv.padding != (0,):
            raise UsageError(f"{self.name}: {where}: {path!r}.conv is {conv!r}; edgecl converts a bias-less "
                             "nn.Conv1d of kernel 1 there")
        return self._emit(node, "conv", [x], f"{path}.conv", **{"in": ch_in, "out": ch_out, "k": [1, 1],
                                                                "bias": False, "module_shape": [ch_out, ch_in, 1]})

    def _vim_plain(self, layer: nn.Module, path: str, where: str, kind: type, widths: tuple[int, int],
                   groups: int) -> None:
        """`layer` is timm's ConvLayer1d/2d of a `kind` conv of `widths` channels in `groups` (1: dense) groups,
        without norm or activation."""
        conv = getattr(layer, "conv", None)
        if _kind(layer) not in {(_EFFICIENTVIM, "ConvLayer1d"), (_EFFICIENTVIM, "ConvLayer2d")} or \
                type(conv) is not kind or (conv.in_channels, conv.out_channels) != widths or \
                conv.groups not in (1, groups) or layer.norm is not None or layer.act is not None:
            parts = ", ".join(f"{p} {type(getattr(layer, p, None)).__name__}" for p in ("conv", "norm", "act"))
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(layer).__name__} ({parts}); edgecl converts "
                             f"timm's ConvLayer there (a {kind.__name__} of {widths[0]} to {widths[1]} channels, no "
                             "norm, no activation)")


def _flattened_map(node: fx.Node) -> bool:
    """``x.flatten(2)`` / ``torch.flatten(x, 2)`` of a (B, C, H, W) map."""
    if node.target not in ("flatten", torch.flatten) or len(node.args) < 2 and "start_dim" not in node.kwargs:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs["start_dim"]
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    shape = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    return start == 2 and end in (-1, 3) and shape is not None and len(shape) == 3
