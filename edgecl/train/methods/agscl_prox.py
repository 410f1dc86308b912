"""AGS-CL's proximal steps (method: `agscl.py`): the closed form (7) of the paper's two group penalties, and term
(a)'s prox in Adam's metric (`AGSCLConfig.lasso`)."""
from __future__ import annotations

import torch


def prox_coefficients(norm: torch.Tensor, drift: torch.Tensor, omega: torch.Tensor, alpha: float, mu: float,
                      lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (a, b) with prox(θ_n) = a_n θ_n + b_n θ̂_n, the closed form (7), from ‖θ_n‖ and ‖θ_n − θ̂_n‖.

    Ω_n = 0: group-lasso shrinkage a = (1 − αμ/‖θ_n‖)₊, b = 0 — exactly zero when ‖θ_n‖ ≤ αμ.
    Ω_n > 0: a = γ = (1 − αλΩ_n/‖θ_n − θ̂_n‖)₊, b = 1 − γ — exactly θ̂_n (a = 0, b = 1) when the drift ≤ αλΩ_n."""
    shrink = torch.where(norm > alpha * mu, 1 - alpha * mu / norm.clamp_min(1e-30), torch.zeros_like(norm))
    limit = alpha * lam * omega
    gamma = torch.where(drift > limit, 1 - limit / drift.clamp_min(1e-30), torch.zeros_like(drift))
    important = omega > 0
    return torch.where(important, gamma, shrink), torch.where(important, 1 - gamma, torch.zeros_like(gamma))


def adam_lasso_coefficients(scaled_norm: torch.Tensor, norm: torch.Tensor, alpha: float, mu: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Term (a)'s prox in Adam's metric H = diag(h)/α, h = √v̂ + ε (proximal Adam): argmin μ‖θ‖ + ½‖θ − z‖²_H.
    Per group from ‖h ⊙ z‖ and ‖z‖: (dead, step) — exactly zero iff ‖h ⊙ z‖ ≤ αμ (then, at a fixed point, iff the
    group's loss gradient has norm ≤ μ: the group lasso's own optimality condition, whatever Adam's step size);
    otherwise coordinate i is multiplied by h_i / (h_i + step), step = αμ/‖z‖ (one fixed-point step of the exact
    solution, from ‖θ‖ ≈ ‖z‖: it shrinks slightly less than the exact prox)."""
    return scaled_norm <= alpha * mu, alpha * mu / norm.clamp_min(1e-30)


def adam_prox_groups(theta: torch.Tensor, h: torch.Tensor, alpha: float, mu: float) -> torch.Tensor:
    """Term (a)'s prox in Adam's metric on groups stored as rows of `theta` (N × d), `h` = √v̂ + ε alike."""
    dead, step = adam_lasso_coefficients((h * theta).norm(dim=1), theta.norm(dim=1), alpha, mu)
    return torch.where(dead[:, None], torch.zeros_like(theta), theta * h / (h + step[:, None]))


def prox_groups(theta: torch.Tensor, theta_hat: torch.Tensor, omega: torch.Tensor, alpha: float, mu: float,
                lam: float) -> torch.Tensor:
    """The proximal step (7) on groups stored as rows of `theta` (N × d), anchors θ̂ in `theta_hat`."""
    a, b = prox_coefficients(theta.norm(dim=1), (theta - theta_hat).norm(dim=1), omega, alpha, mu, lam)
    return a[:, None] * theta + b[:, None] * theta_hat
