"""Bounds on the work one spec node may ask for, shared by `edgecl.arch.spec` and the op modules that check their
own intermediates (`edgecl.arch.lambda_ops`): a spec read from a file must not make a small artifact allocate
gigabytes."""
from __future__ import annotations

MAX_ACTIVATION = 1 << 28  # elements of one node's output per sample (1 GiB of float32): cat can multiply channels;
#                          also bounds an attention's heads × T² scores and a lambda layer's heads × dim × dv × T
MAX_CONSTANTS = 1 << 26  # elements of the fixed matrices a spec's ONNX graph holds in all (256 MiB of float32):
#                         bicubic and adaptive pooling's per-axis matrices, outlook attention's one-hot windows,
#                         a relative lambda's index, gated positions' offsets, a shifted window's mask;
#                         no tensor of the file pays for them (CrossViT's bicubic at 240: 107,520; VOLO-D1's 62,208)
