"""RGO's config (method: `rgo.py`), torch-free so it is checked before torch loads. Which channel groups get a
feature encoding layer depends on the architecture and is decided by the method (`rgo_fel`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from edgecl.config import BatchNormRule, Bounds, MethodConfig, above, at_least


@dataclass
class RGOConfig(MethodConfig):
    lr: float = 0.1  # Appendix C.4, MNIST
    batch_size: int = 10  # Section 5
    epochs: int = 8  # ≈ the paper's 1,000 steps of batch 10 on a ~1,250-image digits task
    fel: bool = True  # feature encoding layers; False is the paper's RGO-2 ablation
    fel_seed: int = 0  # task t's permutations use seed fel_seed + t (the integer task descriptor)
    alpha: float = 1.0  # RLS regulariser (Section 4.2 sets α = 1)
    curvature_batch: int = 128  # batch of the second pass (the recursion is the same at any batch)
    # "input": sqrt(l'')·x (B.1); "backprop": also × RMS of ∂f_y/∂(layer output)
    weight_vectors: Literal["input", "backprop"] = "input"
    # "patches": every input patch (÷ sqrt(positions)); "mean": the mean patch
    conv_vectors: Literal["patches", "mean"] = "patches"
    max_projection_bytes: int = 1 << 30  # refuse to allocate more P than this
    batchnorm: BatchNormRule = "task"

    BOUNDS: ClassVar[dict[str, Bounds]] = {"fel_seed": at_least(0), "alpha": above(0), "curvature_batch": at_least(1),
                                           "max_projection_bytes": at_least(0)}
