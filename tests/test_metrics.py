"""Metrics against accuracy matrices computed by hand."""
import math

import pytest

from edgecl import metrics
from edgecl.errors import UsageError

NAN = math.nan
A = [[0.9, NAN, NAN],
     [0.8, 0.7, NAN],
     [0.6, 0.75, 0.5]]


def test_acc_is_mean_of_last_row():
    assert metrics.acc(A) == pytest.approx((0.6 + 0.75 + 0.5) / 3)


def test_bwt_hand_computed():
    # task0: 0.6-0.9 = -0.3; task1: 0.75-0.7 = +0.05 -> mean -0.125
    assert metrics.bwt(A) == pytest.approx(-0.125)


def test_forgetting_uses_best_earlier_accuracy():
    # task0: max(0.9, 0.8) - 0.6 = 0.3 ; task1: max(0.7) - 0.75 = -0.05 -> 0.125
    assert metrics.forgetting(A) == pytest.approx(0.125)


def test_stability_and_plasticity_agscl_definitions():
    # S = mean_j A[T,j] / max_{i>=j} A[i,j] = (0.6/0.9 + 0.75/0.75 + 0.5/0.5) / 3
    assert metrics.stability(A) == pytest.approx((0.6 / 0.9 + 1 + 1) / 3)
    # P = mean_i A[i,i] / A*_i
    assert metrics.plasticity(A, [0.9, 0.8, 0.5]) == pytest.approx((1 + 0.7 / 0.8 + 1) / 3)


def test_single_task_has_no_transfer():
    assert metrics.bwt([[0.5]]) == 0.0 and metrics.forgetting([[0.5]]) == 0.0


@pytest.mark.parametrize("bad", [[[1.2]], [[0.5, NAN], [NAN, 0.5]], [[0.1, 0.2]], []])
def test_bad_matrices_rejected(bad):
    with pytest.raises(UsageError):
        metrics.summary(bad)
