"""Shape-specialised tracing: Python control flow on a traced value is resolved at the import shape.

torch.fx cannot branch on a proxy, yet most control flow in real models reads only shapes (``if x.shape[-1] !=
self.size``, ``assert x.dim() == 4``, ``if H % 2``, ``for i in range(x.size(1) // 4)``, a window padding's ``if
pad_r > 0``). edgecl imports one network for one input shape, so such a value has one answer: `ShapeFlowTracer`
computes it by running the part of the graph traced so far on example inputs of the import shape (keeping of their
values only those a later node can read, `fx_shape_values`), and hands Python the concrete value (`to_bool`, `iter`,
and `int()`/`float()`/`len()`/indexing through `_ShapeProxy`). Each decision is checked twice before it is taken,
because a wrong branch would be a silently different network:
  * it may read tensors only through their metadata (shape, dim, numel, dtype, device) — a value computed from tensor
    data (``x.sum() > 0``, ``(x > 0).any()``, ``.item()``, a shape made by ``nonzero``) is refused with its source
    line: edgecl builds one graph for every input;
  * it must be the same at batch sizes 1, 2 and 3 — the spec runs at any batch size, so a branch on the batch is
    refused too; and where it reads the batch axis at all (``x.shape[0]``, ``x.numel()``), the Python arithmetic
    from those reads to the decision is replayed at the batch sizes in `_PROBES` (the reads extrapolated: they are
    linear in the batch), so ``if B < 4`` is refused while ``if x.numel() == 0`` or ``b, c, h, w = x.shape; if c >
    8`` go in.
dtype/device reads resolve as float32 on the CPU: the spec is float32 everywhere (torch build, ONNX, runtime), and
the device a model was traced on does not change what its ops compute. After the trace, shape arithmetic that is the
same at every batch size is folded into constants where it is used as an argument (``F.pad(x, (0, pad_r, 0,
pad_b))``, ``x * x.size(1)``; a batch size stays symbolic) and the scalar nodes left without users (what decided a
branch) are erased, so the converter sees the specialised network only. A module without control flow or shape
arithmetic traces as before.
"""
from __future__ import annotations

import contextlib
import linecache
import operator
import os
import sys
import traceback
import weakref
from typing import Any, Container, Iterator

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.fx.proxy import Attribute

from edgecl.arch.fx_inplace import AugmentedAssignment
from edgecl.arch.fx_shape_values import ExampleValues, Known, hold
from edgecl.errors import UsageError


_BATCHES = (2, 1, 3)  # the import batch first: the value handed to Python is the one at batch 2
_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
                     "get_device"}
_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}
# ops whose output *shape* depends on the input's values
_DATA_SHAPED = {torch.nonzero, torch.masked_select, torch.unique, torch.unique_consecutive, torch.argwhere,
                torch.repeat_interleave, "nonzero", "masked_select", "unique", "unique_consecutive", "argwhere",
                "repeat_interleave"}
_OWN_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
_FOLDABLE = (bool, int, float)
# batch sizes at which a decision that reads the batch axis is replayed (beyond the 1, 2, 3 it is run at)
_PROBES = (*range(4, 33), 48, 50, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 500, 511, 512, 513, 1000, 1023, 1024,
           1025, 2047, 2048, 4096, 10_000, 65536, 1 << 20)


@contextlib.contextmanager
def _unpatched() -> Iterator[None]:
    """nn.Module's call and attribute access as they are outside a trace (the tracer patches them to record
    proxies), so that the layers run for real on the examples; where torch offers it, every patch of the trace is
    lifted."""
    revert = getattr(_symbolic_trace, "_maybe_revert_all_patches", None)
    if revert is not None:
        with revert():
            yield
        return
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _symbolic_trace._orig_module_call, _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


