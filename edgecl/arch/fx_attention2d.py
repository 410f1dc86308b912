"""Attention over the positions of a (C, H, W) map (MobileNetV4-hybrid's timm ``MultiQueryAttention2d``, timm's
``Attention2d`` and Visformer's ``Attention``), for `fx_import._Converter`. The tracer keeps each module whole
(`fx_attention.is_timm_attention`); each becomes what its forward computes, in spec ops:

    MultiQueryAttention2d: [query.down_pool (average, query_strides) → query.norm] → query.proj (1×1 conv) → q;
    [key.down_conv (depthwise, kv_stride) → key.norm] → key.proj (1×1 conv to ONE head of key_dim) → k;  the same
    for v;  attention {heads, kv_heads 1, scale} → [output.upsample (bilinear, query_strides)] → output.proj
    Attention2d: qkv (1×1 conv) → slices q, k, v → attention {heads, scale} → proj
    Visformer's Attention: the same (its qkv reshape(B, 3, heads, head_dim, -1) packs q, k and v as blocks of heads)
    FastViT's Attention: the same, its qkv and proj Linears over the map's flattened positions as 1×1 convs (its
    reshape(B, N, 3, heads, head_dim) packs q, k and v as blocks of heads too)

Keeping the module whole, rather than tracing its reshapes, transposes and ``scaled_dot_product_attention``, lets
edgecl check the variant: an attention mask, query strides other than timm's pool and bilinear up-sampling,
Attention2d's ``head_first`` layout (heads interleaved with q, k and v) and layers other than plain convolutions and
BatchNorm are refused by name with the user's source line, never run as plain attention.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_calls import location, pair, pair_floats, shape_of
from edgecl.arch.fx_padding import same_kind
from edgecl.errors import UsageError

MULTI_QUERY = ("timm.layers.attention2d", "MultiQueryAttention2d")
ATTENTION_2D = ("timm.layers.attention2d", "Attention2d")
VISFORMER = ("timm.models.visformer", "Attention")
FASTVIT = ("timm.models.fastvit", "Attention")
# the layers of MultiQueryAttention2d's parts, in order: the key/value path with or without its strided depthwise conv
_LAYOUTS = {"query": (["proj"], ["down_pool", "norm", "proj"]), "key": (["proj"], ["down_conv", "norm", "proj"]),
            "value": (["proj"], ["down_conv", "norm", "proj"]),
            "output": (["proj", "drop"], ["upsample", "proj", "drop"])}
_SAME_POOL = ("timm.layers.pool2d_same", "AvgPool2dSame")  # padding='same': no padding where the stride divides the map


def is_attention_2d(m: Any) -> bool:
    """timm's MultiQueryAttention2d, Attention2d, Visformer's or FastViT's Attention, judged by its class; timm is
    not imported for this."""
    return (type(m).__module__, type(m).__name__) in (MULTI_QUERY, ATTENTION_2D, VISFORMER, FASTVIT)


def applied_scale(m: nn.Module, head_dim: int) -> float:
    """The scale a timm attention's forward really applies to q·kᵀ: its fused path (``scaled_dot_product_attention``
    without ``scale=``, timm's default) uses q's head size^-0.5 whatever ``m.scale`` says; only the unfused path
    multiplies by ``m.scale``. Reading ``m.scale`` alone converted a scale (or head count) changed after construction
    silently wrong. `head_dim`: the channels of one head of q."""
    return head_dim ** -0.5 if getattr(m, "fused_attn", False) else float(m.scale)


def pointwise(linear: Any) -> dict[str, Any]:
    """A Linear over the channels of tokens or of a map's positions as a 1×1 conv's fields, its stored (out, in)
    weight as module_shape."""
    return {"in": linear.in_features, "out": linear.out_features, "k": [1, 1], "groups": 1,
            "bias": linear.bias is not None, "module_shape": [linear.out_features, linear.in_features]}


class _Attention2dConverter:
    """Mixin of `fx_import._Converter`: timm's attention modules on feature maps, kept whole by the tracer."""

    name: str
    last: set[fx.Node]
    _emit: Callable[..., str]
    _conv: Callable[..., str]
    _norm: Callable[..., str]
    same_padded: Callable[..., None]
    alias: dict[fx.Node, str]
    attend_packed: Callable[..., str]  # `fx_attention`'s: q, k, v slices of one projection and their attention

    def attention_2d(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"{type(m).__name__} at {path!r} {location(node)}"
        shape = shape_of(node.args[0])
        if node.args[0] in self.last or shape is None or len(shape) != 3:
            raise UsageError(f"{self.name}: {where} reads a tensor of shape {shape}; edgecl supports it on a "
                             "(channels, height, width) map")
        extra = dict(zip(("attn_mask",), node.args[1:]), **node.kwargs)
        if extra.get("attn_mask") is not None:
            raise UsageError(f"{self.name}: {where} is called with an attention mask; edgecl supports plain "
                             "attention (no mask)")
        drops = ("attn_drop", "output.drop") if (type(m).__module__, type(m).__name__) == MULTI_QUERY else \
            ("attn_drop", "proj_drop")
        for part in drops:  # identities at inference, never converted: anything else there would be skipped
            if not isinstance(m.get_submodule(part), (nn.Dropout, nn.Identity)):
                raise UsageError(f"{self.name}: {where}: {part} is a {type(m.get_submodule(part)).__name__}, not a "
                                 "dropout")
        if (type(m).__module__, type(m).__name__) == MULTI_QUERY:
            self._multi_query(node, m, x, path, where)
        else:
            self._attention_2d(node, m, x, path, where)

    def _multi_query(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> None:
        heads, key_dim, value_dim = int(m.num_heads), int(m.key_dim), int(m.value_dim)
        for part, layouts in _LAYOUTS.items():  # timm's, in order: a layer elsewhere would be skipped or misread
            layers = [name for name, _ in m.get_submodule(part).named_children()]
            if part in ("query", "output"):  # the pool and the up-sampling with query strides, neither without
                layouts = (layouts[1 if m.has_query_strides else 0],)
            if layers not in layouts:
                raise UsageError(f"{self.name}: {where}: {part} has layers {layers}; edgecl converts timm's "
                                 f"{' or '.join(map(str, layouts))} there")
        shapes = {"query.proj": (heads * key_dim, None), "key.proj": (key_dim, None),
                  "value.proj": (value_dim, None), "output.proj": (None, heads * value_dim)}
        for part, (out, read) in shapes.items():
            conv = m.get_submodule(part)
            if out not in (None, getattr(conv, "out_channels", None)) or \
                    read not in (None, getattr(conv, "in_channels", None)):
                raise UsageError(f"{self.name}: {where}: {part} has {getattr(conv, 'in_channels', '?')} → "
                                 f"{getattr(conv, 'out_channels', '?')} channels; edgecl follows timm's layout "
                                 f"({heads} heads of key_dim {key_dim} and value_dim {value_dim})")
        strides = self._query_strides(node, m, where)
        query = x
        if strides:
            query = self._emit(node, "avgpool", [x], f"{path}.query.down_pool", k=strides, stride=strides, pad=[0, 0],
                               ceil_mode=False, count_include_pad=True)
            query = self._norm(node, m.query.norm, query, f"{path}.query.norm", where, required=True)
        q = self._conv(node, m.query.proj, query, f"{path}.query.proj", where)
        k, v = (self._key_value(node, getattr(m, part), x, f"{path}.{part}", where) for part in ("key", "value"))
        attended = self._emit(node, "attention", [q, k, v], f"{path}.attend", heads=heads, kv_heads=1,
                              scale=float(m.scale) if m.einsum else applied_scale(m, key_dim))
        if strides:
            attended = self._emit(node, "upsample", [attended], f"{path}.output.upsample", scale=strides,
                                  mode="bilinear")
        self._conv(node, m.output.proj, attended, f"{path}.output.proj", where)

    def _query_strides(self, node: fx.Node, m: nn.Module, where: str) -> list[int] | None:
        """The query strides as timm uses them (None without): an average pool of kernel = stride on a map they
        divide (timm reshapes the output to H // stride), and a bilinear up-sampling by them with
        align_corners=False; anything else there is refused, never run as another network."""
        if not m.has_query_strides:
            return None
        strides, shape = [int(s) for s in m.query_strides], shape_of(node.args[0])
        if shape[1] % strides[0] or shape[2] % strides[1]:
            raise UsageError(f"{self.name}: {where} has query_strides {tuple(strides)} on a {shape[1]}×{shape[2]} map; "
                             "edgecl needs them to divide the map (timm reshapes the output to H // stride)")
        pool, up = m.query.down_pool, m.output.upsample
        pool_kind = (type(pool).__module__, type(pool).__name__)
        if not (type(pool) is nn.AvgPool2d or pool_kind == _SAME_POOL) or \
                [list(pair(pool.kernel_size)), list(pair(pool.stride or pool.kernel_size)), list(pair(pool.padding))] \
                != [strides, strides, [0, 0]] or pool.ceil_mode or \
                getattr(pool, "divisor_override", None) is not None:
            raise UsageError(f"{self.name}: {where}: query.down_pool is {pool!r}; edgecl converts timm's average pool "
                             f"of kernel and stride {tuple(strides)} there")
        if type(up) is not nn.Upsample or up.mode != "bilinear" or up.align_corners or up.size is not None or \
                pair_floats(up.scale_factor) != [float(s) for s in strides]:
            raise UsageError(f"{self.name}: {where}: output.upsample is {up!r}; edgecl converts timm's "
                             f"nn.Upsample(scale_factor={tuple(strides)}, mode='bilinear') there")
        return strides

    def _key_value(self, node: fx.Node, part: nn.Sequential, x: str, path: str, where: str) -> str:
        """The key or value path: [depthwise down-sampling conv, BatchNorm or RmsNorm2d], then the 1×1 projection to
        one head. The down-sampling conv reads the module's input, so a TensorFlow-"same" one (timm's Conv2dSame,
        ``pad_type='same'``: mobilenetv5_300m_enc) is padded as that map needs (`fx_padding`)."""
        if hasattr(part, "down_conv"):
            if same_kind(part.down_conv) == "conv":
                self.same_padded(node, part.down_conv, x, f"{path}.down_conv")
                down = self.alias[node]
            else:
                down = self._conv(node, part.down_conv, x, f"{path}.down_conv", where)
            x = self._norm(node, part.norm, down, f"{path}.norm", where, required=True)
        return self._conv(node, part.proj, x, f"{path}.proj", where)

    def _attention_2d(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> None:
        if getattr(m, "head_first", False):
            raise UsageError(f"{self.name}: {where} has head_first=True (each head's q, k and v side by side); "
                             "edgecl supports q, k and v each a block of heads (head_first=False)")
        linear = (type(m).__module__, type(m).__name__) == FASTVIT  # its qkv and proj are Linears
        kind, sizes = (nn.Linear, ("out_features", "in_features")) if linear else (nn.Conv2d, ("out_channels",
                                                                                              "in_channels"))
        for part in ("qkv", "proj"):  # a strided or spatial conv would move the positions
            layer = m.get_submodule(part)
            if not isinstance(layer, kind) or not linear and (type(layer) is not nn.Conv2d or tuple(
                    layer.kernel_size) != (1, 1) or tuple(layer.stride) != (1, 1)):
                raise UsageError(f"{self.name}: {where}: {part} is a {type(layer).__name__} "
                                 f"{getattr(layer, 'kernel_size', '')}; edgecl converts a "
                                 f"{'nn.Linear' if linear else '1×1 nn.Conv2d'} there")
        heads, width, read = int(m.num_heads), getattr(m.qkv, sizes[0]) // 3, getattr(m.proj, sizes[1])
        head_dim = int(getattr(m, "head_dim", getattr(m, "dim_head", 0)))  # Visformer's name, Attention2d's
        if width != heads * head_dim or read != width:
            raise UsageError(f"{self.name}: {where}: qkv has {3 * width} channels and proj reads {read}; edgecl "
                             f"follows timm's layout (q, k and v of {heads} heads)")
        project = (lambda layer, value, name: self._emit(node, "conv", [value], name, **pointwise(layer))) \
            if linear else (lambda layer, value, name: self._conv(node, layer, value, name, where))
        packed = project(m.qkv, x, f"{path}.qkv")
        # Attention2d has no `scale`: q.size(-1)^-0.5 on both paths; Visformer's and FastViT's unfused read m.scale
        plain = (type(m).__module__, type(m).__name__) == ATTENTION_2D
        scale = head_dim ** -0.5 if plain else applied_scale(m, head_dim)
        attended = self.attend_packed(node, packed, path, width, heads=heads, scale=scale)
        project(m.proj, attended, f"{path}.proj")
