"""Small BEiT, relative-position ViTs and EVAs (timm's ``Beit``, ``VisionTransformerRelPos``, ``Eva``) for the tests:
learned q and v biases beside a bias-less qkv, a relative position bias table over the tokens (the class token's rows
and column included), layer scales, EVA-02's SwiGLU and sub-LN, a rotary position embedding."""
from __future__ import annotations

from edgecl.arch.factories import ensure_torchvision_imports

ensure_torchvision_imports()

from torch import nn  # noqa: E402

from edgecl.arch import from_torch  # noqa: E402


def tiny_beit(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's Beit in small: a stride-2 patch embedding to a 4×4 grid of 8 channels and a class token (17 tokens), two
    blocks of 2 heads with q/v biases, each its own relative position bias table, layer scales; mean pooling."""
    from timm.models.beit import Beit
    args = dict(img_size=image, in_chans=in_channels, patch_size=2, num_classes=classes, embed_dim=8, depth=2,
                num_heads=2, mlp_ratio=2, qkv_bias=True, use_abs_pos_emb=False, use_rel_pos_bias=True,
                init_values=0.1)
    return Beit(**{**args, **kwargs})


def tiny_vit_relpos(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's VisionTransformerRelPos in small, its relative position bias a learned table (RelPosBias); no class
    token by default (as vit_relpos_small), average pooling and a norm before the head."""
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    args = dict(img_size=image, in_chans=in_channels, patch_size=2, num_classes=classes, embed_dim=8, depth=2,
                num_heads=2, mlp_ratio=2, rel_pos_type="bias", fc_norm=True, qkv_bias=True)
    return VisionTransformerRelPos(**{**args, **kwargs})


def beit_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_beit(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def vit_relpos_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_vit_relpos(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def vit_relpos_mlp_spec(input_shape=(1, 8, 8)) -> dict:
    """timm's default relative position bias, RelPosMlp: an MLP of the token grid's offsets."""
    return from_torch(tiny_vit_relpos(in_channels=input_shape[0], image=input_shape[1], rel_pos_type="mlp"),
                      tuple(input_shape))


def tiny_eva(classes: int = 3, in_channels: int = 1, image: int = 8, **kwargs) -> nn.Module:
    """timm's Eva in small, by default without a rotary embedding (`use_rot_pos_emb=True` adds it: `eva_rope_spec`):
    EVA-02's SwiGLU MLP with its sub-LN,
    q/v biases beside a bias-less qkv, layer scales, a class token and a learned position embedding."""
    from timm.models.eva import Eva
    args = dict(img_size=image, in_chans=in_channels, patch_size=2, num_classes=classes, embed_dim=8, depth=2,
                num_heads=2, mlp_ratio=2, qkv_bias=True, swiglu_mlp=True, scale_mlp=True, init_values=0.1,
                use_rot_pos_emb=False)
    return Eva(**{**args, **kwargs})


def eva_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(tiny_eva(in_channels=input_shape[0], image=input_shape[1]), tuple(input_shape))


def eva_rope_spec(input_shape=(1, 8, 8)) -> dict:
    """EVA-02 as timm builds it, in small: RoPE on q and k, which come with v from a fused qkv with q/v biases (q, k,
    v each a conv of its rows of that weight)."""
    module = tiny_eva(in_channels=input_shape[0], image=input_shape[1], use_rot_pos_emb=True)
    return from_torch(module, tuple(input_shape))
