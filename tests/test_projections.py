"""Every Euclidean projection against brute force: enumerate all feasible supports of a small matrix and check the
projection reaches the minimum distance (and is the minimiser; random values make it unique)."""
from itertools import combinations

import numpy as np
import pytest
import torch

from edgecl.errors import UsageError
from edgecl.train.projections import (expand_units, n_units, project_binary, project_columns, project_irregular,
                                      project_rows, project_sparse)

RNG = np.random.default_rng(7)


def brute_sparse(w: np.ndarray, k: int, unit: str, allowed: np.ndarray) -> np.ndarray:
    """argmin over every set of ≤ k allowed units of ‖w − w restricted to those units‖²."""
    p = w.shape[0]
    w2 = w.reshape(p, -1)
    candidates = [i for i in range(n_units(w.shape, unit)) if allowed[i]]
    best, best_d = None, np.inf
    for size in range(0, min(k, len(candidates)) + 1):
        for units in combinations(candidates, size):
            chosen = np.zeros(n_units(w.shape, unit), dtype=bool)
            chosen[list(units)] = True
            keep = expand_units(torch.from_numpy(chosen), w.shape, unit).numpy().reshape(p, -1)
            d = float(((w2 - np.where(keep, w2, 0)) ** 2).sum())
            if d < best_d - 1e-12:
                best, best_d = np.where(keep, w2, 0).reshape(w.shape), d
    return best


def brute_binary(m: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    """argmin over every binary x with exactly min(k, #allowed) ones, all inside allowed, of ‖x − m‖²."""
    flat, ok = m.reshape(-1), allowed.reshape(-1)
    candidates = np.flatnonzero(ok)
    best, best_d = None, np.inf
    for ones in combinations(candidates, min(k, len(candidates))):
        x = np.zeros_like(flat)
        x[list(ones)] = 1.0
        d = float(((x - flat) ** 2).sum())
        if d < best_d - 1e-12:
            best, best_d = x.reshape(m.shape), d
    return best


@pytest.mark.parametrize("unit,shape", [("element", (3, 4)), ("column", (3, 5)), ("row", (5, 3)),
                                        ("column", (2, 2, 2, 2)), ("row", (4, 1, 2, 2))])
def test_sparse_projection_matches_brute_force(unit, shape):
    for trial in range(6):
        w = RNG.normal(size=shape).astype(np.float32)
        units = n_units(shape, unit)
        allowed = RNG.random(units) < (1.0 if trial == 0 else 0.7)
        for k in range(0, units + 1, max(1, units // 5)):
            got = project_sparse(torch.from_numpy(w), k, unit, torch.from_numpy(allowed)).numpy()
            np.testing.assert_array_equal(got, brute_sparse(w, k, unit, allowed))


def test_named_projections_agree_with_the_generic_one_and_accept_numpy():
    w = RNG.normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_array_equal(project_irregular(w, 5).numpy(), brute_sparse(w, 5, "element", np.ones(24, bool)))
    np.testing.assert_array_equal(project_columns(w, 2).numpy(), brute_sparse(w, 2, "column", np.ones(6, bool)))
    np.testing.assert_array_equal(project_rows(w, 3).numpy(), brute_sparse(w, 3, "row", np.ones(4, bool)))


def test_column_and_row_projections_keep_whole_units():
    w = torch.from_numpy(RNG.normal(size=(6, 9)).astype(np.float32))
    cols = project_columns(w, 4) != 0
    assert cols.any(0).sum() == 4 and torch.equal(cols.any(0), cols.all(0))
    rows = project_rows(w, 2) != 0
    assert rows.any(1).sum() == 2 and torch.equal(rows.any(1), rows.all(1))


@pytest.mark.parametrize("shape", [(8,), (2, 4), (3, 3)])
def test_binary_projection_matches_brute_force(shape):
    for trial in range(8):
        m = RNG.normal(loc=0.5, size=shape)
        allowed = RNG.random(shape) < (1.0 if trial == 0 else 0.7)
        size = int(np.prod(shape))
        for k in range(0, size + 1):
            got = project_binary(torch.from_numpy(m), k, torch.from_numpy(allowed)).numpy()
            np.testing.assert_array_equal(got, brute_binary(m, k, allowed))
            assert got.sum() == min(k, allowed.sum()) and set(np.unique(got)) <= {0.0, 1.0}


def test_unknown_unit_is_a_usage_error():
    with pytest.raises(UsageError, match="diagonal"):
        project_sparse(torch.ones(2, 2), 1, "diagonal")
