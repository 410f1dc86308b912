"""RGO's trace-normalised projection against old tasks' inputs: how much of a step still reaches them, with and
without a direction the old tasks left unused. Why `alpha` helps on a wide layer and cannot help on a narrow one
(tools/results/own_network_tf_efficientnet_lite0_rgo_drift_*.txt, `RGOConfig`)."""
from __future__ import annotations

import pytest
import torch

from edgecl.train.methods.rgo_ops import Projector


def _leak(dim: int, used: int, alpha: float) -> float:
    """‖(step after P̂)·old inputs‖ ÷ ‖(plain step)·old inputs‖ for random steps, after P has seen old inputs that span
    `used` of `dim` directions (with unequal strengths, as layer inputs have)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0][:, :used]
    strengths = torch.linspace(0.05, 1.0, used, dtype=torch.float64)
    old = (torch.randn(400, used, generator=gen, dtype=torch.float64) * strengths) @ basis.T
    proj = Projector(dim, alpha)
    proj.update(old)
    steps = torch.randn(2000, dim, generator=gen, dtype=torch.float64)
    return float((steps @ proj.normalized(torch.float64) @ old.T).norm() / (steps @ old.T).norm())


def test_with_unused_directions_a_smaller_alpha_blocks_old_inputs_harder():
    # Half the directions unused: P̂ moves the step there, and what still reaches old inputs shrinks with α.
    leaks = [_leak(16, 8, alpha) for alpha in (1.0, 0.1, 0.01)]
    assert leaks[0] < 0.1
    assert leaks[1] < leaks[0] / 4 and leaks[2] < leaks[1] / 4


def test_when_old_inputs_span_every_direction_trace_normalisation_keeps_the_step():
    # No unused direction (a narrow 1×1 conv after a task): P̂ → dim·H⁻¹/trace(H⁻¹) as α → 0, whatever α is, and a
    # sizeable part of every step still reaches old inputs — the paper's normalisation, not a projection leak.
    leaks = [_leak(16, 16, alpha) for alpha in (1.0, 0.1, 0.01, 0.001)]
    assert min(leaks) > 0.2
    assert leaks[-1] == pytest.approx(leaks[1], rel=0.02)
    # the normalised P still shrinks that share well below the plain step's (1.0)
    assert max(leaks) < 0.5
