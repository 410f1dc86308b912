"""RGO's numerical core (paper: recursive gradient optimisation, Algorithm 1 and Appendix B).

- `Projector`: one projection matrix P per parameter, initialised to I and updated recursively (RLS, Algorithm 1
  lines 10–11), plus its trace-normalised form P·dim/trace(P) used to modify gradients (Theorem 1).
- `ProjectedLinear` / `ProjectedConv`: the layer ops whose backward returns the *projected* weight gradient
  Σ_b δ_b (P x_b)ᵀ directly, in the cheap order of Appendix B.2, so the dense gradient is never formed and then
  multiplied by P. The gradient flowing to earlier layers is the true one: P changes parameter updates only.
- Grouped and depthwise convolutions: the filters of conv group g read only group g's input channels, so the
  gradients an old task's inputs make to them live in the span of group g's patches (in/groups·kh·kw numbers), not
  of the whole input. Each conv group gets its own P over those patches ("feature extractors that share inputs
  share a projection"), trace-normalised on its own; a depthwise conv has one 9×9 P per channel for 3×3 kernels.
  A single P over all groups' patches would also protect old tasks (its span holds every group's) but would block
  each group in directions only other groups use. Dilation only changes which pixels a patch holds (`F.unfold`).
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
    """P for one parameter (float64: the recursive update subtracts nearly equal numbers over thousands of steps):
    dim × dim, or groups × dim × dim for a grouped convolution (one P per conv group, each updated and normalised
    on its own)."""

    def __init__(self, dim: int, alpha: float = 1.0, groups: int = 1):
        eye = torch.eye(dim, dtype=torch.float64)
        self.p = eye if groups == 1 else eye.repeat(groups, 1, 1)
        self.alpha = float(alpha)

    @property
    def dim(self) -> int:
        return self.p.shape[-1]

    def _scales(self) -> torch.Tensor:
        return self.dim / torch.diagonal(self.p, dim1=-2, dim2=-1).sum(-1)

    def scale(self) -> float:
        """dim(P)/trace(P): keeps the expected step length of an isotropic gradient unchanged (Theorem 1); the mean
        over conv groups for a grouped P (a summary: each group is normalised by its own)."""
        return float(self._scales().mean())

    def normalized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projector actually applied to gradients: P·dim/trace(P), whose trace is dim (per conv group)."""
        return (self.p * self._scales()[..., None, None]).to(dtype)

    def rls_step(self, g: torch.Tensor) -> None:
        """One recursive update with one vector, literally Algorithm 1: k = Pg/(α+gᵀPg); P ← P − k gᵀP."""
        g = g.to(torch.float64)
        pg = self.p @ g
        k = pg / (self.alpha + g @ pg)
        self.p -= torch.outer(k, pg)  # gᵀP = (Pg)ᵀ since P stays symmetric

    def update(self, gs: torch.Tensor) -> None:
        """The same recursion applied to every row of `gs` (B × dim) at once. Sequential `rls_step`s add GᵀG/α to
        P⁻¹ (Sherman–Morrison), so B of them equal P − P Gᵀ (αI + G P Gᵀ)⁻¹ G P (Woodbury; a B × B solve) and
        equally (P⁻¹ + GᵀG/α)⁻¹ = (I + P GᵀG/α)⁻¹ P (a dim × dim solve, which never inverts the ill-conditioned P
        itself): whichever system is smaller is solved. Symmetrised to keep rounding from breaking symmetry over many
        tasks."""
        g = gs.to(torch.float64)
        if self.p.dim() == 2 and g.dim() == 3:  # one conv group
            g = g[0]
        eye = torch.eye(min(g.shape[-2:]), dtype=torch.float64)
        if g.shape[-2] <= self.dim:
            pg = self.p @ g.mT
            self.p = self.p - pg @ torch.linalg.solve(self.alpha * eye + g @ pg, pg.mT)
        else:
            self.p = torch.linalg.solve(eye + self.p @ (g.mT @ g) / self.alpha, self.p)
        self.p = (self.p + self.p.mT) / 2

    def nbytes(self) -> int:
        return self.p.numel() * self.p.element_size()


