"""Continual-learning metrics on an accuracy matrix A, A[i][j] = accuracy on task j after learning task i.

Entries with j > i (tasks not yet seen) are NaN. Definitions: ACC and BWT as in GEM (Lopez-Paz & Ranzato), forgetting
as in Chaudhry et al., plasticity P and stability S as in the AGS-CL paper (Analysis 3). Across runs: task-order
disparity OPD/MOPD/AOPD (HALRP paper Eq. 14), the accuracy-vs-cost Pareto front, mean ± sample std. numpy only.
"""
from __future__ import annotations

import math

import numpy as np

from edgecl.errors import UsageError


def as_matrix(acc_matrix) -> np.ndarray:
    """Validate a square lower-triangular accuracy matrix with fractions in [0, 1]."""
    a = np.array(acc_matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise UsageError(f"accuracy matrix must be square and non-empty, got shape {a.shape}")
    low = a[np.tril_indices(a.shape[0])]
    if np.isnan(low).any() or (low < 0).any() or (low > 1).any():
        raise UsageError("accuracy matrix entries on and below the diagonal must be fractions in [0, 1]")
    return a


def acc(a) -> float:
    """Average accuracy over all tasks after the last one."""
    a = as_matrix(a)
    return float(a[-1].mean())


def bwt(a) -> float:
    """Backward transfer: mean change on old tasks between learning them and the end (negative = forgetting)."""
    a = as_matrix(a)
    t = a.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([a[-1, j] - a[j, j] for j in range(t - 1)]))


def forgetting(a) -> float:
    """Mean over old tasks of (best accuracy ever before the end) − (final accuracy)."""
    a = as_matrix(a)
    t = a.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([a[j:t - 1, j].max() - a[-1, j] for j in range(t - 1)]))


def stability(a) -> float:
    """S = 1/T Σ_j A[T,j] / max_{i≥j} A[i,j]: the share of each task's best accuracy that survives."""
    a = as_matrix(a)
    best = np.array([a[j:, j].max() for j in range(a.shape[0])])
    return float(np.mean(np.divide(a[-1], best, out=np.ones_like(best), where=best > 0)))


def plasticity(a, finetune_diag) -> float:
    """P = 1/T Σ_i A[i,i] / A*_i with A* the accuracy plain fine-tuning reaches on task i right after learning it."""
    a = as_matrix(a)
    ref = np.asarray(finetune_diag, dtype=np.float64)
    if ref.shape != (a.shape[0],):
        raise UsageError(f"finetune diagonal needs {a.shape[0]} entries, got {ref.shape}")
    return float(np.mean(np.divide(np.diag(a), ref, out=np.ones_like(ref), where=ref > 0)))


def summary(a, finetune_diag=None) -> dict:
    """All scalar metrics at once, as JSON-able floats."""
    out = {"acc": acc(a), "bwt": bwt(a), "forgetting": forgetting(a), "stability": stability(a)}
    if finetune_diag is not None:
        out["plasticity"] = plasticity(a, finetune_diag)
    return out


# ---------------------------------------------------------------- across runs (seeds, task orders, methods)

def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points that no other point dominates, by increasing cost. `points` maps a name to (cost, value),
    e.g. (artifact bytes, ACC): lower cost and higher value are better; a point is dominated when another has cost ≤
    and value ≥ with at least one strictly better. Points with a missing or NaN coordinate are left out."""
    ok = {n: (float(c), float(v)) for n, (c, v) in points.items()
          if c is not None and v is not None and not (math.isnan(c) or math.isnan(v))}
    front = [a for a, (ca, va) in ok.items()
             if not any(cb <= ca and vb >= va and (cb < ca or vb > va) for b, (cb, vb) in ok.items() if b != a)]
    return sorted(front, key=lambda n: (ok[n][0], -ok[n][1], n))


def opd(final_acc) -> np.ndarray:
    """OPD_t = max_r P[r, t] − min_r P[r, t] for P of shape (orders, tasks), P[r, t] the final accuracy on task t
    (indexed by task identity, not position) after learning all tasks in order r."""
    p = np.asarray(final_acc, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1 or np.isnan(p).any():
        raise UsageError(f"OPD needs a complete (orders × tasks) accuracy table, got shape {p.shape}")
    return p.max(axis=0) - p.min(axis=0)


def mopd(final_acc) -> float:
    """Maximum OPD over tasks."""
    return float(opd(final_acc).max())


def aopd(final_acc) -> float:
    """Average OPD over tasks."""
    return float(opd(final_acc).mean())


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0
