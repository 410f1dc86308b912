"""`from_torch`: a user's `torch.nn.Module` → an edgecl graph spec, by tracing it with torch.fx.

The tracer keeps torch's standard layers (and subclasses of them, such as timm's BatchNorm+activation) as leaves, so
every conv/linear/BatchNorm node is named by its module path and its tensors by the module's state-dict keys
(``layer1.0.conv1.weight``). Shapes come from running the traced graph once on zeros (`ShapeProp`, eval mode, no
gradients, the module's own state untouched). Dropout and identity are dropped (identities at inference); view-like
ops (view, reshape, flatten, squeeze, …) become ``flatten``/``reshape`` with the shape they actually produced. The
model's final `nn.Linear` classifier is detected and left out: edgecl gives every task its own head on the features
it reads. Anything else raises `UsageError` naming the op and the module path, never a trace from inside torch.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgecl.arch.spec import INPUT, NAME, Arch, validate
from edgecl.errors import UsageError

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                       nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.GELU: "gelu", nn.Tanh: "tanh"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                         F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                         F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh"}
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.Identity)
_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
           nn.Flatten, *_ACTIVATION_MODULES, *_IDENTITY_MODULES)
_VIEWS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "expand_as")
_SCALAR_FUNCTIONS = (operator.getitem, getattr, torch.Tensor.size)
_SCALAR_METHODS = ("size", "dim")


class _Tracer(fx.Tracer):
    """Keeps standard layers and their subclasses (timm's BatchNormAct2d, …) as call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def from_torch(module: nn.Module, input_shape: tuple[int, ...] | list[int], *, classifier: bool | None = None,
               name: str | None = None) -> Arch:
    """The edgecl spec of `module` for inputs of `input_shape` (without batch).

    classifier: None — detect and drop a final `nn.Linear` (UsageError if the model does not end in one);
    True — the same, but required; False — the module is a trunk whose output (batch, features) feeds the heads."""
    if not isinstance(module, nn.Module):
        raise UsageError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    shape = [int(d) for d in input_shape]
    if isinstance(module, _LEAVES):  # fx traces into its root: a bare layer becomes the one child of a Sequential
        module = nn.Sequential(module)
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # torch.fx raises many types; the user needs the reason, not the trace
        raise UsageError(f"cannot trace {type(module).__name__} with torch.fx ({type(exc).__name__}: "
                         f"{str(exc)[:300]}); edgecl needs a forward without data-dependent Python control flow"
                         ) from None
    traced = fx.GraphModule(module, graph)
    _propagate_shapes(traced, shape)
    return _Converter(traced, module, shape, classifier, name or type(module).__name__).spec()


def _propagate_shapes(traced: fx.GraphModule, shape: list[int]) -> None:
    was_training = traced.training
    traced.eval()
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(torch.zeros(2, *shape))
    except Exception as exc:
        raise UsageError(f"the model does not run on inputs of shape {tuple(shape)} ({type(exc).__name__}: "
                         f"{str(exc)[:300]})") from None
    finally:
        traced.train(was_training)


def _shape_of(node: fx.Node) -> list[int] | None:
    meta = node.meta.get("tensor_meta")
    return list(meta.shape)[1:] if meta is not None and hasattr(meta, "shape") else None