@contextlib.contextmanager
def evaluating(root: nn.Module, layers: list[nn.Module] | None = None) -> Iterator[None]:
    """`root` and every layer (`layers`: ``root.modules()``, given when known) in eval mode inside (BatchNorm
    statistics untouched), then each back in its own mode: a frozen BatchNorm in a training model stays in eval
    (``root.train(was)`` would set them all alike). Only training layers are switched, by their flag, except one that
    overrides train(), which is called (an eval forward may need what it prepares): no walk of every layer through
    nn.Module.train, which cost seconds per decision on a model of thousands of layers."""
    training = [m for m in (root.modules() if layers is None else layers) if m.training]
    for m in training:
        if type(m).train is not nn.Module.train:
            m.train(False)
        object.__setattr__(m, "training", False)  # nn.Module.__setattr__'s checks are for tensors and layers
    try:
        yield
    finally:
        for m in training:
            object.__setattr__(m, "training", True)


def user_line(frames: list[tuple[str, int]]) -> str | None:
    """The innermost of (file, line) `frames` (outermost first) outside torch and edgecl's importer, as
    ``file:line: code`` — where a refusal points the user."""
    for filename, line in reversed(frames):
        if not os.path.abspath(filename).startswith(_OWN_DIRS) and not filename.startswith("<"):
            return f"{filename}:{line}: {linecache.getline(filename, line).strip()[:120]}"
    return None


def raised_at(exc: BaseException) -> str | None:
    """The user's line an exception raised inside the trace came from."""
    return user_line([(f.filename, f.lineno or 0) for f in traceback.extract_tb(exc.__traceback__)])


def _calling_line() -> str:
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return user_line(frames[::-1]) or "an unknown line"


