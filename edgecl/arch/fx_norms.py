"""LayerNorm over channels, channels-last stretches, layer scales and global response norms in a user's forward, for
`fx_import._Converter` — what ConvNeXt (torchvision and timm) and its relatives compute:

- ``x.permute(0, 2, 3, 1)`` puts channels last; until ``permute(0, 3, 1, 2)`` brings them back, the value is the
  same tensor in another layout, so no spec node is emitted: the fx node is remembered as *channels-last* (`last`).
  On such a value edgecl follows a LayerNorm over the channels, an ``nn.Linear`` (a 1×1 convolution over the
  channels: spec ``conv`` with ``module_shape`` ``(out, in)``, so the module's weight reads as it is),
  activations, dropouts and element-wise sums and products; anything else there is refused by name.
- ``F.layer_norm(x, (C,), weight, bias, eps)`` — what ``nn.LayerNorm`` and the libraries' ``LayerNorm2d`` (permute,
  layer_norm, permute) run, traced into — becomes a ``layer_norm`` node over the channels of a channels-last map or
  of a feature vector, named by the layer's path (its tensors keep their state-dict keys).
- ``F.group_norm(x, G, weight, bias, eps)`` — what ``nn.GroupNorm`` and timm's ``GroupNormAct`` (BiT) run — on a
  channels-first map becomes a ``layer_norm`` over the map with ``groups`` G (left out for one group).
- A parameter multiplying a tensor channel by channel (ConvNeXt's ``gamma`` / ``layer_scale``, of shape
  ``(C,)`` or ``(C, 1, 1)``) becomes a ``layer_scale`` node named by the parameter's path.
- timm's ``GlobalResponseNorm`` (ConvNeXt V2), kept whole by the tracer, becomes a ``grn`` node.

Parameters used in forward (fx ``get_attr``) are remembered by path (`attrs`) and accepted only there; any other use
is refused, as before.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgecl.arch.fx_calls import VIEWS, location, shape_of
from edgecl.errors import UsageError

TO_LAST, FROM_LAST = [0, 2, 3, 1], [0, 3, 1, 2]
PERMUTES = (torch.permute, "permute")
GROUP_NORMS = (F.group_norm, torch.group_norm)
LAYER_NORMS = (F.layer_norm, torch.layer_norm, *GROUP_NORMS)  # `_NormConverter.layer_norm` takes both
GRN = ("timm.layers.grn", "GlobalResponseNorm")  # ConvNeXt V2's layer, known by where it is defined


def is_grn(m: Any) -> bool:
    """timm's GlobalResponseNorm (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == GRN


def is_view(target: Any) -> bool:
    """A view-like op or an index (what `_NormConverter.parameter_view` judges on a parameter)."""
    return target is operator.getitem or target in VIEWS


