"""`from_torch`: a user's `torch.nn.Module` → an edgecl graph spec, by tracing it with torch.fx.

The tracer keeps torch's standard layers (and subclasses of them, such as timm's BatchNorm+activation) as leaves, so
every conv/linear/BatchNorm node is named by its module path and its tensors by the module's state-dict keys
(``layer1.0.conv1.weight``); the module's weights themselves are not part of the spec (`tensors_of` reads them). Shapes
come from running the traced graph once on zeros (`fx_shape_prop`, eval mode, no gradients, the module's state untouched).
Dropout and identity are dropped (identities at inference); view-like ops become ``flatten``/``reshape`` with the shape
they produced. Each family has its own mixin module (`_Converter`'s bases: calls, norms and channels-last maps,
tokens, attention, LeViT, Swin, TinyViT, MobileViT, MaxViT, EdgeNeXt, BlurPool, …); control flow on shapes is resolved
at the import shape by `fx_shape_flow`. The final classifier (an `nn.Linear`, a 1×1 conv on pooled features and a
flatten, or an average of such, as RepViT's) is left out by `fx_classifier`: every task gets its own head on the
features it reads. Anything else raises `UsageError` naming the op, the fx node, the module path and the user's
source line, never a trace."""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import fx, nn

from edgecl.arch.fx_activations import ACTIVATION_MODULES, module_activation, unknown_activation
from edgecl.arch.fx_affine import ADDCMUL
from edgecl.arch.fx_conv_transpose import conv_transpose_fields
from edgecl.arch.fx_calls import (POOL_PARAMETERS, WITH_INDICES, is_elementwise, is_library_identity, location, pair,
                                  shape_of)
from edgecl.arch.fx_norms import LAYER_NORMS, PERMUTES, is_view
from edgecl.arch.fx_padding import PAD_FUNCTIONS, PAD_MODULES, odd_same, pad_call, same_kind
from edgecl.arch.fx_shape_flow import ShapeFlowTracer, raised_at
from edgecl.arch.fx_shape_prop import built_for_hint, propagate_shapes
from edgecl.arch.fx_inplace import rewire_inplace
from edgecl.arch.fx_std_conv import is_std_conv, std_conv_fields
from edgecl.arch.fx_families import Families
from edgecl.arch.fx_volo import no_tensor_why
from edgecl.arch.fx_whole import ON_TOKENS, WHOLE, check_plain_call, check_unshared, shared_parameters
from edgecl.arch.fx_xcit import is_xcit_pos
from edgecl.arch.ops import TENSOR_OPS
from edgecl.arch.spec import INPUT, NAME, Arch, validate
from edgecl.errors import UsageError

_IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.Identity)
_POOL_MODULES = {nn.MaxPool2d: "max", nn.AvgPool2d: "avg", nn.AdaptiveAvgPool2d: "adaptive_avg",
                 nn.AdaptiveMaxPool2d: "adaptive_max"}
_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.Flatten, nn.Upsample, *_POOL_MODULES,
           *PAD_MODULES, *ACTIVATION_MODULES, *_IDENTITY_MODULES)
# shape arithmetic and the shape checks written with it (torch._assert(h == self.image_size, …)), which the trace
# already passed
_SCALAR_FUNCTIONS = (operator.getitem, getattr, torch.Tensor.size, operator.mul, operator.floordiv, operator.add,
                     operator.neg, operator.sub, operator.eq, operator.mod, torch._assert,
                     fx._symbolic_trace._assert_is_none)
_SCALAR_METHODS = ("size", "dim")