class ShapeFlowTracer(fx.Tracer):
    """An fx tracer that resolves control flow on shapes at `input_shape` (see the module docstring)."""

    def __init__(self, input_shape: list[int]) -> None:
        super().__init__()
        self.input_shape = list(input_shape)
        self._envs: dict[int, dict[fx.Node, Any]] = {}
        self._values: dict[int, ExampleValues] = {}  # the same environments, with what is released (fx_shape_values)
        self._holders: dict[fx.Node, list[weakref.ref]] = {}
        self._runners: dict[int, fx.Interpreter] = {}
        self._sources: dict[fx.Node, fx.Node | None] = {}
        self._batch_reads: dict[fx.Node, bool] = {}
        self._layers: list[nn.Module] = []

    def proxy(self, node: fx.Node) -> fx.Proxy:
        proxy = _ShapeProxy(node, self)
        hold(self._holders, node, proxy)
        return proxy

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._holders = {}
        self._values = {b: ExampleValues(self._holders) for b in _BATCHES}
        self._envs = {b: values.env for b, values in self._values.items()}
        self._runners, self._sources, self._batch_reads = {}, {}, {}
        self._layers = list(root.modules()) if isinstance(root, nn.Module) else []
        try:
            graph = super().trace(root, concrete_args)
            self._fold(graph)
        finally:  # the examples' intermediate values are not kept with the tracer
            self._envs, self._runners, self._sources, self._batch_reads, self._layers = {}, {}, {}, {}, []
            self._values, self._holders = {}, {}
        return graph

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.resolve(obj, "a condition (if, assert, and/or, not)"))

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.resolve(obj, "a for loop or unpacking", items=True)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return iter([obj[i] for i in range(len(value))])  # the parts of a split stay in the graph
        return iter(value)

    def example(self, proxy: fx.Proxy) -> Any:
        """`proxy`'s value on the example input at the import batch (a tensor, or a Python value of shapes)."""
        return self._evaluate(proxy.node, _BATCHES[0], _calling_line())

    # -- resolving one value ----------------------------------------------------------------------------------------
    def resolve(self, proxy: fx.Proxy, use: str, items: bool = False) -> Any:
        """The concrete value of `proxy` at the import shape, if it depends on shapes only and not on the batch."""
        node, where = proxy.node, _calling_line()
        values = [self._evaluate(node, batch, where) for batch in _BATCHES]
        if items and isinstance(values[0], torch.Tensor):
            raise UsageError(f"the Python control flow at {where} ({use}) reads a tensor's first axis (the batch); "
                             "edgecl builds one network for every batch size")
        source = self._data_source(node)
        if source is not None:
            raise UsageError(f"the Python control flow at {where} ({use}) depends on tensor values, not only on "
                             f"shapes (through {_describe(source)}); data-dependent control flow cannot be converted: "
                             "edgecl builds one network for every input (compute both branches and select with "
                             "torch.where, or decide in __init__)")
        parts = items and _has_tensors(values[0])  # a split's parts: their number is checked, their values stay
        other = None if parts else self._replay(node)
        if any(not _same(len(v) if parts else v, len(values[0]) if parts else values[0]) for v in values[1:]) or \
                other is not None:
            shown = ", ".join(f"{_short(v)} at batch {b}" for b, v in zip(_BATCHES, values))
            shown += f", but {_short(other[1])} at batch {other[0]}" if other else ""
            raise UsageError(f"the Python control flow at {where} ({use}) depends on the batch size ({shown}); edgecl "
                             "builds one network for every batch size, so the decision must depend only on the "
                             "other axes of the input")
        return values[0]

    def _evaluate(self, node: fx.Node, batch: int, where: str) -> Any:
        """`node`'s value on an example input of `batch` × the import shape: the graph traced so far, its ancestors
        only, in eval mode without gradients (the module's state untouched), reusing values computed before and
        releasing those no later node can read (`fx_shape_values`)."""
        values = self._values[batch]
        env = values.env
        if not values.known(node):
            self._release(values)  # what the model's code dropped since the last decision
            todo = self._in_order(node, Known(values))
            runner = self._runners.get(batch)
            if runner is None:
                runner = self._runners[batch] = fx.Interpreter(self.root, graph=self.graph)
                runner.env = env
            current = None
            try:  # torch.fx's patches (nn.Module.__call__ → a proxy) lifted: the layers run for real
                with torch.no_grad(), _unpatched(), evaluating(self.root, self._layers):
                    for current in todo:
                        values.store(current, self._run(runner, current, batch))
                        self._release(values, current.all_input_nodes)
            except UsageError:
                raise
            except Exception as exc:  # the model's own failure, at the user's line
                reason = str(exc).split("\n\nWhile executing")[0]  # torch.fx appends the graph node and a traceback
                raise UsageError(f"the model does not run on inputs of shape "  # the cause first, where it met it after
                                 f"({batch}, {', '.join(map(str, self.input_shape))}) at "
                                 f"{raised_at(exc) or getattr(current, 'name', '?')}: {type(exc).__name__}: "
                                 f"{reason[:200]} (met while deciding the control flow at {where})") from None
        return env[node]

    def _release(self, values: ExampleValues, nodes: list[fx.Node] | None = None) -> None:
        """Release the example tensors among `nodes` (all by default) that no later node can read."""
        values.release(nodes)

    def _run(self, runner: fx.Interpreter, node: fx.Node, batch: int) -> Any:
        if node.op != "placeholder":
            return runner.run_node(node)
        if node is next(iter(self.graph.nodes)):  # the input
            generator = torch.Generator().manual_seed(0)
            return torch.randn(batch, *self.input_shape, generator=generator)
        return node.args[0] if node.args else None  # an argument fixed at its default

    def _data_source(self, node: fx.Node) -> fx.Node | None:
        """The node through which tensor values (not only metadata) reach `node`'s value, if any (memoised: a node's
        inputs never change while it is traced)."""
        env, sources = self._envs[_BATCHES[0]], self._sources
        for n in self._in_order(node, sources):
            inputs = n.all_input_nodes
            found = next((sources[i] for i in inputs if sources[i] is not None), None)
            if found is None and (n.target in _DATA_SHAPED or _mask_index(n, env)):
                found = n
            if found is None and not _tensors(env[n]) and not _metadata(n) and any(_tensors(env[i]) for i in inputs):
                found = n  # .item(), .tolist(), a tensor's data read into Python
            sources[n] = found
        if sources[node] is None and isinstance(env[node], torch.Tensor):
            return node  # bool(tensor): its value decides
        return sources[node]

    def _in_order(self, node: fx.Node, known: Container[fx.Node]) -> list[fx.Node]:
        """`node` and its ancestors not in `known`, in graph order (each after its inputs)."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return sorted(_ancestors(node, known), key=order.__getitem__)

    # -- decisions that read the batch axis -------------------------------------------------------------------------
    def _reads_batch(self, node: fx.Node) -> bool:
        """Whether `node` is a Python value computed from a read that changes with the batch (``x.shape``,
        ``x.size(0)``, ``x.numel()``): such a read differs at batch 1, 2 and 3; the taint flows through Python values,
        never through tensors (memoised like `_data_source`)."""
        reads = self._batch_reads
        for n in self._in_order(node, reads):
            values = [self._envs[b][n] for b in _BATCHES]
            reads[n] = not _tensors(values[0]) and (any(reads[i] for i in n.all_input_nodes) or
                                                   any(not _same(v, values[0]) for v in values[1:]))
        return reads[node]

    def _replay(self, node: fx.Node) -> tuple[int, Any] | None:
        """The first batch size in `_PROBES` at which `node` (a Python value reading the batch axis) differs from its
        value at the import batch, with that value, or None: the batch-changing reads are extrapolated from batch 1,
        2 and 3 (shape and element counts are linear in the batch) and the Python arithmetic after them rerun. A
        read that is not linear, or arithmetic that reads a tensor or fails, counts as differing."""
        if not self._reads_batch(node):
            return None
        envs = {b: self._envs[b] for b in _BATCHES}
        chain = self._in_order(node, {n: 0 for n in self._batch_reads if not self._batch_reads[n]})
        for batch in _PROBES:
            values: dict[fx.Node, Any] = {}
            try:
                for n in chain:
                    if not any(i in values for i in n.all_input_nodes):  # a read of the batch: extrapolated
                        values[n] = _extrapolate([envs[b][n] for b in (1, 2, 3)], batch)
                        continue
                    if any(_tensors(envs[2][i]) for i in n.all_input_nodes):
                        raise ValueError("arithmetic on a tensor")
                    args = fx.node.map_arg(n.args, lambda a: values[a] if a in values else envs[2][a])
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a] if a in values else envs[2][a])
                    values[n] = n.target(*args, **kwargs) if n.op == "call_function" else \
                        getattr(args[0], n.target)(*args[1:], **kwargs)
            except Exception:  # not replayable: the decision may change with the batch
                return batch, "something else"
            if not _same(values[node], envs[2][node]):
                return batch, values[node]
        return None

    # -- after the trace --------------------------------------------------------------------------------------------
    def _fold(self, graph: fx.Graph) -> None:
        """Shape arithmetic (a tensor's metadata and Python arithmetic on it) that is the same at every batch size
        becomes constants in its uses (``F.pad(x, (0, W % 2, 0, H % 2))``, ``x * x.size(1)``); the scalar nodes
        left without users (what decided a branch) are erased."""
        scalars: set[fx.Node] = set()
        for n in graph.nodes:
            if n.op in ("call_function", "call_method") and not n.is_impure() and \
                    (_metadata(n) or n.all_input_nodes and all(i in scalars for i in n.all_input_nodes)):
                scalars.add(n)
        env = self._envs[_BATCHES[0]]
        for n in [n for n in graph.nodes if n in scalars and n.users]:
            try:
                values = [self._evaluate(n, batch, "a shape computation") for batch in _BATCHES]
            except UsageError:  # the model does not run at another batch size here: left as it was
                continue
            if not _plain(values[0]) or any(not _same(v, values[0]) for v in values[1:]) or \
                    self._data_source(n) is not None or self._replay(n) is not None:
                continue
            for user in list(n.users):
                user.args = fx.node.map_arg(user.args, lambda a, n=n: _constant(values[0]) if a is n else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a, n=n: _constant(values[0]) if a is n else a)
        changed = True
        while changed:
            changed = False
            for n in reversed(list(graph.nodes)):
                if n in env and not n.users and n.op in ("call_function", "call_method") and \
                        not isinstance(env[n], torch.Tensor) and not _has_tensors(env[n]) and not n.is_impure():
                    graph.erase_node(n)
                    changed = True


class _Concrete:
    """Python's conversions of a traced value, resolved by the tracer: ``range(n)``, ``int(x)``, ``len(x.shape)``."""

    tracer: ShapeFlowTracer

    def __index__(self) -> int:
        return operator.index(self.tracer.resolve(self, "an integer (range(), an index)"))  # type: ignore[arg-type]

    def __int__(self) -> int:
        return int(self.tracer.resolve(self, "int()"))  # type: ignore[arg-type]

    def __float__(self) -> float:
        return float(self.tracer.resolve(self, "float() or math"))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.tracer.resolve(self, "len()", items=True))  # type: ignore[arg-type]


