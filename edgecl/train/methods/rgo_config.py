"""RGO's config (method: `rgo.py`), torch-free so it is checked before torch loads. Which channel groups get a
feature encoding layer depends on the architecture and is decided by the method (`rgo_fel`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from edgecl.config import BatchNormRule, Bounds, MethodConfig, above, at_least


@dataclass
class RGOConfig(MethodConfig):
    """RGO settings, stored in the artifact; defaults are the paper's MNIST ones.

    batchnorm: "task" (each task learns its own BatchNorm affine pair and statistics, in its own channel order: the
    paper removes BatchNorm, and per task nothing RGO cannot project is shared) or "frozen" (task 0's, fixed after,
    permuted with its channel group under FEL). Measured on the resnet preset, 5 tasks, seed 0, with FEL
    (tools/results/methods_on_graphs_bn.json): rotated-digits ACC 71.3 / BWT −33.5 ("task") vs 64.7 / −42.0
    ("frozen"); split-digits 99.5 / −0.7 vs 99.3 / −0.5. Without FEL (RGO-2) the same runs forget −49.5 / −40.4
    (rotated) and −25.3 / −8.8 (split): FEL is what keeps old tasks on BatchNorm networks.

    Rotated digits on BatchNorm convnets are RGO's weak case: every task's patches span the same input space, so the
    projection only reweights steps, and BatchNorm's fixed per-task statistics magnify what moves (LeNet without
    BatchNorm: BWT −1.1; the resnet preset: −33.5). A smaller step trades accuracy for memory: lr=0.03 gives ACC
    79.3 / BWT −23.2, lr=0.01 gives 91.0 / −7.8 (STL: 98.8)."""

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
