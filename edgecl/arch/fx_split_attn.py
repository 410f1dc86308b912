"""Split attention (timm's ``SelectiveKernel``, `skresnet*`, and ``SplitAttn``, `resnest*`) in a user's network, for
`fx_import._Converter`. The tracer keeps either module whole (their forwards stack branches into 5-D tensors and sum
over them, which the spec has no values for); each becomes what it computes, in ops the spec has:

    branches (R of C channels) → add → gap → fc → [BatchNorm] → act → fc (R·C logits) → branch_softmax
    → R slices → mul by its branch → add

SelectiveKernel: branch r is path r (conv, BatchNorm + act; with ``split_input`` on the r-th of R slices of the
input); its logits ``attn.view(B, R, C, 1, 1)`` are branch-major, as ``branch_softmax`` reads them. SplitAttn: the
branches are the R radix blocks of one grouped conv's R·C channels; its grouped fc2 writes the logits cardinality-major
(``view(B, G, R, C/G).transpose(1, 2)``), so with cardinality G > 1 they are first laid out branch-major by slices and
a ``cat``; radix 1 is a sigmoid gate. Every tensor node is named by its module path, so the modules' weights read as
they are. Variants these ops do not compute are refused by name with the user's source line. Its steps for one
library layer (`_conv`, `_norm`, `_act`: an activation or a gate) serve the other modules kept whole too (ECA,
GCNet, MobileNetV4's attention).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_activations import module_activation, unknown_activation
from edgecl.arch.fx_calls import is_library_identity, location, map_shape, shape_of
from edgecl.arch.fx_rms_norm import is_rms_norm_2d
from edgecl.errors import UsageError

SPLIT_ATTENTION = {("timm.layers.selective_kernel", "SelectiveKernel"), ("timm.layers.split_attn", "SplitAttn")}
_RADIX_SOFTMAX = ("timm.layers.split_attn", "RadixSoftmax")


def is_split_attention(m: Any) -> bool:
    """timm's SelectiveKernel or SplitAttn (judged by its class; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) in SPLIT_ATTENTION