class _ShapeAttribute(_Concrete, Attribute):
    """``x.shape`` and other attributes of a traced value, with the conversions above."""

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        """Attribute's node, made on first use; this attribute holds it (``y = x.mT``: `y` is read later)."""
        made = self._node is None
        node = Attribute.node.fget(self)  # type: ignore[attr-defined]
        if made:
            hold(self.tracer._holders, node, self)
        return node


class _ShapeProxy(_Concrete, AugmentedAssignment, fx.Proxy):
    def __getattr__(self, k: str) -> Any:
        if k == "device":  # the spec is device-free: `torch.autocast(x.device.type)`, `if x.is_cuda`-style reads
            return torch.device("cpu")
        return _ShapeAttribute(self, k)


def _ancestors(node: fx.Node, known: Container[fx.Node]) -> set[fx.Node]:
    found, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in found and n not in known:
            found.add(n)
            stack.extend(n.all_input_nodes)
    return found


def _extrapolate(values: list[Any], batch: int) -> Any:
    """A read at `batch` from its `values` at batch 1, 2 and 3: an int (or a shape's ints) linear in the batch."""
    if isinstance(values[0], (tuple, list)):
        if any(not isinstance(v, (tuple, list)) or len(v) != len(values[0]) for v in values):
            raise ValueError("shapes of different ranks")
        return type(values[0])(_extrapolate(list(column), batch) for column in zip(*values))
    if not all(type(v) is int for v in values) or values[2] - values[1] != values[1] - values[0]:
        raise ValueError("not linear in the batch")
    return values[0] + (batch - 1) * (values[1] - values[0])


