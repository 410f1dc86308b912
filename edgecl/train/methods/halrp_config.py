"""HALRP's config (method: `halrp.py`), torch-free so it is checked before torch loads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from edgecl.config import POSITIVE_FRACTION, BatchNormRule, Bounds, MethodConfig, at_least

PruneMode = Literal["none", "absolute", "percentile", "mixed"]
PRUNE_MODES = get_args(PruneMode)


@dataclass
class HALRPConfig(MethodConfig):
    """``epochs`` is n, the total per task: task 0 trains n epochs, later tasks n_r warm-up + (n − n_r) fine-tune.
    lr and epochs default higher than the paper's (1e-3, 12 on P-MNIST): a digits task is ~20 mini-batches per epoch
    against ~470 for MNIST, and these values reached STL's accuracy on permuted digits (tools/halrp_acceptance.py).

    Small convnets: a convolution's residual is constant over kernel positions (Eq. 7), so a layer with few input
    channels (LeNet's first: one) can barely change its filters, and every non-zero rank counts. For LeNet on
    permuted digits ``alpha=0.95, min_rank=1, prune="absolute", ls_rounds=3`` keeps ACC within 1.9 points of STL on
    three seeds where the defaults lose 2.15 (tools/results/halrp_lenet_ls3.json).

    batchnorm: "task" (each task learns its own BatchNorm affine pair and statistics, with its biases) or "frozen"
    (task 0's, fixed after, like the base weights). "task" by measurement (tools/results/methods_on_graphs*.json,
    seed 0): ACC on 5 rotated- / split-digit tasks, resnet preset 98.5 vs 94.1 / 99.8 vs 97.0, ResCat (32 channels)
    92.3 vs 90.0 / 97.2 vs 88.1; mobilenet_v2 (3 split tasks at 3×32×32) 96.6 vs 90.2."""

    lr: float = 3e-3
    epochs: int = 20
    warmup_epochs: int = 1       # n_r (paper default 1)
    alpha: float = 0.9           # loss approximation rate of Eq. 11
    ls_rounds: int = 1           # alternations of the R/S least squares (the paper does one: R, then S)
    lambda0: float = 1e-6        # L1 weight on u, v (Eq. 12; paper Table 8, P-MNIST)
    lambda1: float = 1e-4        # L2 weight on r, s, u, v (Eq. 12)
    grad_stat: Literal["norm", "mean"] = "norm"  # G_l of Eq. 11: "norm" = ‖g_l‖²₂ (the paper), "mean" = ‖g_l‖²₂ / size
    min_rank: int = 0            # Eq. 11 may give a layer rank 0 (the reference code forces ≥ 1: set 1)
    max_rank: int = 0            # 0 = no cap
    prune: PruneMode = "mixed"   # none | absolute | percentile | mixed (Section 4.4)
    prune_abs: float = 1e-5      # absolute threshold
    prune_budget: float = 0.25   # γ: factor entries kept per task ≤ γ × dense trunk weights
    reprune: bool = False        # re-prune earlier tasks' factors (breaks their bit-identity)
    batchnorm: BatchNormRule = "task"

    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "warmup_epochs": at_least(1), "alpha": POSITIVE_FRACTION, "ls_rounds": at_least(1), "lambda0": at_least(0),
        "lambda1": at_least(0), "min_rank": at_least(0), "max_rank": at_least(0), "prune_abs": at_least(0),
        "prune_budget": at_least(0)}

    def check(self) -> list[str]:
        if self.warmup_epochs >= self.epochs:  # later tasks need at least one fine-tune epoch after the warm-up
            return [f"warmup_epochs must be in [1, epochs), got {self.warmup_epochs} with epochs={self.epochs}: "
                    f"each later task warms up for warmup_epochs, then fine-tunes at least one epoch, so HALRP "
                    f"needs epochs >= {self.warmup_epochs + 1} (--set epochs={self.warmup_epochs + 1})"]
        return []
