"""RGO's numerical core (paper: recursive gradient optimisation, Algorithm 1 and Appendix B).

- `Projector`: one projection matrix P per parameter, initialised to I and updated recursively (RLS, Algorithm 1
  lines 10–11), plus its trace-normalised form P·dim/trace(P) used to modify gradients (Theorem 1).
- `ProjectedLinear` / `ProjectedConv`: the layer ops whose backward returns the *projected* weight gradient
  Σ_b δ_b (P x_b)ᵀ directly, in the cheap order of Appendix B.2, so the dense gradient is never formed and then
  multiplied by P. The gradient flowing to earlier layers is the true one: P changes parameter updates only.
- `LayerTap`: a torch function mode that routes the shared functional forward's linear/conv calls (recognised by
  weight tensor identity) through those ops, or records their inputs and outputs for the curvature pass. The model's
  forward stays the one in `edgecl.train.models`, so RGO trains exactly the graph the exporter emits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class Projector:
    """P for one parameter (float64: the recursive update subtracts nearly equal numbers over thousands of steps)."""

    def __init__(self, dim: int, alpha: float = 1.0):
        self.p = torch.eye(dim, dtype=torch.float64)
        self.alpha = float(alpha)

    @property
    def dim(self) -> int:
        return self.p.shape[0]

    def scale(self) -> float:
        """dim(P)/trace(P): keeps the expected step length of an isotropic gradient unchanged (Theorem 1)."""
        return self.dim / float(torch.trace(self.p))

    def normalized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projector actually applied to gradients: P·dim/trace(P), whose trace is dim."""
        return (self.p * self.scale()).to(dtype)

    def rls_step(self, g: torch.Tensor) -> None:
        """One recursive update with one vector, literally Algorithm 1: k = Pg/(α+gᵀPg); P ← P − k gᵀP."""
        g = g.to(torch.float64)
        pg = self.p @ g
        k = pg / (self.alpha + g @ pg)
        self.p -= torch.outer(k, pg)  # gᵀP = (Pg)ᵀ since P stays symmetric

    def update(self, gs: torch.Tensor) -> None:
        """The same recursion applied to every row of `gs` (B × dim) at once. Sequential `rls_step`s add GᵀG/α to
        P⁻¹ (Sherman–Morrison), so B of them equal P − P Gᵀ (αI + G P Gᵀ)⁻¹ G P (Woodbury; a B × B solve) and
        equally (P⁻¹ + GᵀG/α)⁻¹ (a dim × dim solve): whichever system is smaller is solved. Symmetrised to keep
        rounding from breaking symmetry over many tasks."""
        g = gs.to(torch.float64)
        eye = torch.eye(min(g.shape), dtype=torch.float64)
        if g.shape[0] <= self.dim:
            pg = self.p @ g.T
            self.p = self.p - pg @ torch.linalg.solve(self.alpha * eye + g @ pg, pg.T)
        else:
            info = torch.linalg.inv(self.p)
            self.p = torch.cholesky_inverse(torch.linalg.cholesky(info + g.T @ g / self.alpha))
        self.p = (self.p + self.p.T) / 2

    def nbytes(self) -> int:
        return self.p.numel() * self.p.element_size()