def _metadata(node: fx.Node) -> bool:
    """Reads a tensor's metadata only (its shape, rank, element count, dtype or device), not its values."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA_ATTRIBUTES
    return node.op == "call_function" and node.target in (torch.Tensor.size, torch.Tensor.dim, torch.numel)


def _mask_index(node: fx.Node, env: dict[fx.Node, Any]) -> bool:
    """``x[mask]`` with a boolean tensor: its shape counts the mask's true values."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    found: list[bool] = []
    fx.node.map_arg(node.args[1:], lambda a: found.append(isinstance(env.get(a), torch.Tensor) and
                                                           env[a].dtype == torch.bool) or a)
    return any(found)


def _tensors(value: Any) -> bool:
    """A tensor or a split's parts: values that stay in the graph, not read into Python."""
    return isinstance(value, torch.Tensor) or _has_tensors(value)


def _has_tensors(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def _plain(value: Any) -> bool:
    return isinstance(value, _FOLDABLE) or isinstance(value, (tuple, list)) and all(
        isinstance(v, _FOLDABLE) for v in value)


def _constant(value: Any) -> Any:
    return tuple(value) if isinstance(value, (tuple, list)) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # values that do not compare
        return False


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}, node {node.name}"


def _short(value: Any) -> str:
    return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else str(value)[:40]