class _Converter:
    def __init__(self, traced: fx.GraphModule, module: nn.Module, shape: list[int], classifier: bool | None,
                 name: str):
        self.traced, self.module, self.input_shape = traced, module, shape
        self.classifier, self.name = classifier, name
        self.modules = dict(traced.named_modules())
        self.alias: dict[fx.Node, str] = {}  # fx node → the spec node holding its value
        self.nodes: list[dict[str, Any]] = []
        self.used_names: set[str] = {INPUT}
        self.param_modules: set[str] = set()

    # -- the walk ---------------------------------------------------------------------------------------------------
    def spec(self) -> Arch:
        output = None
        for node in self.traced.graph.nodes:
            if node.op == "placeholder":
                if self.alias:
                    raise UsageError(f"{self.name}: forward takes more than one input ({node.name!r})")
                self.alias[node] = INPUT
            elif node.op == "output":
                output = node
            elif node.op == "get_attr":
                raise UsageError(f"{self.name}: tensor attribute {node.target!r} is used directly in forward; edgecl "
                                 "supports parameters only inside standard layers (Conv2d, Linear, BatchNorm)")
            elif _shape_of(node) is None:
                self._scalar(node)
            else:
                self._convert(node)
        features = self._features(output)
        return validate({"name": self.name, "input_shape": self.input_shape, "nodes": self._live(features),
                         "output": features})

    def _features(self, output: fx.Node) -> str:
        """Drop the final classifier; the name of the node whose output feeds edgecl's heads."""
        result = output.args[0]
        if not isinstance(result, fx.Node) or result not in self.alias:
            raise UsageError(f"{self.name}: forward must return one tensor, returns {type(result).__name__}")
        last = self._node_named(self.alias[result])
        ends_in_linear = last is not None and last["op"] == "linear"
        if self.classifier is False:
            return self.alias[result]
        if not ends_in_linear:
            what = "the input" if last is None else f"{last['op']} ({last['name']})"
            raise UsageError(f"{self.name}: the model's last operation is {what}, not an nn.Linear classifier. Pass "
                             "the trunk instead: a module returning (batch, features), with from_torch(trunk, "
                             "input_shape, classifier=False) (CLI: --arch module:factory --no-classifier)")
        self.nodes.remove(last)
        return last["inputs"][0]

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
        if node.op == "call_function" and (node.target in _SCALAR_FUNCTIONS or node.target in
                                           (operator.mul, operator.floordiv, operator.add, operator.sub)):
            return
        raise UsageError(f"{self.name}: unsupported op {_describe(node)} (it returns no tensor)")

    def _convert(self, node: fx.Node) -> None:
        args = [a for a in node.args]
        if node.op == "call_module":
            self._module(node, self.modules[node.target])
        elif node.op == "call_function":
            self._function(node, node.target, args)
        elif node.op == "call_method":
            self._method(node, node.target, args)
        else:
            raise UsageError(f"{self.name}: unsupported op {_describe(node)}")

    def _input(self, arg: Any, node: fx.Node) -> str:
        if isinstance(arg, fx.Node) and arg in self.alias:
            return self.alias[arg]
        raise UsageError(f"{self.name}: {_describe(node)} takes a constant or unsupported argument "
                         f"{str(arg)[:80]!r}; edgecl supports tensor operands only")

    def _emit(self, node: fx.Node, op: str, inputs: list[str], name: str | None = None, **fields: Any) -> str:
        name = self._unique(name or node.name)
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
        x = self._input(node.args[0], node)
        path = str(node.target)
        if isinstance(m, _IDENTITY_MODULES):
            self.alias[node] = x
            return
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
            if path in self.param_modules:
                raise UsageError(f"{self.name}: module {path!r} is called twice (shared weights); edgecl needs one "
                                 "call per layer")
            self.param_modules.add(path)
        if isinstance(m, nn.Conv2d):
            self._emit(node, "conv", [x], path, **_conv_fields(m, path))
        elif isinstance(m, nn.Linear):
            self._emit(node, "linear", [x], path, **{"in": m.in_features, "out": m.out_features,
                                                     "bias": m.bias is not None})
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self._batchnorm(node, m, x, path)
        elif isinstance(m, tuple(_ACTIVATION_MODULES)):
            self._activation(node, m, x)
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise UsageError(f"{self.name}: {path!r} MaxPool2d(return_indices=True) is not supported")
            self._emit(node, "maxpool", [x], k=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                       pad=_pair(m.padding), dilation=_pair(m.dilation), ceil_mode=bool(m.ceil_mode))
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                raise UsageError(f"{self.name}: {path!r} AvgPool2d(divisor_override=...) is not supported")
            self._emit(node, "avgpool", [x], k=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                       pad=_pair(m.padding), ceil_mode=bool(m.ceil_mode), count_include_pad=bool(m.count_include_pad))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self._adaptive(node, x, m.output_size, path)
        elif isinstance(m, nn.Flatten):
            self._view(node, x)
        else:
            raise UsageError(f"{self.name}: unsupported layer {type(m).__name__} at {path!r}")

    def _batchnorm(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        if not (m.affine and m.track_running_stats):
            raise UsageError(f"{self.name}: BatchNorm at {path!r} needs affine=True and track_running_stats=True")
        act = getattr(m, "act", None) if type(m) not in (nn.BatchNorm2d, nn.BatchNorm1d) else None
        drop = getattr(m, "drop", None) if act is not None else None
        if type(m) not in (nn.BatchNorm2d, nn.BatchNorm1d) and (act is None or not (
                drop is None or isinstance(drop, _IDENTITY_MODULES))):
            raise UsageError(f"{self.name}: BatchNorm subclass {type(m).__name__} at {path!r} is not supported "
                             "(known: a BatchNorm followed by `.act`, as timm's BatchNormAct2d)")
        out = self._emit(node, "bn", [x], path, ch=m.num_features, eps=float(m.eps),
                         momentum=0.1 if m.momentum is None else float(m.momentum))
        if act is not None and not isinstance(act, _IDENTITY_MODULES):
            if not isinstance(act, tuple(_ACTIVATION_MODULES)):
                raise UsageError(f"{self.name}: activation {type(act).__name__} at {path}.act is not supported")
            self._activation(node, act, out, f"{path}.act")

    def _activation(self, node: fx.Node, m: nn.Module, x: str, name: str | None = None) -> None:
        op = next(v for k, v in _ACTIVATION_MODULES.items() if isinstance(m, k))
        self._emit(node, op, [x], name, **({"approximate": m.approximate} if op == "gelu" else {}))

    def _adaptive(self, node: fx.Node, x: str, output_size: Any, where: str) -> None:
        size = _pair(output_size)
        shape = _shape_of(node.args[0])
        if size == [1, 1]:
            self._emit(node, "gap", [x])
            return
        if None in size or shape is None or shape[1] % size[0] or shape[2] % size[1]:
            raise UsageError(f"{self.name}: adaptive average pooling to {output_size} at {where!r} is supported "
                             f"only where it is a plain average pool (input {shape})")
        k = [shape[1] // size[0], shape[2] // size[1]]
        self._emit(node, "avgpool", [x], k=k, stride=k, pad=[0, 0], ceil_mode=False, count_include_pad=True)

    # -- functions and methods --------------------------------------------------------------------------------------
    def _function(self, node: fx.Node, fn: Any, args: list[Any]) -> None:
        if fn in _ACTIVATION_FUNCTIONS:
            extra = {"approximate": node.kwargs.get("approximate", "none")} if _ACTIVATION_FUNCTIONS[fn] == "gelu" \
                else {}
            self._emit(node, _ACTIVATION_FUNCTIONS[fn], [self._input(args[0], node)], **extra)
        elif fn in (operator.add, operator.iadd, torch.add):
            if node.kwargs.get("alpha", 1) != 1:
                raise UsageError(f"{self.name}: {_describe(node)} with alpha is not supported")
            self._emit(node, "add", [self._input(a, node) for a in args[:2]])
        elif fn in (operator.mul, operator.imul, torch.mul):
            self._emit(node, "mul", [self._input(a, node) for a in args[:2]])
        elif fn is torch.cat and len(args[0]) == 1:  # DenseNet concatenates a list of one
            self.alias[node] = self._input(args[0][0], node)
        elif fn is torch.cat:
            dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim not in (1, -3) or len(_shape_of(node)) != 3:
                raise UsageError(f"{self.name}: {_describe(node)} concatenates along dim {dim}; only channels (1)")
            self._emit(node, "cat", [self._input(a, node) for a in args[0]])
        elif fn in (F.dropout, F.dropout2d):
            self.alias[node] = self._input(args[0], node)
        elif fn is F.adaptive_avg_pool2d:
            self._adaptive(node, self._input(args[0], node), node.kwargs.get("output_size", args[1]), node.name)
        elif fn is torch.flatten:
            self._view(node, self._input(args[0], node))
        elif fn in (torch.mean,):
            self._mean(node, self._input(args[0], node))
        elif fn in (torch.reshape,):
            self._view(node, self._input(args[0], node))
        else:
            raise UsageError(f"{self.name}: unsupported op {_describe(node)}")

    def _method(self, node: fx.Node, method: str, args: list[Any]) -> None:
        x = self._input(args[0], node)
        if method in _ACTIVATION_METHODS:
            self._emit(node, _ACTIVATION_METHODS[method], [x])
        elif method in ("add", "add_"):
            self._emit(node, "add", [x, self._input(args[1], node)])
        elif method in ("mul", "mul_"):
            self._emit(node, "mul", [x, self._input(args[1], node)])
        elif method in _VIEWS:
            self._view(node, x)
        elif method == "mean":
            self._mean(node, x)
        else:
            raise UsageError(f"{self.name}: unsupported op {_describe(node)}")

    def _view(self, node: fx.Node, x: str) -> None:
        """A view-like op: nothing when the shape is unchanged (expand_as for a broadcast, contiguous), a flatten to
        one axis, or a reshape to the shape the trace saw."""
        before, after = _shape_of(node.args[0]), _shape_of(node)
        if math.prod(before) != math.prod(after):
            if node.target == "expand_as":
                self.alias[node] = x  # the mul that follows broadcasts
                return
            raise UsageError(f"{self.name}: {_describe(node)} changes the batch size or the number of elements")
        if before == after:
            self.alias[node] = x
        elif len(after) == 1:
            self._emit(node, "flatten", [x])
        else:
            self._emit(node, "reshape", [x], shape=after)

    def _mean(self, node: fx.Node, x: str) -> None:
        """A mean over the two spatial axes (timm's squeeze-and-excitation) is global average pooling."""
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        before = _shape_of(node.args[0])
        if before is None or len(before) != 3 or sorted(d % 4 for d in dims) != [2, 3]:
            raise UsageError(f"{self.name}: {_describe(node)} is a mean over dims {dims}; only the spatial mean is "
                             "supported")
        if _shape_of(node) == [before[0], 1, 1]:
            self._emit(node, "gap", [x])
            return
        pooled = self._emit(node, "gap", [x], f"{node.name}.pool")
        self._emit(node, "flatten", [pooled])


def _conv_fields(m: nn.Conv2d, path: str) -> dict[str, Any]:
    if m.padding_mode != "zeros":
        raise UsageError(f"conv {path!r}: padding_mode={m.padding_mode!r} is not supported (zeros only)")
    k, dilation = _pair(m.kernel_size), _pair(m.dilation)
    pad = m.padding
    if pad == "valid":
        pad = [0, 0]
    elif pad == "same":
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        if any(t % 2 for t in total):
            raise UsageError(f"conv {path!r}: padding='same' is asymmetric for kernel {k}; not supported")
        pad = [t // 2 for t in total]
    return {"in": m.in_channels, "out": m.out_channels, "k": k, "stride": _pair(m.stride), "pad": _pair(pad),
            "dilation": dilation, "groups": m.groups, "bias": m.bias is not None}


def _pair(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [int(v) if v is not None else None for v in value]
    return [int(value), int(value)]


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = node.meta.get("nn_module_stack")
    path = list(where)[-1] if where else None
    return f"{target!r} ({node.op} {node.name}{f' in {path}' if path else ''})"


def tensors_of(module: nn.Module, arch: Arch) -> dict[str, Any]:
    """The module's own values of the spec's trunk tensors (state-dict keys), as float32 numpy arrays: a trained or
    pretrained network's weights as a starting point, and what `from_torch`'s parity check runs."""
    from edgecl.arch.spec import param_shapes

    state = module.state_dict()
    out = {}
    for name, shape in param_shapes(arch).items():
        if name not in state or tuple(state[name].shape) != shape:
            raise UsageError(f"tensor {name!r}: not in the module's state dict with shape {shape}")
        out[name] = state[name].detach().cpu().to(torch.float32).numpy().copy()
    return out