def _returned(result: Any) -> str:
    """What a forward returns instead of one tensor, as its author would name it: 'a tuple of 2 values', 'a dict
    with keys ['logits', 'aux']' (fx shows them as immutable_list/immutable_dict; a split's parts are one node)."""
    if isinstance(result, dict):
        return f"a dict with keys {list(result)[:8]}"
    if isinstance(result, fx.Node) and isinstance(result.meta.get("tensor_meta"), (tuple, list)):  # x.chunk(2, 1)
        result = tuple(result.meta["tensor_meta"])
    if isinstance(result, (tuple, list)):
        kind = "tuple" if isinstance(result, tuple) else "list"
        return f"a {kind} of {len(result)} value{'s' * (len(result) != 1)}"
    return "a constant" if not isinstance(result, fx.Node) else "a value that is not a tensor of the graph"


class _Tracer(ShapeFlowTracer):
    """Keeps standard layers and their subclasses (timm's BatchNormAct2d, …) as call_module nodes, records each
    node's Python stack so that a refusal can point at the user's source line, and resolves control flow on shapes
    at the import shape (`fx_shape_flow`)."""

    record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        _check_own_forward(m, qualname)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):  # traced into: F.layer_norm / F.group_norm (`fx_norms`)
            return False
        if any(kept(m) for kept, _ in WHOLE):  # converted from attributes: no forward or hook inside it runs
            return check_plain_call(m, qualname)
        leaf = isinstance(m, _LEAVES) or is_library_identity(m) or super().is_leaf_module(m, qualname)
        return check_plain_call(m, qualname) if leaf else False


# subclasses whose forward computes what the base class's does (timm's Linear only adds a TorchScript cast)
_SAME_FORWARD = {("timm.layers.linear", "Linear")}


def _check_own_forward(m: nn.Module, path: str) -> None:
    """A subclass of a layer edgecl converts by its attributes (conv, linear, pooling, padding, activation, upsampling,
    flatten) that overrides forward computes something else (weight standardisation, padding decided in forward): run
    as the base layer it would silently be another network, so it is refused by name — except the same-padded layers
    of `fx_padding` and timm's ScaledStdConv2d (`fx_std_conv`). (BatchNorm subclasses are judged by `_batchnorm`.)"""
    if same_kind(m) or is_std_conv(m):
        return
    for base in (nn.Conv2d, nn.Linear, *_POOL_MODULES, *PAD_MODULES, *ACTIVATION_MODULES, nn.Upsample, nn.Flatten):
        kind = type(m)
        if isinstance(m, base) and kind.forward is not base.forward and \
                (kind.__module__, kind.__name__) not in _SAME_FORWARD:
            raise UsageError(f"layer {kind.__name__} at {path!r} overrides {base.__name__}.forward "
                             f"({kind.__module__}), so it computes something else than a {base.__name__} with its "
                             f"tensors (weight standardisation, padding decided in forward, …); not supported")


def from_torch(module: nn.Module, input_shape: tuple[int, ...] | list[int], *, classifier: bool | None = None,
               name: str | None = None) -> Arch:
    """The edgecl spec of `module` for inputs of `input_shape` (without batch).

    classifier: None — detect and drop the final classifier (UsageError if the model does not end in one): an
    `nn.Linear`, a 1×1 convolution on pooled features then a flatten, or the average of two or more such classifiers
    that read the same tensor, each with an optional BatchNorm and dropout of its own (RepViT's and the distilled
    heads' ``(head(x) + head_dist(x)) / 2``); the spec's output is the tensor the classifier reads, and a BatchNorm
    that belongs to one averaged classifier is dropped with it (`fx_classifier`); True — the same, but required;
    False — the module is a trunk whose output (batch, features) feeds the heads."""
    if not isinstance(module, nn.Module):
        raise UsageError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    shape = [int(d) for d in input_shape]
    name = name or type(module).__name__
    if isinstance(module, _LEAVES):  # fx traces into its root: a bare layer becomes the one child of a Sequential
        module = nn.Sequential(module)
    try:
        graph = _Tracer(shape).trace(module, concrete_args=_concrete_defaults(module))
        rewire_inplace(graph, module)  # `x.mul_(g)`: later reads of x read the product (`fx_inplace`)
    except UsageError as exc:
        raise UsageError(f"{name}: {exc}{_built_for(exc, module, shape)}") from None
    except Exception as exc:  # torch.fx raises many types; the user needs the reason and the line, not the trace
        raise UsageError(f"cannot trace {type(module).__name__} with torch.fx at {raised_at(exc) or 'an unknown line'}"
                         f" ({type(exc).__name__}: {str(exc)[:300]})") from None
    traced = fx.GraphModule(module, graph)
    try:
        propagate_shapes(traced, shape)
    except UsageError as exc:
        raise UsageError(f"{exc}{_built_for(exc, module, shape)}") from None
    return _Converter(traced, module, shape, classifier, name).spec()