class _NormConverter:
    """Mixin of `fx_import._Converter`: permutes, layer norms, layer scales and the parameters they read."""

    name: str
    alias: dict[fx.Node, str]
    traced: fx.GraphModule
    module: nn.Module
    param_modules: set[str]
    refuse: Callable[..., UsageError]
    _emit: Callable[..., str]
    _input: Callable[[Any, fx.Node], str]
    bind: Callable[..., dict[str, Any]]

    def init_norms(self) -> None:
        self.last: set[fx.Node] = set()  # fx nodes whose value is the channels-last view of their spec node
        self.tmix: set[fx.Node] = set()  # tokens swapped to (B, C, T), token-last (`fx_token_mix`)
        self.attrs: dict[fx.Node, str] = {}  # get_attr nodes (and views of them) → the parameter's path

    # -- parameters -------------------------------------------------------------------------------------------------
    def attribute(self, node: fx.Node) -> None:
        """A get_attr: remembered, judged where it is used."""
        self.attrs[node] = str(node.target)

    def parameter(self, path: str, node: fx.Node) -> torch.Tensor:
        """The module's parameter at `path`; a buffer or a plain tensor attribute is refused (nothing learns it)."""
        try:
            return self.traced.get_parameter(path)
        except AttributeError:
            raise self.refuse(node, f"{path!r} is a tensor attribute that is no parameter (a buffer or a constant); "
                                    "edgecl supports parameters used in forward only as a LayerNorm's or a "
                                    "per-channel layer scale") from None

    def module_at(self, path: str) -> nn.Module | None:
        try:
            return self.module.get_submodule(path)
        except AttributeError:
            return None

    def claim(self, path: str, node: fx.Node) -> None:
        if path in self.param_modules:
            raise UsageError(f"{self.name}: {path!r} is used twice (shared weights) {location(node)}; edgecl "
                             "needs one use per layer")
        self.param_modules.add(path)

    def parameter_view(self, node: fx.Node) -> None:
        """A view of a parameter that only adds or moves axes of 1 (``gamma.reshape(1, -1, 1, 1)``,
        ``g[:, None, None]``, ``g.view(-1, 1, 1)``): the same values, judged where it is used. Anything else done to
        a parameter in forward is refused."""
        path = self.attrs[node.args[0]]
        index = node.args[1] if node.target is operator.getitem else ()
        if not all(i is None or i == slice(None) or i is Ellipsis for i in (index if isinstance(index, tuple)
                                                                           else (index,))):
            raise self.parameter_used(node, path)
        self.attrs[node] = path

    def parameter_used(self, node: fx.Node, path: str) -> UsageError:
        """The refusal of a parameter used in forward other than as a layer scale or a LayerNorm's."""
        return self.refuse(node, f"the parameter {path!r} is used directly in forward; edgecl supports parameters "
                                 "inside standard layers (Conv2d, Linear, BatchNorm, LayerNorm), as a "
                                 "per-channel layer scale (x * gamma) and as a learnable affine (scale * x + bias, "
                                 "one number each)")

    # -- layouts ----------------------------------------------------------------------------------------------------
    def permute(self, node: fx.Node) -> None:
        """To channels-last and back: the same spec value, the layout remembered."""
        source = node.args[0]
        dims = list(node.kwargs.get("dims", node.args[1:]))
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):  # permute([0, 2, 3, 1]), torch.permute(x, dims)
            dims = list(dims[0])
        shape = shape_of(source)
        if not all(isinstance(d, int) for d in dims) or shape is None or len(dims) != len(shape) + 1:
            raise self.refuse(node, f"permute {dims} of a tensor of shape {shape}")
        dims = [d % len(dims) for d in dims]
        x = self._input(source, node)
        if source not in self.last and dims == TO_LAST:
            self.last.add(node)
        elif source in self.last and dims == FROM_LAST:
            pass
        else:
            raise self.refuse(node, f"permute {dims}; edgecl follows only permute(0, 2, 3, 1) of a feature map "
                                    "(channels last, as before a LayerNorm) and permute(0, 3, 1, 2) back")
        self.alias[node] = x

    def check_layout(self, node: fx.Node, follows: bool) -> None:
        """Refuse an op on a channels-last value unless edgecl `follows` it there (an element-wise op, a Linear, a
        dropout; all its tensor operands channels-last); mark its result channels-last."""
        inputs = [a for a in node.all_input_nodes if a not in self.attrs and shape_of(a) is not None]
        on_last = [a for a in inputs if a in self.last]
        if not on_last:
            return
        if not follows or len(on_last) != len(inputs):
            raise self.refuse(node, "it reads a channels-last tensor (after permute(0, 2, 3, 1)); there edgecl "
                                    "follows LayerNorm, Linear, activations, dropout and element-wise sums and "
                                    "products, then permute(0, 3, 1, 2) back")
        self.last.add(node)

    # -- layers -----------------------------------------------------------------------------------------------------
    def layer_norm(self, node: fx.Node) -> None:
        """F.layer_norm over the channels: of a channels-last map, or of a feature vector (N, C)."""
        if node.target in GROUP_NORMS:
            return self.group_norm(node)
        args = self.bind(node, ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"))
        source, shape = args["input"], shape_of(args["input"])
        last = source in self.last
        normalized = args["normalized_shape"]
        if any(isinstance(d, fx.Node) for d in (normalized if isinstance(normalized, (list, tuple)) else
                                                [normalized])):  # computed in forward (x.shape[-1:]): the
            # weight's shape, which torch requires it to equal
            weight = self.attrs.get(args["weight"]) if isinstance(args["weight"], fx.Node) else None
            if weight is None:
                raise self.refuse(node, "a normalized_shape computed in forward without a weight; write it as "
                                        "numbers ((C,))")
            normalized = list(self.parameter(weight, node).shape)
        if shape is None or not (last and len(shape) in (2, 3) or len(shape) == 1) or \
                not isinstance(normalized, (list, tuple)) or list(normalized) != shape[-1:]:
            raise self.refuse(node, f"layer_norm over {normalized} of a tensor of shape {shape}; only "
                                    "over the channels: of a feature vector, or of a map put channels-last by "
                                    "permute(0, 2, 3, 1) (ConvNeXt's LayerNorm)")
        x, ch = self._input(source, node), shape[-1]
        fields: dict[str, Any] = {"ch": ch, "eps": float(args["eps"] if args["eps"] is not None else 1e-5)}
        self._emit(node, "layer_norm", [x], self._norm_path(node, args, ch, nn.LayerNorm, fields), **fields)
        if last:
            self.last.add(node)

    def group_norm(self, node: fx.Node) -> None:
        """F.group_norm of a channels-first (N, C, H, W) map: a ``layer_norm`` over the map with ``groups`` G."""
        args = self.bind(node, ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"))
        source, shape, groups = args["input"], shape_of(args["input"]), args["num_groups"]
        if source in self.last or shape is None or len(shape) != 3 or type(groups) is not int or groups < 1 or \
                shape[0] % groups:
            raise self.refuse(node, f"group_norm of {groups} groups of a tensor of shape {shape}; only a whole "
                                    "number of groups of a channels-first (N, C, H, W) map")
        ch = shape[0]
        fields: dict[str, Any] = {"ch": ch, "eps": float(args["eps"] if args["eps"] is not None else 1e-5),
                                  "over": "map", **({"groups": groups} if groups > 1 else {})}
        path = self._norm_path(node, args, ch, nn.GroupNorm, fields)
        self._emit(node, "layer_norm", [self._input(source, node)], path, **fields)

    def _norm_path(self, node: fx.Node, args: dict[str, Any], ch: int, kind: type, fields: dict[str, Any]) -> Any:
        """The norm's node name: its weight and bias's layer (claimed, each ``(ch,)``), else the `kind` module it
        runs in; sets ``affine`` (and ``bias`` false for a weight alone: MetaFormer v2's LayerNorm2dNoBias,
        GroupNorm1NoBias) in `fields`. Both, neither or the weight alone, the layer's own; a bias alone is refused."""
        weight, bias, label = args["weight"], args["bias"], kind.__name__
        if weight is None and bias is not None:
            raise self.refuse(node, f"a {label} with a bias but no weight is not supported")
        fields["affine"] = weight is not None
        if weight is not None and bias is None:
            fields["bias"] = False
        stack = list(node.meta.get("nn_module_stack") or [])  # the module it runs in (the traced copy lacks some)
        path = stack[-1] if stack and isinstance(self.module_at(stack[-1]), kind) else None
        if weight is None:
            return path
        paths = [self.attrs.get(t) for t in ((weight, bias) if bias is not None else (weight,))]
        if None in paths or not paths[0].endswith(".weight") or len(paths) > 1 and \
                (paths[0][:-len("weight")] != paths[1][:-len("bias")] or not paths[1].endswith(".bias")):
            raise self.refuse(node, f"its weight and bias must be a {label}'s own parameters (LAYER.weight, "
                                    "LAYER.bias; a bias-less one's LAYER.weight)")
        path = paths[0][:-len(".weight")]
        for p in paths:
            found = tuple(self.parameter(p, node).shape)
            if found != (ch,):
                raise self.refuse(node, f"{p!r} has shape {found}, not ({ch},)")
        self.claim(path, node)  # one call per set of weights (a norm without any may run twice)
        return path

    def global_response_norm(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """timm's GlobalResponseNorm (kept whole by the tracer): a ``grn`` node, on the layout it was built for."""
        last = node.args[0] in self.last
        if tuple(m.spatial_dim) != ((1, 2) if last else (2, 3)) or m.weight.shape != m.bias.shape:
            raise UsageError(f"{self.name}: GlobalResponseNorm at {path!r} {location(node)} is built for "
                             f"{'channels-first' if last else 'channels-last'} tensors and reads the other layout")
        self._emit(node, "grn", [x], path, ch=int(m.weight.numel()), eps=float(m.eps))

    def layer_scale(self, node: fx.Node, a: Any, b: Any) -> bool:
        """x · p with p a parameter holding one factor per channel of x (in any broadcastable shape): a layer_scale
        node. False when neither operand is a parameter."""
        if a in self.attrs:
            a, b = b, a
        if b not in self.attrs:
            return False
        path = self.attrs[b]
        p = self.parameter(path, node)
        ch = self.per_channel(node, a, b)
        if ch is None:
            raise self.refuse(node, f"a product with the parameter {path!r} of shape {tuple(p.shape)}; only one "
                                    "factor per channel (a layer scale) is supported")
        owner = self.module_at(path.rpartition(".")[0])
        if isinstance(owner, (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            raise UsageError(f"{self.name}: the parameter {path!r} of layer {type(owner).__name__} is used again in "
                             f"forward as a layer scale (shared weights) {location(node)}; edgecl needs one use per "
                             "weight")
        self.claim(path, node)
        self._emit(node, "layer_scale", [self._input(a, node)], path, **layer_scale_fields(p, ch))
        if a in self.last:
            self.last.add(node)
        return True


    def per_channel(self, node: fx.Node, x: Any, param: fx.Node) -> int | None:
        """The channels of `x` when the parameter `param` holds one number per channel of it, broadcast along its
        channel axis (the last of a channels-last value, else axis 1); None otherwise."""
        path = self.attrs[param]
        shape = shape_of(x)
        view = list(param.meta["tensor_meta"].shape) if "tensor_meta" in param.meta else None
        if shape is None or view is None:
            raise self.refuse(node, f"a product with the parameter {path!r}")
        full = [None, *shape]  # the batch axis
        axis = len(full) - 1 if x in self.last else 1
        aligned = [1] * (len(full) - len(view)) + view
        ch = full[axis]
        if len(view) > len(full) or any(d != (ch if i == axis else 1) for i, d in enumerate(aligned)) or \
                self.parameter(path, node).numel() != ch:
            return None
        return ch


def layer_scale_fields(p: torch.Tensor, ch: int) -> dict[str, Any]:
    """A ``layer_scale`` node's fields for the parameter `p` of `ch` factors: a fresh module's start where all are
    equal (ConvNeXt's 1e-6, kept for training), the module's shape where it is not (ch,)."""
    fields: dict[str, Any] = {"ch": ch}
    first = float(p.detach().reshape(-1)[0])
    if bool((p == first).all()) and first != 1.0:
        fields["init"] = first
    if list(p.shape) != [ch]:
        fields["module_shape"] = list(p.shape)
    return fields