class _SplitAttnConverter:
    """Mixin of `fx_import._Converter`: split-attention modules kept whole by the tracer."""

    name: str
    alias: dict[fx.Node, str]
    _emit: Callable[..., str]
    _activation: Callable[..., None]
    _batchnorm: Callable[..., None]
    _conv_fields: Callable[..., dict]
    rms_norm: Callable[..., str]

    def split_attention(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        where = f"{type(m).__name__} at {path!r} {location(node)}"
        map_shape(node, self.name, where)
        if type(m).__name__ == "SelectiveKernel":
            self._selective_kernel(node, m, x, path, where)
        else:
            self._split_attn(node, m, x, path, where)

    # -- the two modules --------------------------------------------------------------------------------------------
    def _selective_kernel(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> None:
        paths, attn = list(m.paths), m.attn
        n, c = len(paths), int(m.out_channels)
        if attn.num_paths != n or attn.fc_select.out_channels != n * c:
            raise UsageError(f"{self.name}: {where}: its attention selects among {attn.num_paths} paths of "
                             f"{attn.fc_select.out_channels // max(attn.num_paths, 1)} channels, it has {n} of {c}")
        per = int(m.in_channels) // n
        branches = []
        for i, conv_norm_act in enumerate(paths):
            inner = f"{path}.paths.{i}"
            source = self._emit(node, "slice", [x], f"{inner}.split", start=i * per, stop=(i + 1) * per) \
                if m.split_input else x
            if getattr(conv_norm_act, "aa", None) is not None and not _identity(conv_norm_act.aa):
                raise UsageError(f"{self.name}: {where}: path {i} has anti-aliasing ({type(conv_norm_act.aa).__name__})"
                                 "; not supported")
            branches.append(self._norm(node, conv_norm_act.bn, self._conv(node, conv_norm_act.conv, source,
                                                                          f"{inner}.conv", where), f"{inner}.bn",
                                       where, required=True))
        hidden = self._conv(node, attn.fc_reduce, self._pool(node, branches, f"{path}.attn"), f"{path}.attn.fc_reduce",
                            where)
        hidden = self._act(node, attn.act, self._norm(node, attn.bn, hidden, f"{path}.attn.bn", where),
                           f"{path}.attn.act", where)
        logits = self._conv(node, attn.fc_select, hidden, f"{path}.attn.fc_select", where)
        self._select(node, branches, logits, path)

    def _split_attn(self, node: fx.Node, m: nn.Module, x: str, path: str, where: str) -> None:
        radix, soft = int(m.radix), m.rsoftmax
        cardinality = int(m.fc1.groups)
        if (type(soft).__module__, type(soft).__name__) != _RADIX_SOFTMAX or soft.radix != radix or \
                soft.cardinality != cardinality or m.fc2.groups != cardinality or \
                m.conv.groups != cardinality * radix or m.conv.out_channels != radix * m.fc1.in_channels:
            raise UsageError(f"{self.name}: {where}: edgecl follows timm's layout (conv groups = cardinality · radix, "
                             "fc1/fc2 groups = cardinality = its RadixSoftmax's, radix blocks of out_channels); has "
                             f"conv groups {m.conv.groups}, radix {radix}, fc1/fc2 groups {m.fc1.groups}/"
                             f"{m.fc2.groups}, {type(soft).__name__} {getattr(soft, 'radix', '?')}/"
                             f"{getattr(soft, 'cardinality', '?')}")
        if not _identity(m.drop):
            raise UsageError(f"{self.name}: {where}: drop layer {type(m.drop).__name__} is not supported")
        mapped = self._conv(node, m.conv, x, f"{path}.conv", where)
        mapped = self._act(node, m.act0, self._norm(node, m.bn0, mapped, f"{path}.bn0", where), f"{path}.act0",
                           where)
        c = int(m.fc1.in_channels)
        branches = [mapped] if radix == 1 else [
            self._emit(node, "slice", [mapped], f"{path}.radix{r}", start=r * c, stop=(r + 1) * c)
            for r in range(radix)]
        hidden = self._conv(node, m.fc1, self._pool(node, branches, path), f"{path}.fc1", where)
        hidden = self._act(node, m.act1, self._norm(node, m.bn1, hidden, f"{path}.bn1", where), f"{path}.act1", where)
        logits = self._conv(node, m.fc2, hidden, f"{path}.fc2", where)
        if radix == 1:  # RadixSoftmax's sigmoid: a gate
            self._emit(node, "mul", [mapped, self._emit(node, "sigmoid", [logits], f"{path}.rsoftmax")], path)
            return
        if cardinality > 1:  # (G, R, C/G) → (R, G, C/G): branch-major
            width = c // cardinality
            logits = self._emit(node, "cat", [
                self._emit(node, "slice", [logits], f"{path}.rsoftmax.r{r}g{g}", start=(g * radix + r) * width,
                           stop=(g * radix + r + 1) * width) for r in range(radix) for g in range(cardinality)],
                f"{path}.rsoftmax.order")
        self._select(node, branches, logits, path)

    # -- steps ------------------------------------------------------------------------------------------------------
    def _pool(self, node: fx.Node, branches: list[str], path: str) -> str:
        """The branches' sum, pooled: what the attention reads."""
        total = branches[0] if len(branches) == 1 else self._emit(node, "add", branches, f"{path}.sum")
        return self._emit(node, "gap", [total], f"{path}.pool")

    def _select(self, node: fx.Node, branches: list[str], logits: str, path: str) -> None:
        """Softmax across the branches, each branch times its block of weights, summed: the module's output."""
        n = len(branches)
        weights = self._emit(node, "branch_softmax", [logits], f"{path}.softmax", branches=n)
        per = shape_of(node)[0]
        weighted = [self._emit(node, "mul", [b, self._emit(node, "slice", [weights], f"{path}.weight{r}",
                                                           start=r * per, stop=(r + 1) * per)], f"{path}.weighted{r}")
                    for r, b in enumerate(branches)]
        if n == 1:
            self.alias[node] = weighted[0]
        else:
            self._emit(node, "add", weighted, path)

    def _conv(self, node: fx.Node, conv: nn.Module, x: str, path: str, where: str) -> str:
        if type(conv) is not nn.Conv2d:
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(conv).__name__}; edgecl converts a plain "
                             "nn.Conv2d there")
        return self._emit(node, "conv", [x], path, **self._conv_fields(node, conv, path))

    def _norm(self, node: fx.Node, norm: nn.Module, x: str, path: str, where: str, required: bool = False) -> str:
        """A BatchNorm (with timm's `.act`), or nothing where the module has an identity (SplitAttn's default)."""
        if _identity(norm) and not required:
            return x
        if is_rms_norm_2d(norm):  # MobileNetV5's attention: timm's RmsNorm2d after the key/value down-sampling
            return self.rms_norm(node, norm, x, path)
        if not isinstance(norm, (nn.BatchNorm2d,)):
            raise UsageError(f"{self.name}: {where}: {path!r} is a {type(norm).__name__}; edgecl converts a "
                             "BatchNorm2d or timm's RmsNorm2d there")
        self._batchnorm(node, norm, x, path)
        return self.alias[node]

    def _act(self, node: fx.Node, act: nn.Module, x: str, path: str, where: str) -> str:
        """An activation or gate module: torch's, or timm's own (create_act_layer's "sigmoid", "hard_sigmoid")."""
        if module_activation(act) is None:
            raise UsageError(f"{self.name}: {where}: {unknown_activation(act, path)}")
        self._activation(node, act, x, path)
        return self.alias[node]


def _identity(m: nn.Module) -> bool:
    """An identity at inference: nn.Identity, dropout, timm's drop block."""
    return isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)) or is_library_identity(m)