def _built_for(exc: UsageError, module: nn.Module, shape: list[int]) -> str:
    """`built_for_hint` where the model failed to run on the shape, else nothing."""
    return built_for_hint(module, shape) if str(exc).startswith("the model does not run on inputs") else ""


def _concrete_defaults(module: nn.Module) -> dict[str, Any] | None:
    """forward's arguments after the input that have defaults, at their defaults: timm's ``forward(x,
    attn_mask=None, is_causal=False)`` then traces the plain path instead of one with proxies for a mask."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty and
                p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return defaults or None


class _Converter(Families):

    def __init__(self, traced: fx.GraphModule, module: nn.Module, shape: list[int], classifier: bool | None,
                 name: str):
        self.traced, self.module, self.input_shape = traced, module, shape
        self.classifier, self.name = classifier, name
        self.modules = dict(traced.named_modules())
        self.shared = shared_parameters(module, {str(n.target) for n in traced.graph.nodes  # tied tensors
                                                 if n.op in ("call_module", "get_attr")})
        self.alias: dict[fx.Node, str] = {}  # fx node → the spec node holding its value
        self.parts: dict[fx.Node, tuple[str, int, list[tuple[int, int]]]] = {}  # splits, read by x[i]
        self.nodes: list[dict[str, Any]] = []
        self.used_names: set[str] = {INPUT}
        self.param_modules: set[str] = set()
        self.init_norms()
        self.init_shuffles()
        self.init_affines()
        self.init_attention()

    # -- the walk ---------------------------------------------------------------------------------------------------
    def spec(self) -> Arch:
        output = None
        for node in self.traced.graph.nodes:
            if node.op == "placeholder":
                if self.alias and node.args:  # a forward argument fixed at its default (`_concrete_defaults`)
                    continue
                if self.alias:
                    raise UsageError(f"{self.name}: forward takes more than one input ({node.name!r})")
                self.alias[node] = INPUT
            elif node.op == "output":
                output = node
            elif node.op == "get_attr":
                self.attribute(node)
            elif self.attention_step(node) or self.tnt_step(node) or self.mvit_step(node) or \
                    self.efficientvim_step(node):
                pass
            elif shape_of(node) is None:
                if not self.split(node):
                    self._scalar(node)
            else:
                self._convert(node)
        features = self._features(output)
        return validate({"name": self.name, "input_shape": self.input_shape, "nodes": self._live(features),
                         "output": features})

    def _features(self, output: fx.Node) -> str:
        """Drop the final classifier; the name of the node whose output feeds edgecl's heads."""
        result = output.args[0]
        self.refuse_grouped_output(result)
        if not isinstance(result, fx.Node) or result not in self.alias:
            raise UsageError(f"{self.name}: forward must return one tensor, the logits (or with classifier=False / "
                             f"--no-classifier the features), but returns {_returned(result)}; return that tensor "
                             "alone, e.g. from a wrapper module whose forward returns net(x)[0] or net(x)['logits']")
        if result in self.last:
            raise UsageError(f"{self.name}: forward returns a channels-last tensor (after permute(0, 2, 3, 1)); "
                             "permute it back with permute(0, 3, 1, 2)")
        if self.classifier is False:
            if self.alias[result] == INPUT:
                raise UsageError(f"{self.name}: the trunk computes nothing (it returns its input)")
            return self.alias[result]
        return self.drop_classifier(result)

    def _live(self, features: str) -> list[dict[str, Any]]:
        """The nodes the features depend on (an auxiliary branch or the classifier's leftovers are dropped)."""
        needed, live = {features}, []
        for node in reversed(self.nodes):
            if node["name"] in needed:
                live.append(node)
                needed.update(node["inputs"])
        return live[::-1]

    def _node_named(self, name: str) -> dict[str, Any] | None:
        return next((n for n in self.nodes if n["name"] == name), None)

    # -- one fx node ------------------------------------------------------------------------------------------------
    def _scalar(self, node: fx.Node) -> None:
        """Sizes and shape arithmetic feed view/reshape, whose output shape is taken from the trace instead."""
        if node.op == "call_method" and node.target in _SCALAR_METHODS:
            return
        if node.op == "call_function" and node.target in _SCALAR_FUNCTIONS:
            return
        raise self.refuse(node, "return_indices=True is not supported" if node.target in WITH_INDICES else
                          no_tensor_why(node))

    def _convert(self, node: fx.Node) -> None:
        if self.param_embed_step(node):  # a position embedding resized or tiled from parameters (`fx_param_embed`)
            return
        if self.reads_grouped(node):  # inside a channel shuffle
            self.shuffle_step(node)
        elif self.token_axis_step(node) or node.op != "call_module" and (self.stack_mean_step(node) or
                                                                           self.tokens_step(node)):  # (B, C, T): Mixer
            pass
        elif node.op == "call_module":
            m = self.modules[node.target]
            self.check_layout(node, isinstance(m, (nn.Linear, *ACTIVATION_MODULES, *_IDENTITY_MODULES)) or
                              is_library_identity(m) or any(kept(m) for kept in ON_TOKENS))
            self._module(node, m)
        elif node.target in PERMUTES:
            self.permute(node)
        elif node.target in LAYER_NORMS:
            self.layer_norm(node)
        elif node.target in ADDCMUL:  # ResMLP's Affine (`fx_affine`)
            self.channel_affine(node)
        elif node.target in PAD_FUNCTIONS:
            self.explicit_pad(node, self.bind(node, ("input", "pad", "mode", "value")))
        elif node.args and node.args[0] in self.attrs and is_view(node.target):  # gamma.reshape(1, -1, 1, 1)
            self.parameter_view(node)
        else:
            self.check_layout(node, is_elementwise(node.target) or node.target is torch.cat)  # cat: channels-last
            self.call(node)

    def view(self, node: fx.Node, x: str) -> None:
        """As `_CallConverter.view`, and a map viewed as (groups, channels per group, h, w): a shuffle begins."""
        if not self.group_channels(node, x):
            super().view(node, x)

    def arithmetic(self, node: fx.Node, kind: str, a: Any, b: Any) -> None:
        """As `_CallConverter.arithmetic`, and x · parameter: a scalar affine with the sum after it (`fx_affine`) or
        a layer scale (`fx_norms`); x + parameter over tokens: a position embedding (`fx_tokens`)."""
        if self.affine_sum(node):
            return
        if kind == "add" and self.position_embedding(node, a, b):
            return
        if kind != "mul" or not (self.scalar_affine(node, a, b) or self.layer_scale(node, a, b)):
            super().arithmetic(node, kind, a, b)

    def _input(self, arg: Any, node: fx.Node) -> str:
        if isinstance(arg, fx.Node) and arg in self.alias:
            return self.alias[arg]
        if isinstance(arg, fx.Node) and arg in self.attrs:
            raise self.parameter_used(node, self.attrs[arg])
        raise self.refuse(node, f"its operand {str(arg)[:80]!r} is not a tensor computed from the input (a constant "
                                "tensor or a value computed in forward)")

    def _emit(self, node: fx.Node, op: str, inputs: list[str], name: str | None = None, **fields: Any) -> str:
        wanted = name
        name = self._unique(name or node.name)
        if wanted is not None and op in TENSOR_OPS and name != wanted:
            # its tensors' keys in the module's state dict (`module_state.state_keys`), unless the caller named them
            fields.setdefault("module", wanted)
        self.nodes.append({"name": name, "op": op, "inputs": inputs, **fields})
        self.alias[node] = name
        return name

    def _unique(self, name: str) -> str:
        base = name if NAME.fullmatch(name) and not name.startswith("head") else f"n_{name}"
        base = base.replace("..", ".")
        candidate, i = base, 1
        while candidate in self.used_names:
            i += 1
            candidate = f"{base}_{i}"
        self.used_names.add(candidate)
        return candidate

    # -- modules ----------------------------------------------------------------------------------------------------
    def _module(self, node: fx.Node, m: nn.Module) -> None:
        path = str(node.target)
        if is_xcit_pos(m):  # called with sizes, not a tensor
            self.xcit_pos(node, m, path)
            return
        x = self._input(node.args[0], node)
        if isinstance(m, _IDENTITY_MODULES) or is_library_identity(m):  # identities at inference
            self.alias[node] = x
            return
        whole = next((method for kept, method in WHOLE if kept(m)), None)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)) or \
                whole and next(m.parameters(), None) is not None:
            self.one_call(path, node)
        check_unshared(self.name, m, path, self.shared)  # a leaf's tensors: named by its path
        if same_kind(m):
            self.same_padded(node, m, x, path)
        elif odd_same(m):
            self.asymmetric_same(node, m, x, path)
        elif isinstance(m, nn.Conv2d):
            self._emit(node, "conv", [x], path, **self._conv_fields(node, m, path))
        elif type(m) is nn.ConvTranspose2d:
            self._emit(node, "conv_transpose", [x], path, **conv_transpose_fields(self.name, node, m, path))
        elif isinstance(m, nn.Linear) and node in self.last:  # over the channels of a channels-last map: a 1×1 conv
            self._emit(node, "conv", [x], path, **{"in": m.in_features, "out": m.out_features, "k": [1, 1],
                                                   "groups": 1, "bias": m.bias is not None,
                                                   "module_shape": [m.out_features, m.in_features]})
        elif isinstance(m, nn.Linear):
            shape = shape_of(node.args[0])
            if shape is not None and len(shape) != 1:  # a Linear over the tokens (MLP-Mixer) or a map's last axis
                raise self.refuse(node, f"an nn.Linear over the last axis of a tensor of shape {shape}; edgecl "
                                        "supports it on features and over the channels of tokens or of a "
                                        "channels-last map")
            self._emit(node, "linear", [x], path, **{"in": m.in_features, "out": m.out_features,
                                                     "bias": m.bias is not None})
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self._batchnorm(node, m, x, path)
        elif isinstance(m, tuple(ACTIVATION_MODULES)):
            self._activation(node, m, x)
        elif isinstance(m, tuple(_POOL_MODULES)):
            kind = next(v for k, v in _POOL_MODULES.items() if isinstance(m, k))
            self.pool(node, node.args[0], kind, {p: getattr(m, p) for p in POOL_PARAMETERS[kind][1:]})
        elif isinstance(m, nn.Flatten):
            self.view(node, x)
        elif isinstance(m, tuple(PAD_MODULES)):
            self.explicit_pad(node, pad_call(m, node))
        elif isinstance(m, nn.Upsample):  # nn.UpsamplingNearest2d and nn.UpsamplingBilinear2d too
            self.upsample(node, x, m.mode, m.align_corners, m.scale_factor, m.recompute_scale_factor)
        elif whole:
            getattr(self, whole)(node, m, x, path)
        else:
            raise UsageError(f"{self.name}: unsupported layer {type(m).__name__} at {path!r} {location(node)}")

    def one_call(self, path: str, node: fx.Node) -> None:
        """A layer with weights is called once: a second call would make one weight two in the spec."""
        if path in self.param_modules:
            raise UsageError(f"{self.name}: module {path!r} is called twice (shared weights) {location(node)}; "
                             "edgecl needs one call per layer")
        self.param_modules.add(path)

    def _batchnorm(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        if not (m.affine and m.track_running_stats):
            raise UsageError(f"{self.name}: BatchNorm at {path!r} {location(node)} needs affine=True and "
                             "track_running_stats=True")
        act = getattr(m, "act", None) if type(m) not in (nn.BatchNorm2d, nn.BatchNorm1d) else None
        drop = getattr(m, "drop", None) if act is not None else None
        if type(m) not in (nn.BatchNorm2d, nn.BatchNorm1d) and (act is None or not (
                drop is None or isinstance(drop, _IDENTITY_MODULES))):
            raise UsageError(f"{self.name}: BatchNorm subclass {type(m).__name__} at {path!r} {location(node)} is "
                             "not supported (known: a BatchNorm followed by `.act`, as timm's BatchNormAct2d)")
        out = self._emit(node, "bn", [x], path, ch=m.num_features, eps=float(m.eps),
                         momentum=0.1 if m.momentum is None else float(m.momentum))
        if act is not None and not isinstance(act, _IDENTITY_MODULES):  # timm's GELU, Swish, … too
            if module_activation(act) is None:
                raise UsageError(f"{self.name}: {unknown_activation(act, f'{path}.act')} {location(node)}")
            self._activation(node, act, out, f"{path}.act")

    def _conv_fields(self, node: fx.Node, m: nn.Conv2d, path: str, pad: list[int] | None = None) -> dict[str, Any]:
        """The conv node's fields of `m`; `pad` replaces its own padding where the converter padded first."""
        if m.padding_mode != "zeros":
            raise UsageError(f"{self.name}: conv {path!r} {location(node)}: padding_mode={m.padding_mode!r} is not "
                             "supported (zeros only)")
        k, dilation = pair(m.kernel_size), pair(m.dilation)
        pad = m.padding if pad is None else pad
        if pad == "valid":
            pad = [0, 0]
        elif pad == "same":
            total = [d * (kk - 1) for d, kk in zip(dilation, k)]
            if any(t % 2 for t in total):
                raise UsageError(f"{self.name}: conv {path!r} {location(node)}: padding='same' is asymmetric "
                                 f"for kernel {k}; not supported")
            pad = [t // 2 for t in total]
        return {"in": m.in_channels, "out": m.out_channels, "k": k, "stride": pair(m.stride), "pad": pair(pad),
                "dilation": dilation, "groups": m.groups, "bias": m.bias is not None, **std_conv_fields(m)}

    def _activation(self, node: fx.Node, m: nn.Module, x: str, name: str | None = None) -> None:
        op, fields = module_activation(m)
        self._emit(node, op, [x], name, **fields)


def tensors_of(module: nn.Module, arch: Arch) -> dict[str, Any]:
    """The module's own values of the spec's trunk tensors (state-dict keys), as float32 numpy arrays: a trained or
    pretrained network's weights as a starting point, and what `from_torch`'s parity check runs."""
    from edgecl.arch.bias_parts import gather
    from edgecl.arch.module_state import from_module, state_keys, state_shapes
    from edgecl.arch.module_values import module_values
    from edgecl.arch.spec import param_shapes

    state, keys, stored = gather(arch, module_values(module, arch)), state_keys(arch), state_shapes(arch)
    out = {}
    for name in param_shapes(arch):
        key = keys[name]
        if key not in state or tuple(state[key].shape) != stored[name]:
            raise UsageError(f"tensor {key!r}: not in the module's state dict with shape {stored[name]}")
        value = state[key]  # a tensor, or a bias put together from its parts (`bias_parts`)
        array = value.detach().cpu().to(torch.float32).numpy() if hasattr(value, "detach") else value
        out[name] = from_module(arch, name, array).copy()
    return out
