"""Euclidean projections onto the sparsity sets that ADMM pruning needs (LPS Sections IV-C/D, Appendix B).

Every projection works on the GEMM view (P × Q, rows = output units) of a linear or conv weight and accepts an
optional ``allowed`` mask: units outside it must be zero, so the projection onto {supp ⊆ allowed, ≤ k units} keeps
the best k allowed units and zeroes the rest. That is how LPS restricts a task to the free pool (weights) or to the
earlier support (sharing masks). Units are ``element`` (irregular), ``column`` or ``row`` (filter).

Torch tensors in, torch tensors out; numpy arrays are accepted and converted, so other methods (and the tests) can
call these on either.
"""
from __future__ import annotations

import numpy as np
import torch

from edgecl.arch import gemm_shape
from edgecl.errors import UsageError

UNITS = ("element", "column", "row")


def _tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def n_units(shape: tuple[int, ...], unit: str) -> int:
    """How many prunable units a weight of `shape` has: elements, GEMM columns or GEMM rows."""
    p, q = gemm_shape(tuple(shape))
    if unit == "element":
        return p * q
    if unit == "column":
        return q
    if unit == "row":
        return p
    raise UsageError(f"unknown pruning unit {unit!r} (known: {', '.join(UNITS)})")


def unit_scores(w, unit: str) -> torch.Tensor:
    """Per-unit squared size: |w|² per element, squared ℓ2 norm per GEMM column or row (flat, unit order).
    Keeping the units with the largest scores is exactly the Euclidean projection."""
    w = _tensor(w)
    p, q = gemm_shape(tuple(w.shape))
    g = w.detach().reshape(p, q).to(torch.float64) ** 2
    if unit == "element":
        return g.reshape(-1)
    if unit == "column":
        return g.sum(0)
    if unit == "row":
        return g.sum(1)
    raise UsageError(f"unknown pruning unit {unit!r} (known: {', '.join(UNITS)})")


def expand_units(units, shape: tuple[int, ...], unit: str) -> torch.Tensor:
    """A flat per-unit tensor broadcast to every element of a weight of `shape` (the inverse view of unit_scores)."""
    units = _tensor(units)
    p, q = gemm_shape(tuple(shape))
    if unit == "element":
        return units.reshape(shape)
    if unit == "column":
        return units.reshape(1, q).expand(p, q).reshape(shape)
    if unit == "row":
        return units.reshape(p, 1).expand(p, q).reshape(shape)
    raise UsageError(f"unknown pruning unit {unit!r} (known: {', '.join(UNITS)})")


def top_k_mask(scores, k: int, allowed=None) -> torch.Tensor:
    """Boolean mask of the k largest scores among the allowed positions (fewer if fewer are allowed)."""
    scores = _tensor(scores).reshape(-1).to(torch.float64)
    if allowed is not None:
        allowed = _tensor(allowed).reshape(-1).to(device=scores.device, dtype=torch.bool)
        scores = torch.where(allowed, scores, torch.full_like(scores, -torch.inf))
        k = min(k, int(allowed.sum()))
    k = max(0, min(int(k), scores.numel()))
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.topk(scores, k, sorted=False).indices] = True
    return keep


def sparse_support(w, k: int, unit: str, allowed_units=None) -> torch.Tensor:
    """Units (flat bool) of the projection of w onto {at most k non-zero units, all inside allowed_units}."""
    return top_k_mask(unit_scores(w, unit), k, allowed_units)


def project_sparse(w, k: int, unit: str, allowed_units=None) -> torch.Tensor:
    """Π_S(w) for S = {at most k non-zero units (element/column/row) inside allowed_units}: keep the k units of
    largest magnitude (ℓ2 norm for columns/rows), zero everything else. Same shape and dtype as w."""
    w = _tensor(w)
    keep = expand_units(sparse_support(w, k, unit, allowed_units), tuple(w.shape), unit)
    return torch.where(keep, w, torch.zeros_like(w))


def project_irregular(w, k: int, allowed=None) -> torch.Tensor:
    """Keep the k entries of largest |value| (Eq. 6)."""
    return project_sparse(w, k, "element", allowed)


def project_columns(w, k: int, allowed=None) -> torch.Tensor:
    """Keep the k GEMM columns of largest ℓ2 norm (Eq. 7)."""
    return project_sparse(w, k, "column", allowed)


def project_rows(w, k: int, allowed=None) -> torch.Tensor:
    """Keep the k GEMM rows (filters / output units) of largest ℓ2 norm."""
    return project_sparse(w, k, "row", allowed)


def project_binary(m, k: int, allowed=None) -> torch.Tensor:
    """Π_S'(m) for S' = {binary, exactly k ones, ones only inside allowed} (Eq. 8, Appendix B): the k largest
    allowed entries become 1, all else 0. Same shape and dtype as m."""
    m = _tensor(m)
    ones = top_k_mask(m.detach(), k, allowed).reshape(m.shape)
    return ones.to(m.dtype)
