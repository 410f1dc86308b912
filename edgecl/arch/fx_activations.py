"""Activation layers `from_torch` reads as spec activations: torch's own modules, and timm's modules of the same
functions (``timm.layers.activations``, and the memory-saving ``activations_me``), which timm puts inside layers kept
whole: a BatchNormAct2d's ``.act`` (EfficientFormerV2's GELU), a split-attention gate. A traced-through timm
activation is followed by its functions (`fx_calls`); these tables are for modules read as objects. timm's classes
are judged by module and name, so timm is not imported for this. Any other activation (Mish, ELU, PReLU, QuickGELU,
…) is refused by its class name."""
from __future__ import annotations

from typing import Any

from torch import nn

from edgecl.arch.ops import ACTIVATIONS

ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                      nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.GELU: "gelu", nn.Tanh: "tanh",
                      nn.LeakyReLU: "leaky_relu"}
# timm's activation modules → (op, fields): the same function as the spec op (timm's hard_sigmoid is relu6(x + 3) / 6,
# hard_swish x · that, swish x · sigmoid(x), GELUTanh GELU's tanh approximation)
_TIMM = "timm.layers.activations"
_TIMM_ME = "timm.layers.activations_me"
TIMM_ACTIVATIONS: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    (_TIMM, "GELU"): ("gelu", {"approximate": "none"}), (_TIMM, "GELUTanh"): ("gelu", {"approximate": "tanh"}),
    (_TIMM, "Sigmoid"): ("sigmoid", {}), (_TIMM, "Tanh"): ("tanh", {}), (_TIMM, "Swish"): ("silu", {}),
    (_TIMM, "HardSwish"): ("hardswish", {}), (_TIMM, "HardSigmoid"): ("hardsigmoid", {}),
    (_TIMM_ME, "SwishMe"): ("silu", {}), (_TIMM_ME, "HardSwishMe"): ("hardswish", {}),
    (_TIMM_ME, "HardSigmoidMe"): ("hardsigmoid", {})}


def overridden(m: nn.Module) -> type | None:
    """The torch activation class `m` subclasses with a forward of its own (it computes something else), or None."""
    return next((k for k in ACTIVATION_MODULES if isinstance(m, k) and type(m).forward is not k.forward), None)


def module_activation(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The spec activation op and its fields that module `m` computes; None when edgecl has none for it (a subclass
    of torch's activation that overrides its forward included)."""
    timm_op = TIMM_ACTIVATIONS.get((type(m).__module__, type(m).__name__))
    if timm_op:
        return timm_op[0], dict(timm_op[1])
    if overridden(m) is not None:
        return None
    op = next((v for k, v in ACTIVATION_MODULES.items() if isinstance(m, k)), None)
    if op == "gelu":
        return op, {"approximate": m.approximate}
    if op == "leaky_relu":
        return op, {"slope": float(m.negative_slope)}
    return (op, {}) if op else None


def unknown_activation(m: nn.Module, path: str) -> str:
    """Why the activation module at `path` is refused: its class, and the activations edgecl has."""
    if (base := overridden(m)) is not None:
        return (f"activation {type(m).__name__} at {path!r} overrides {base.__name__}.forward ({type(m).__module__}), "
                f"so it computes something else than a {base.__name__}; not supported")
    return (f"activation {type(m).__name__} at {path!r} is not one edgecl has as a spec op (it has "
            f"{', '.join(ACTIVATIONS)}, as torch's or timm's modules)")
