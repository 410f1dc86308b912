"""Small instances of timm's class-attention and convolutional-attention transformers for from_torch's tests and the
methods' graph runs: CaiT (talking-heads attention, class-attention blocks), ConViT (gated positional attention),
CoaT-Lite (factorised attention with a convolutional position encoding)."""
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


def tiny_coat(classes: int = 3, in_channels: int = 1, image: int = 32, **kwargs) -> nn.Module:
    """timm's CoaT-Lite in small (its stages need an image of at least 32), one serial block per stage (timm shares a
    stage's position encodings among its blocks, which edgecl refuses): stride-4 patches to an (image / 4)² grid of
    8 channels, then stride-2 patch embeddings; 2 heads, the crpe's 3×3 conv on one head and 5×5 on the other."""
    from timm.models.coat import CoaT
    args = dict(img_size=image, in_chans=in_channels, patch_size=4, embed_dims=[8, 8, 8, 8], serial_depths=[1] * 4,
                num_heads=2, mlp_ratios=[2] * 4, crpe_window={3: 1, 5: 1}, num_classes=classes)
    return CoaT(**{**args, **kwargs})


class TinyCoatStage(nn.Module):
    """One CoaT-Lite stage of timm's layers for 8×8 inputs: a stride-2 conv to 4×4 tokens of 8 channels, a class
    token, a SerialBlock (ConvPosEnc, factorised attention of 2 heads with its 3×3 and 5×5 crpe convs, MLP), the
    class token's norm and a Linear."""

    def __init__(self, classes: int = 3, in_channels: int = 1):
        super().__init__()
        import torch
        from timm.models.coat import ConvPosEnc, ConvRelPosEnc, SerialBlock
        self.embed = nn.Conv2d(in_channels, 8, 2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.block = SerialBlock(8, num_heads=2, mlp_ratio=2, qkv_bias=True, shared_cpe=ConvPosEnc(8, k=3),
                                 shared_crpe=ConvRelPosEnc(head_chs=4, num_heads=2, window={3: 1, 5: 1}))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.embed(x)
        size = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = self.block(torch_cat(self.cls_token, x), size=size)
        return self.head(self.norm(x)[:, 0])


def torch_cat(cls_token, x):
    """The class token put before the tokens (timm's insert_cls)."""
    import torch
    return torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)


def coat_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyCoatStage(in_channels=input_shape[0]), tuple(input_shape))


def round_trips_into_the_module(module: nn.Module, spec: dict) -> dict:
    """The spec's tensors read from the module and written back as its state (`to_module_state`): every key is one
    of the module's, of its shape, with its values; the state written."""
    import numpy as np

    from edgecl.arch.fx_import import tensors_of
    from edgecl.arch.module_state import to_module_state

    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    back = to_module_state(spec, tensors_of(module, spec))
    assert all(k in state and np.array_equal(v, state[k]) for k, v in back.items())
    return back
