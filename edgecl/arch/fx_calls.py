"""The `call_function` / `call_method` half of `from_torch`: torch functions and tensor methods → spec nodes.

Arguments are bound by name as torch binds them (`bind`), so a call written positionally or with keywords gives the
same node, and an argument edgecl would ignore (``out=``, ``alpha=``, ``return_indices=True``) is refused instead.
Pooling has one converter for the module and the functional form (`_CallConverter.pool`), so `nn.MaxPool2d(2)` and
`F.max_pool2d(x, 2)` cannot drift apart. Every refusal names the op, the fx node, the module path and the source line
(`describe`), as the README promises.
"""
from __future__ import annotations

import math
import operator
import os
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from edgecl.arch.ops import MAX_ADAPTIVE, MAX_ADAPTIVE_INPUT
from edgecl.errors import UsageError

ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                        F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                        F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh"}
_ACTIVATIONS = {**ACTIVATION_FUNCTIONS, "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
_LEAKY = (F.leaky_relu, F.leaky_relu_)
# x², a spec ``square``: torch.square, and a power whose exponent is the number 2 (StarReLU's ``relu(x) ** 2``)
_SQUARES = (torch.square, "square", "square_")
_POWERS = (operator.pow, operator.ipow, torch.pow, "pow", "pow_")  # in place too (`fx_inplace` rewires readers)
# arithmetic: x + y and x * y of two tensors, and x (+ - * /) c or c (+ - *) x with a Python number c
_ARITHMETIC = {operator.add: "add", operator.iadd: "add", torch.add: "add",
                         operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
                         operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
                         operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
                         torch.true_divide: "div", "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
                         "subtract": "sub", "mul": "mul", "mul_": "mul", "multiply": "mul", "div": "div", "div_": "div",
                         "true_divide": "div"}
_NEGATIONS = (operator.neg, torch.neg, torch.negative, "neg", "neg_", "negative")
# pooling, functional forms: kind and torch's parameter order (the module forms have these names as attributes)
POOL_PARAMETERS = {
    "max": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "adaptive_avg": ("input", "output_size"),
    "adaptive_max": ("input", "output_size", "return_indices"),
}
_POOL_FUNCTIONS = {F.max_pool2d: "max", torch.max_pool2d: "max", F.avg_pool2d: "avg",
                   F.adaptive_avg_pool2d: "adaptive_avg", F.adaptive_max_pool2d: "adaptive_max"}
WITH_INDICES = (F.max_pool2d_with_indices, F.adaptive_max_pool2d_with_indices)  # what return_indices=True calls
_SOFTMAX = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax")
_REDUCTIONS = {torch.mean: "mean", "mean": "mean", torch.amax: "amax", "amax": "amax"}
_DROPOUTS = (F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, "contiguous")
# regularisers of the vision libraries that are the identity at inference, known by where they are defined (neither
# library is imported for this): torchvision's stochastic depth, timm's drop path and drop block
LIBRARY_IDENTITIES = {("torchvision.ops.stochastic_depth", "StochasticDepth"),
                      ("torchvision.ops.stochastic_depth", "stochastic_depth"), ("timm.layers.drop", "DropPath"),
                      ("timm.layers.drop", "drop_path"), ("timm.layers.drop", "DropBlock2d")}


def is_library_identity(obj: Any) -> bool:
    """A function or module class of `LIBRARY_IDENTITIES` (an instance is judged by its class)."""
    kind = obj if isinstance(obj, type) or callable(obj) and not hasattr(obj, "forward") else type(obj)
    return (getattr(kind, "__module__", None), getattr(kind, "__name__", None)) in LIBRARY_IDENTITIES


VIEWS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "expand_as", torch.flatten, torch.reshape,
         torch.squeeze, torch.unsqueeze)
_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
             "count_include_pad": True, "divisor_override": None, "alpha": 1, "rounding_mode": None, "dim": None,
             "keepdim": False, "dtype": None, "_stacklevel": 3, "negative_slope": 0.01}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n[ \t]*([^\n]*)')