def projected_outer(d: torch.Tensor, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """dᵀ X P = Σ_b d_b (P x_b)ᵀ for d (R × out), x (R × in), P symmetric (in × in). Appendix B.2's cheap order
    projects the R input rows first (R·in² extra work); when R exceeds the output units, projecting the gradient
    once (out·in²) is cheaper — the two are the same product, the choice is only speed."""
    if x.shape[0] <= d.shape[1]:
        return d.T @ (x @ p)
    return (d.T @ x) @ p


class ProjectedLinear(torch.autograd.Function):
    """F.linear whose weight gradient is the projected one."""

    @staticmethod
    def forward(ctx, x, w, b, p):  # noqa: D401 - autograd signature
        ctx.save_for_backward(x, w, p)
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w, p = ctx.saved_tensors
        d2 = dy.reshape(-1, dy.shape[-1])
        dw = projected_outer(d2, x.reshape(-1, x.shape[-1]), p)
        return dy @ w, dw, d2.sum(0) if ctx.has_bias else None, None


class ProjectedConv(torch.autograd.Function):
    """F.conv2d whose weight gradient is the projected one, in GEMM form over (c_in·k·k) input patches."""

    @staticmethod
    def forward(ctx, x, w, b, p, stride, padding):
        ctx.save_for_backward(x, w, p)
        ctx.conf = (stride, padding, b is not None)
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def backward(ctx, dy):
        x, w, p = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        dx = torch.nn.grad.conv2d_input(x.shape, w, dy, stride, padding)
        cols = F.unfold(x, w.shape[2:], padding=padding, stride=stride)  # (B, c_in·k·k, L), weight column order
        xr = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        dr = dy.flatten(2).transpose(1, 2).reshape(-1, dy.shape[1])
        dw = projected_outer(dr, xr, p).reshape(w.shape)
        return dx, dw, dy.sum((0, 2, 3)) if has_bias else None, None, None, None


def conv_patches(x: torch.Tensor, w_shape: tuple[int, ...], stride: Any, padding: Any, mean: bool) -> torch.Tensor:
    """A conv layer's input vectors for P (rows × c_in·k·k). The kernel's gradient Σ_positions δ·patchᵀ spans every
    input patch, so by default every patch is a row, scaled by 1/sqrt(positions) so that one sample contributes
    the average of its patches' outer products. With `mean`, one row per sample: the average patch."""
    cols = F.unfold(x, w_shape[2:], padding=padding, stride=stride)  # (B, c_in·k·k, L), weight column order
    if mean:
        return cols.mean(2)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]) / cols.shape[2] ** 0.5


@dataclass
class Call:
    """One recorded layer call of the curvature pass."""

    x: torch.Tensor
    out: torch.Tensor
    w_shape: tuple[int, ...]
    stride: Any = 1
    padding: Any = 0


_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class LayerTap(TorchFunctionMode):
    """Intercept linear/conv calls whose weight is one of `layers` ({id(weight tensor): layer name}).

    With `projections` ({layer: normalised P}) the call runs the projected op; with `record` (a dict to fill) the
    call runs as is and its input and output are kept for the curvature pass."""

    def __init__(self, layers: dict[int, str], projections: dict[str, torch.Tensor] | None = None,
                 record: dict[str, Call] | None = None):
        super().__init__()
        self.layers, self.projections, self.record = layers, projections, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.conv2d:
            names = _LINEAR_ARGS if func is F.linear else _CONV_ARGS
            a = _bind(names, args, kwargs)
            layer = self.layers.get(id(a["weight"]))
            if layer is not None:
                return self._tapped(func, layer, a)
        return func(*args, **kwargs)

    def _tapped(self, func, layer: str, a: dict[str, Any]) -> torch.Tensor:
        x, w, b = a["input"], a["weight"], a.get("bias")
        stride, padding = a.get("stride", 1), a.get("padding", 0)
        if func is F.conv2d and (_pair(a.get("dilation", 1)) != (1, 1) or a.get("groups", 1) != 1):
            raise NotImplementedError(f"RGO: layer {layer!r} uses dilation/groups, which RGO does not project")
        if self.record is not None:
            out = F.linear(x, w, b) if func is F.linear else F.conv2d(x, w, b, stride, padding)
            self.record[layer] = Call(x.detach(), out, tuple(w.shape), stride, padding)
            return out
        p = self.projections[layer]
        if func is F.linear:
            return ProjectedLinear.apply(x, w, b, p)
        return ProjectedConv.apply(x, w, b, p, stride, padding)


def _pair(value: Any) -> tuple[int, ...]:
    return (value, value) if isinstance(value, int) else tuple(value)
