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
    permuted with its channel group under FEL). Measured with FEL, 5 tasks, seed 0
    (tools/results/methods_on_graphs.json), ACC / BWT "task" vs "frozen": resnet preset, rotated digits 77.2 / −26.1
    vs 64.7 / −42.0, split digits 99.6 / −0.5 vs 99.3 / −0.5; ResCat (32 channels), split 97.8 / −0.2 vs 98.2 / −1.2,
    rotated 41.6 / −67.2 vs 62.3 / −39.6 (the one case for "frozen"). Without FEL (RGO-2) and with frozen BatchNorm —
    issue 16's setting — the resnet preset forgets −8.8 (split) and −40.4 (rotated): FEL on the channel groups is
    what keeps old tasks on BatchNorm networks.

    Rotated digits on BatchNorm convnets are RGO's weak case: every task's patches span the same input space, so the
    projection only reweights steps, and BatchNorm's fixed per-task statistics magnify what moves (LeNet without
    BatchNorm: BWT −1.1; the resnet preset: −26.1). A smaller step trades accuracy for memory: lr=0.01 gives ACC 90.1 /
    BWT −8.7 on the resnet preset (STL: 98.8), but ResCat then stops learning (33.4). On torchvision mobilenet_v2
    (width 0.25, 3×32×32) the second task does not train with SGD at batch 10 and lr 0.1 or 0.01 even with the
    projection switched off (alpha=1e9): the 1×1 convs before BatchNorm grow 38–108× in one task; RGO's numbers there
    (ACC 65.6, BWT −24.3) measure that, not the projection."""

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