def arithmetic_kind(node: fx.Node) -> str | None:
    """``add``, ``sub``, ``mul`` or ``div`` for an fx node that calls arithmetic (``x + y``, ``torch.add``,
    ``x.add(y)``), None for any other."""
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return _ARITHMETIC.get(node.target)
    except TypeError:  # an unhashable target
        return None


def is_elementwise(target: Any) -> bool:
    """An activation, arithmetic, a negation or a dropout: ops that act on each value alone, in any layout."""
    return target in _ACTIVATIONS or target in _LEAKY or target in _ARITHMETIC or target in _NEGATIONS or \
        target in _SQUARES or target in _POWERS or target in _DROPOUTS or is_library_identity(target)


def shape_of(node: Any) -> list[int] | None:
    """The traced output shape of an fx node, without batch (None for a non-tensor value)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return list(meta.shape)[1:] if meta is not None and hasattr(meta, "shape") else None


def map_shape(node: fx.Node, model: str, where: str) -> list[int]:
    """The (channels, height, width) shape of the map a module kept whole reads (its first argument), or the
    UsageError naming the model and the module (`where`: its class, path and source line)."""
    shape = shape_of(node.args[0])
    if shape is None or len(shape) != 3:
        raise UsageError(f"{model}: {where} needs a (channels, height, width) map, gets {shape}")
    return shape


def pair(value: Any) -> list[Any]:
    """An int or a pair (torch's `_pair`) as a two-element list; None entries are kept (adaptive output sizes)."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return pair(value[0])
        return [int(v) if v is not None else None for v in value]
    return [int(value), int(value)]


def pair_floats(value: Any) -> list[float]:
    """A number or a sequence of two (one is taken for both) as two floats: an upsampling's scale_factor."""
    values = list(value) if isinstance(value, (tuple, list)) else [value, value]
    return [float(v) for v in (values * 2 if len(values) == 1 else values)]


def describe(node: fx.Node) -> str:
    """'op' (fx node, module path, user source line): where to look in the user's code."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target!r} {location(node)}"


def location(node: fx.Node) -> str:
    """(fx op and node name, the module path it runs in, the user's source line where fx recorded one)."""
    stack = node.meta.get("nn_module_stack")
    path = list(stack)[-1] if stack and node.op != "call_module" else None  # a module's target is its path
    source = source_line(node)
    return f"({node.op} {node.name}{f' in {path}' if path else ''}{f', at {source}' if source else ''})"


def source_line(node: fx.Node) -> str | None:
    """The innermost frame of the user's code in the node's recorded stack (`File:line: code`), torch's own frames
    (the tracer, nn.Module's call machinery, functional wrappers) skipped."""
    frames = [m for m in _FRAME.finditer(node.stack_trace or "") if not m.group(1).startswith(_TORCH_DIR)]
    if not frames:
        return None
    path, line, code = frames[-1].groups()
    return f"{path}:{line}: {code.strip()[:120]}"


class _CallConverter:
    """Mixin of `fx_import._Converter`: the converters of function and method calls and of pooling."""

    name: str
    classifier: bool | None
    alias: dict[fx.Node, str]
    last: set[fx.Node]
    parts: dict[fx.Node, tuple[str, int, list[tuple[int, int]]]]  # a split → (its input, channels, part ranges)

    def _emit(self, node: fx.Node, op: str, inputs: list[str], name: str | None = None, **fields: Any) -> str:
        raise NotImplementedError

    def _input(self, arg: Any, node: fx.Node) -> str:
        raise NotImplementedError

    def refuse(self, node: fx.Node, why: str = "") -> UsageError:
        """The error for an fx node edgecl cannot convert: the op, where it is, and why."""
        return UsageError(f"{self.name}: unsupported op {describe(node)}{f': {why}' if why else ''}")

    def bind(self, node: fx.Node, parameters: tuple[str, ...]) -> dict[str, Any]:
        """The call's arguments by parameter name (positional or keyword), defaults filled; an argument edgecl does
        not know (``out=``, ``inplace=`` …) is refused rather than ignored."""
        if len(node.args) > len(parameters):
            raise self.refuse(node, f"{len(node.args)} positional arguments, edgecl knows {len(parameters)}")
        values = dict(zip(parameters, node.args))
        unknown = [k for k in node.kwargs if k not in parameters or k in values]
        if unknown:
            raise self.refuse(node, f"argument {unknown[0]!r} is not supported")
        values.update(node.kwargs)
        return {p: values.get(p, _DEFAULTS.get(p)) for p in parameters}

    # -- calls ------------------------------------------------------------------------------------------------------
    def call(self, node: fx.Node) -> None:
        """One call_function / call_method node whose value is a tensor (function targets are callables, method
        targets strings, so one table serves both)."""
        target = node.target
        if target in _ACTIVATIONS:
            args = self.bind(node, ("input", "approximate", "inplace"))
            extra = {"approximate": args["approximate"] or "none"} if _ACTIVATIONS[target] == "gelu" else {}
            self._emit(node, _ACTIVATIONS[target], [self._input(args["input"], node)], **extra)
        elif target in _LEAKY:
            args = self.bind(node, ("input", "negative_slope", "inplace"))
            self._emit(node, "leaky_relu", [self._input(args["input"], node)], slope=float(args["negative_slope"]))
        elif target in _ARITHMETIC:
            args = self.bind(node, ("input", "other", "alpha", "rounding_mode"))
            if args["alpha"] != 1 or args["rounding_mode"] is not None:
                raise self.refuse(node, "alpha= and rounding_mode= are not supported")
            self.arithmetic(node, _ARITHMETIC[target], args["input"], args["other"])
        elif target in _NEGATIONS:
            self._emit(node, "scale", [self._input(node.args[0], node)], factor=-1.0, offset=0.0)
        elif target in _SQUARES or target in _POWERS:
            self.square(node)
        elif target in _POOL_FUNCTIONS:
            args = self.bind(node, POOL_PARAMETERS[_POOL_FUNCTIONS[target]])
            self.pool(node, args.pop("input"), _POOL_FUNCTIONS[target], args)
        elif target in _SOFTMAX:
            self.final_softmax(node)
        elif target in _REDUCTIONS:
            args = self.bind(node, ("input", "dim", "keepdim", "dtype"))
            self.spatial_reduction(node, _REDUCTIONS[target], args)
        elif target is torch.cat:
            self.concatenate(node)
        elif target is F.interpolate:
            args = self.bind(node, ("input", "size", "scale_factor", "mode", "align_corners",
                                    "recompute_scale_factor", "antialias"))
            self.upsample(node, self._input(args["input"], node), args.pop("mode") or "nearest",
                          **{k: v for k, v in args.items() if k not in ("input", "size")})
        elif target in _DROPOUTS or is_library_identity(target):
            self.alias[node] = self._input(node.args[0], node)
        elif target in VIEWS:
            self.view(node, self._input(node.args[0], node))
        elif target is operator.getitem:
            self.index(node)
        else:
            raise self.refuse(node)

    def arithmetic(self, node: fx.Node, kind: str, a: Any, b: Any) -> None:
        """Two tensors: ``add``, ``mul``, or a - b as a + (-1·b); a tensor and a Python number: one ``scale`` node
        (x·factor + offset; x / c is x·(1/c)). Division by a tensor and c / x have no spec op."""
        if shape_of(a) is not None and shape_of(b) is not None:
            x, y = self._input(a, node), self._input(b, node)
            if kind in ("add", "sub") and shape_of(a) != shape_of(b):
                raise self.refuse(node, f"{kind} of shapes {shape_of(a)} and {shape_of(b)}; only of equal shapes "
                                        "(broadcasting is supported in a product)")
            if kind in ("add", "mul"):
                self._emit(node, kind, [x, y])
            elif kind == "sub":
                self._emit(node, "add", [x, self._emit(node, "scale", [y], f"{node.name}.neg", factor=-1.0)])
            else:
                raise self.refuse(node, "division by a tensor is not supported (only by a Python number)")
            return
        tensor_first = shape_of(a) is not None
        x = self._input(a if tensor_first else b, node)
        c = self.number(b if tensor_first else a, node)
        if kind == "div" and (not tensor_first or c == 0):
            raise self.refuse(node, "only division of a tensor by a nonzero Python number is supported")
        factor, offset = {"add": (1.0, c), "sub": (1.0, -c) if tensor_first else (-1.0, c), "mul": (c, 0.0),
                          "div": (1.0 / c if c else 0.0, 0.0)}[kind]
        self._emit(node, "scale", [x], factor=factor, offset=offset)

    def square(self, node: fx.Node) -> None:
        """x², a ``square`` node: ``torch.square(x)``, or ``x ** 2`` / ``torch.pow(x, 2)`` of a tensor x with the
        exponent the number 2; any other power (a tensor exponent, a number base) is refused by its exponent."""
        args = self.bind(node, ("input", "exponent") if node.target in _POWERS else ("input",))
        exponent = args.get("exponent", 2)
        if shape_of(args["input"]) is None or isinstance(exponent, bool) or \
                not isinstance(exponent, (int, float)) or exponent != 2:
            shown = getattr(exponent, "name", exponent)
            raise self.refuse(node, f"a power with exponent {shown!r}; edgecl supports x ** 2 of a tensor (a spec "
                                    "'square') only")
        self._emit(node, "square", [self._input(args["input"], node)])

    def number(self, value: Any, node: fx.Node) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, fx.Node):
            raise self.refuse(node, f"its operand {value.name!r} is computed in forward (from tensor sizes?); "
                                    "edgecl supports tensors and constant Python numbers")
        raise self.refuse(node, f"operand {str(value)[:60]!r} is neither a tensor nor a finite Python number")

    # -- pooling and reductions -------------------------------------------------------------------------------------
    def pool(self, node: fx.Node, source: Any, kind: str, args: dict[str, Any]) -> None:
        """A pooling layer or call, arguments as torch names them (`POOL_PARAMETERS`): ``maxpool`` / ``avgpool``,
        adaptive pooling as the plain pool it equals (output size dividing the input), ``gap`` for adaptive
        average pooling to 1×1, ``adaptive_avgpool`` for any other adaptive average (windows of unequal lengths)."""
        if args.get("return_indices"):
            raise self.refuse(node, "return_indices=True is not supported")
        if args.get("divisor_override") is not None:
            raise self.refuse(node, "divisor_override is not supported")
        x = self._input(source, node)
        if kind.startswith("adaptive"):
            self._adaptive(node, x, shape_of(source), kind, args["output_size"])
            return
        k = pair(args["kernel_size"])
        stride = pair(args["stride"]) if args["stride"] not in (None, [], ()) else k
        common = {"k": k, "stride": stride, "pad": pair(args["padding"]), "ceil_mode": bool(args["ceil_mode"])}
        if kind == "max":
            self._emit(node, "maxpool", [x], dilation=pair(args["dilation"]), **common)
        else:
            self._emit(node, "avgpool", [x], count_include_pad=bool(args["count_include_pad"]), **common)

    def _adaptive(self, node: fx.Node, x: str, shape: list[int] | None, kind: str, output_size: Any) -> None:
        if shape is None or len(shape) != 3:
            raise self.refuse(node, f"adaptive pooling needs a (channels, height, width) input, gets {shape}")
        size = [s if s is not None else d for s, d in zip(pair(output_size), shape[1:])]
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):  # torch pools to empty
            raise self.refuse(node, f"adaptive pooling to {output_size}: every output side must be an int ≥ 1")
        if kind == "adaptive_avg" and size == [1, 1]:
            self._emit(node, "gap", [x])
            return
        if all(s >= d and s % d == 0 for s, d in zip(size, shape[1:])):  # each window one value: repeated
            self.upsample(node, x, "nearest")
            return
        if (shape[1] % size[0] or shape[2] % size[1]) and kind == "adaptive_avg":  # windows of unequal lengths
            if max(size) > MAX_ADAPTIVE or max(shape[1:]) > MAX_ADAPTIVE_INPUT:
                raise self.refuse(node, f"adaptive average pooling of {shape[1:]} to {size}: at most a "
                                        f"{MAX_ADAPTIVE_INPUT}-sided map to a {MAX_ADAPTIVE}-sided output")
            self._emit(node, "adaptive_avgpool", [x], size=size)
            return
        if shape[1] % size[0] or shape[2] % size[1]:
            raise self.refuse(node, f"adaptive max pooling to {output_size} is supported only where it is a plain "
                                    f"pool or repeats each value (output size dividing the input {shape[1:]}, or a "
                                    "multiple of it)")
        k = [shape[1] // size[0], shape[2] // size[1]]
        if kind == "adaptive_max":
            self._emit(node, "maxpool", [x], k=k, stride=k, pad=[0, 0], dilation=[1, 1], ceil_mode=False)
        else:
            self._emit(node, "avgpool", [x], k=k, stride=k, pad=[0, 0], ceil_mode=False, count_include_pad=True)

    def upsample(self, node: fx.Node, x: str, mode: str, align_corners: Any = None, scale_factor: Any = None,
                 recompute_scale_factor: Any = None, antialias: Any = False) -> None:
        """Upsampling by integer factors (nn.Upsample, nn.UpsamplingBilinear2d, F.interpolate, adaptive pooling to a
        multiple of the input), the factors read off the traced shapes: ``nearest`` (every value repeated) or
        ``bilinear`` with torch's `align_corners` either way. A `scale_factor` torch would compute with must be those
        integers: torch maps positions with the factor given (2.0000001 moves them), not with the sizes."""
        before, after = shape_of(node.args[0]), shape_of(node)
        if mode == "bicubic":
            self._bicubic(node, x, before, after, align_corners, scale_factor, recompute_scale_factor, antialias)
            return
        if mode not in ("nearest", "bilinear"):
            raise self.refuse(node, f"upsampling mode {mode!r}; only 'nearest', 'bilinear' and 'bicubic' are "
                                    "supported")
        if antialias:
            raise self.refuse(node, "antialias=True is not supported (bilinear without it is)")
        if isinstance(align_corners, fx.Node) or isinstance(scale_factor, fx.Node) or \
                isinstance(recompute_scale_factor, fx.Node):
            raise self.refuse(node, "align_corners, scale_factor and recompute_scale_factor must be constants, not "
                                    "computed in forward")
        if before is None or len(before) != 3 or any(a % b for a, b in zip(after[1:], before[1:])):
            raise self.refuse(node, f"upsampling {before} to {after}; only by integer factors of a feature map")
        scale = [a // b for a, b in zip(after[1:], before[1:])]
        given = None if scale_factor is None or recompute_scale_factor else pair_floats(scale_factor)
        if given is not None and given != [float(s) for s in scale]:
            raise self.refuse(node, f"scale_factor {scale_factor}: only integer factors are supported (torch "
                                    "positions the samples by the factor given)")
        corners = bool(align_corners) and mode == "bilinear"
        if scale == [1, 1]:
            self.alias[node] = x
        elif mode == "bilinear":
            self._emit(node, "upsample", [x], scale=scale, mode="bilinear", align_corners=corners)
        else:
            self._emit(node, "upsample", [x], scale=scale)

    def _bicubic(self, node: fx.Node, x: str, before: list[int] | None, after: list[int] | None, align_corners: Any,
                 scale_factor: Any, recompute_scale_factor: Any, antialias: Any) -> None:
        """``F.interpolate(x, size, mode='bicubic', align_corners=False)`` of a map to any size (CrossViT's input to
        its second branch): a ``bicubic`` node. Given a `scale_factor`, torch places the samples by it rather than by
        the sizes: a factor is followed where torch's float32 1/factor is the sizes' ratio (integer factors)."""
        if align_corners or antialias or isinstance(align_corners, fx.Node):
            raise self.refuse(node, "bicubic with align_corners=True or antialias=True is not supported (torch's "
                                    "default align_corners=False is)")
        if before is None or len(before) != 3 or max(*after[1:], *before[1:]) > MAX_ADAPTIVE_INPUT:
            raise self.refuse(node, f"bicubic of {before} to {after}: a feature map of sides at most "
                                    f"{MAX_ADAPTIVE_INPUT} is supported")
        if scale_factor is not None and not recompute_scale_factor and (isinstance(scale_factor, fx.Node) or any(
                np.float32(1.0) / np.float32(f) != np.float32(a) / np.float32(b)
                for f, a, b in zip(pair_floats(scale_factor), before[1:], after[1:]))):
            raise self.refuse(node, f"bicubic by scale_factor {scale_factor}: torch places the samples by the factor; "
                                    "edgecl follows bicubic to a size (size=…, or recompute_scale_factor=True)")
        if after[1:] == before[1:]:  # torch copies the input
            self.alias[node] = x
        else:
            self._emit(node, "bicubic", [x], size=after[1:])

    def spatial_reduction(self, node: fx.Node, kind: str, args: dict[str, Any]) -> None:
        """A mean or amax over the two spatial axes (squeeze-and-excitation, global pooling written by hand):
        ``gap`` / a ``maxpool`` over the whole map, then a flatten unless keepdim."""
        dims = args["dim"]
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        x, before = self._input(args["input"], node), shape_of(args["input"])
        if before is None or len(before) != 3 or sorted(d % 4 for d in dims) != [2, 3] or args["dtype"] is not None:
            raise self.refuse(node, f"{kind} over dims {dims}; only the spatial {kind} (dims 2 and 3) is "
                                    "supported")
        keep = shape_of(node) == [before[0], 1, 1]
        name = None if keep else f"{node.name}.pool"
        if kind == "mean":
            pooled = self._emit(node, "gap", [x], name)
        else:
            k = before[1:]
            pooled = self._emit(node, "maxpool", [x], name, k=k, stride=k, pad=[0, 0], dilation=[1, 1],
                                ceil_mode=False)
        if not keep:
            self._emit(node, "flatten", [pooled])

    # -- structure --------------------------------------------------------------------------------------------------
    def concatenate(self, node: fx.Node) -> None:
        args = self.bind(node, ("tensors", "dim"))
        tensors, dim = args["tensors"], args["dim"] or 0
        if isinstance(tensors, fx.Node) and tensors in self.parts:  # torch.cat(x.split(...)): each part a slice
            names = [self._part(node, tensors, i) for i in range(len(self.parts[tensors][2]))]
        elif isinstance(tensors, (list, tuple)):
            names = [self._input(a, node) for a in tensors]
        else:
            raise self.refuse(node, "it concatenates a value edgecl cannot follow (a list of tensors is supported)")
        if len(names) == 1:  # DenseNet concatenates a list of one
            self.alias[node] = names[0]
            return
        rank = len(shape_of(node)) + 1
        if node in self.last or isinstance(tensors, fx.Node) and tensors in self.last:  # channels-last parts
            if dim % rank != rank - 1:
                raise self.refuse(node, f"concatenation of channels-last values along dim {dim}; only along their "
                                        "channels (the last dim)")
            self.last.add(node)
        elif rank not in (2, 4) or dim % rank != 1:
            raise self.refuse(node, f"concatenation along dim {dim}; only along channels (1) of a feature map or of "
                                    "a feature vector")
        self._emit(node, "cat", names)

    def view(self, node: fx.Node, x: str) -> None:
        """A view-like op: nothing when the shape is unchanged (expand_as for a broadcast, contiguous), a flatten to
        one axis, or a reshape to the shape the trace saw."""
        before, after = shape_of(node.args[0]), shape_of(node)
        if math.prod(before) != math.prod(after):
            if node.target == "expand_as":
                self.alias[node] = x  # the mul that follows broadcasts
                return
            raise self.refuse(node, "it changes the batch size or the number of elements")
        if before == after:
            self.alias[node] = x
        elif len(after) == 1:
            self._emit(node, "flatten", [x])
        else:
            self._emit(node, "reshape", [x], shape=after)

    def final_softmax(self, node: fx.Node) -> None:
        """(log_)softmax over the classes as the model's very last op, after its classifier (the PyTorch MNIST
        example): dropped. edgecl's heads give logits and train with cross-entropy, which applies log_softmax
        itself, so training is unchanged and the argmax is the same; the runtime returns logits."""
        args = self.bind(node, ("input", "dim", "_stacklevel", "dtype"))
        users = list(node.users)
        if self.classifier is False or len(users) != 1 or users[0].op != "output" or \
                len(shape_of(node) or []) != 1 or args["dim"] not in (None, 1, -1):
            raise self.refuse(node, "softmax is supported only as the last op, over the classes, after the final "
                                    "nn.Linear classifier (where edgecl drops it: its heads give logits)")
        self.alias[node] = self._input(args["input"], node)