def projected_outer(d: torch.Tensor, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """dᵀ X P = Σ_b d_b (P x_b)ᵀ for d (R × out), x (R × in), P symmetric (in × in), or a batch of them (leading
    conv-group axis). Appendix B.2's cheap order projects the R input rows first (R·in² extra work); when R exceeds
    the output units, projecting the gradient once (out·in²) is cheaper — the same product, the choice is speed."""
    if x.shape[-2] <= d.shape[-1]:
        return d.mT @ (x @ p)
    return (d.mT @ x) @ p


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
    """F.conv2d whose weight gradient is the projected one, in GEMM form over each conv group's
    (c_in/groups·kh·kw) input patches; `p` is one P, or one per conv group (groups × d × d)."""

    @staticmethod
    def forward(ctx, x, w, b, p, stride, padding, dilation=1, groups=1):
        ctx.save_for_backward(x, w, p)
        ctx.conf = (stride, padding, dilation, groups, b is not None)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        x, w, p = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        dx = torch.nn.grad.conv2d_input(x.shape, w, dy, stride, padding, dilation, groups)
        xr = group_patches(x, tuple(w.shape), stride, padding, dilation, groups)  # (G, B·L, d)
        dr = dy.flatten(2).transpose(1, 2).reshape(-1, groups, dy.shape[1] // groups).transpose(0, 1)
        dw = projected_outer(dr, xr, p).reshape(w.shape)
        return dx, dw, dy.sum((0, 2, 3)) if has_bias else None, None, None, None, None, None


def group_patches(x: torch.Tensor, w_shape: tuple[int, ...], stride: Any, padding: Any, dilation: Any = 1,
                  groups: int = 1) -> torch.Tensor:
    """Every input patch of a convolution, per conv group: (groups, B·positions, c_in/groups·kh·kw), each row in
    the weight's column order (channel, ky, kx) — the inputs each group's filters multiply."""
    cols = F.unfold(x, w_shape[2:], dilation=dilation, padding=padding, stride=stride)  # (B, c_in·kh·kw, L)
    b, size, positions = cols.shape
    d = size // groups  # explicit, not -1: a rank's slice of a batch may hold no sample
    return cols.reshape(b, groups, d, positions).permute(1, 0, 3, 2).reshape(groups, b * positions, d)


def conv_patches(x: torch.Tensor, w_shape: tuple[int, ...], stride: Any, padding: Any, mean: bool,
                 dilation: Any = 1, groups: int = 1, samples: int | None = None) -> torch.Tensor:
    """A conv layer's input vectors for P, per conv group (groups × rows × c_in/groups·kh·kw). The kernel's gradient
    Σ_positions δ·patchᵀ spans every input patch, so by default every patch is a row (sample-major), scaled by
    1/sqrt(positions) so that one sample contributes the average of its patches' outer products. With `mean`, one
    row per sample: the average patch. `samples`: how many samples x's batch holds where a windowed conv's x holds
    each sample's windows in turn (`edgecl.train.models.in_windows`): a sample's positions are all its windows'."""
    samples = len(x) if samples is None else samples
    rows = group_patches(x, w_shape, stride, padding, dilation, groups)
    positions = rows.shape[1] // samples if samples else 1
    if mean:
        return rows.reshape(groups, samples, positions, rows.shape[-1]).mean(2)
    return rows / positions ** 0.5


@dataclass
class Call:
    """One recorded layer call of the curvature pass."""

    x: torch.Tensor
    out: torch.Tensor
    w_shape: tuple[int, ...]
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1


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
        conf = (a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1))
        if self.record is not None:
            out = F.linear(x, w, b) if func is F.linear else F.conv2d(x, w, b, *conf)
            self.record[layer] = Call(x.detach(), out, tuple(w.shape), *conf)
            return out
        p = self.projections[layer]
        if func is F.linear:
            return ProjectedLinear.apply(x, w, b, p)
        return ProjectedConv.apply(x, w, b, p, *conf)
