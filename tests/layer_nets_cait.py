"""Small instances of timm's class-attention and convolutional-attention transformers for from_torch's tests and the
methods' graph runs: CaiT (talking-heads attention, class-attention blocks), ConViT (gated positional attention)."""
from __future__ import annotations

from torch import nn

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()


def tiny_cait(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's CaiT in small: a stride-2 patch embedding to (image / 2)² tokens of 8 channels, one talking-heads
    block of 2 heads, one class-attention block."""
    from timm.models.cait import Cait
    args = dict(img_size=image, in_chans=in_channels, patch_size=2, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2,
                depth_token_only=1, mlp_ratio_token_only=2, num_classes=classes)
    return Cait(**{**args, **kwargs})


def cait_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_cait(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def tiny_convit(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's ConViT in small: a stride-2 patch embedding to (image / 2)² tokens of 8 channels (2 heads of 4), one
    GPSA block, then the class token and one MHSA block."""
    from timm.models.convit import ConVit
    args = dict(img_size=image, in_chans=in_channels, patch_size=2, embed_dim=4, num_heads=2, depth=2, mlp_ratio=2,
                local_up_to_layer=1, num_classes=classes)
    return ConVit(**{**args, **kwargs})


def convit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_convit(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def compacts_with_the_same_logits(spec: dict) -> dict:
    """Half of every channel group dead (AGS-CL's node masks on random weights), compacted: the smaller spec's ONNX
    gives the dense one's logits; the compacted spec."""
    import numpy as np
    from random_weights import random_params

    from edgecl.export import compact_task
    from edgecl.export.onnx_export import run_onnx
    from edgecl.graph.builder import build_onnx
    from edgecl.synthetic import group_node_masks

    params, _ = group_node_masks(spec, random_params(spec, 3, 0), 0.5, 0)
    small, small_params, report = compact_task(spec, params, channel_multiple=1)
    assert report.params_compact < report.params_dense
    x = np.random.default_rng(0).random((8, *spec["input_shape"]), dtype=np.float32)
    dense, fewer = run_onnx(build_onnx(spec, params), x), run_onnx(build_onnx(small, small_params), x)
    assert np.abs(dense - fewer).max() <= 1e-4 * max(1.0, np.abs(dense).max())
    return small
