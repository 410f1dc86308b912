"""How much of each RGO projection P the first task's inputs span, on timm tf_efficientnet_lite0 (split digits,
3×32×32, seed 0, `batchnorm=task batch_size=64 lr=0.01`, α = 1): per parameter, the share of P's directions whose
curvature H (P = (I + H)⁻¹) exceeds 1e-3, 1e-2 and 1. Where every direction is used, trace normalisation gives back
the step at any α (`RGOConfig`, tests/test_rgo_span.py).
Result: tools/results/own_network_tf_efficientnet_lite0_rgo_span.txt

    PYTHONPATH=. python tools/rgo_span.py
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from edgecl.arch.factories import ensure_torchvision_imports; ensure_torchvision_imports()
from edgecl.arch.factories import resolve_arch_and_module
from edgecl.train.data import make_stream, parse_input_shape
from edgecl.train import registry
from edgecl.train.protocol import TrainContext
torch.set_num_threads(1)
stream = make_stream("split-digits", 1, 0, parse_input_shape("3,32,32"))
torch.manual_seed(0)
arch, _ = resolve_arch_and_module("timm:tf_efficientnet_lite0", stream.input_shape)
m = registry.create("rgo", arch, {"seed": 0, "batchnorm": "task", "batch_size": 64, "lr": 0.01})
m.learn_task(0, stream.tasks[0], TrainContext(device="cpu", progress=False))
for name, pr in m.proj.items():
    p = pr.p if pr.p.dim() == 3 else pr.p[None]
    lam = 1 / torch.linalg.eigvalsh(p) - 1  # curvature H's eigenvalues (alpha = 1)
    frac = [float((lam > t).double().mean()) for t in (1e-3, 1e-2, 1.0)]
    print(f"{name:32s} dim {p.shape[-1]:5d}  share of directions with H-eigenvalue > 1e-3: {frac[0]:.2f}"
          f"  > 1e-2: {frac[1]:.2f}  > 1: {frac[2]:.2f}")
