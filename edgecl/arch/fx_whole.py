"""The library blocks `from_torch`'s tracer keeps whole (their forwards hold views or Python branches the spec has no
nodes for), each with the `fx_import._Converter` method that converts it, and those of them that may read
channels-last values; judged by class, the libraries not imported. And what makes a leaf layer's call other than
its class's forward (`check_plain_call`)."""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _torch_module

from edgecl.arch.fx_attention import is_timm_attention
from edgecl.arch.fx_blur import is_blur_pool
from edgecl.arch.fx_byoa import is_byoa_attention
from edgecl.arch.fx_cait import is_talking_head_attn
from edgecl.arch.fx_coat import is_factor_attn
from edgecl.arch.fx_conv_attention import is_conv_attention
from edgecl.arch.fx_convit import is_convit_mhsa, is_gpsa
from edgecl.arch.fx_davit import is_davit_channel, is_davit_spatial
from edgecl.arch.fx_eca import is_eca
from edgecl.arch.fx_efficientvim import is_hsm_ssd, is_vim_block
from edgecl.arch.fx_edgenext import is_sdta_block
from edgecl.arch.fx_efficientformer import is_efficientformer_attention, is_efficientformer_v1_attention
from edgecl.arch.fx_efficientvit import is_lite_mla
from edgecl.arch.fx_efficientvit_msra import is_local_window_attention
from edgecl.arch.fx_eva import is_eva_attention
from edgecl.arch.fx_gcvit import is_gcvit_block
from edgecl.arch.fx_iformer import is_shma
from edgecl.arch.fx_hiera import is_hiera
from edgecl.arch.fx_hieradet import is_hieradet_block
from edgecl.arch.fx_global_context import is_global_context
from edgecl.arch.fx_lambda import is_lambda_layer
from edgecl.arch.fx_levit import is_levit
from edgecl.arch.fx_maxvit import is_attention2d, is_maxvit
from edgecl.arch.fx_mobilevit import is_mobilevit
from edgecl.arch.fx_mvit import is_mvit_block
from edgecl.arch.fx_nest import is_nest_level
from edgecl.arch.fx_nextvit import is_nextvit_attention
from edgecl.arch.fx_norms import is_grn
from edgecl.arch.fx_pvt import is_pvt_stage
from edgecl.arch.fx_sam import is_sam_block
from edgecl.arch.fx_rms_norm import is_rms_norm_2d
from edgecl.arch.fx_shvit import is_shvit_attention
from edgecl.arch.fx_space_to_depth import is_space_to_depth
from edgecl.arch.fx_split_attn import is_split_attention
from edgecl.arch.fx_swiftformer import is_swiftformer_attention
from edgecl.arch.fx_swin import is_swin
from edgecl.arch.fx_tiny_vit import is_tiny_vit_block
from edgecl.arch.fx_tnt import is_pixel_embed, is_tnt_block
from edgecl.arch.fx_twins import is_twins_attention
from edgecl.arch.fx_volo import is_outlook, is_volo_attention
from edgecl.arch.fx_xcit import is_class_attn, is_xcit_lpi, is_xcit_pos, is_xcit_xca
from edgecl.errors import UsageError

# library blocks the tracer keeps whole, each converted by a mixin's method(node, module, input, path)
WHOLE = ((is_grn, "global_response_norm"), (is_eca, "eca"), (is_split_attention, "split_attention"),
         (is_timm_attention, "timm_attention"), (is_global_context, "global_context"), (is_swin, "swin"),
         (is_space_to_depth, "space_to_depth"), (is_levit, "levit"), (is_tiny_vit_block, "tiny_vit_block"),
         (is_blur_pool, "blur_pool"), (is_efficientformer_attention, "efficientformer_attention"),
         (is_mobilevit, "mobilevit"), (is_maxvit, "maxvit"), (is_lite_mla, "lite_mla"),
         (is_local_window_attention, "local_window_attention"), (is_sdta_block, "sdta_block"),
         (is_lambda_layer, "lambda_layer"), (is_xcit_xca, "xcit_xca"), (is_xcit_lpi, "xcit_lpi"),
         (is_xcit_pos, "xcit_pos"), (is_class_attn, "class_attn"), (is_twins_attention, "twins_attention"),
         (is_davit_spatial, "davit_spatial"), (is_davit_channel, "davit_channel"), (is_nest_level, "nest_level"),
         (is_pvt_stage, "pvt_stage"), (is_nextvit_attention, "nextvit_attention"),
         (is_shvit_attention, "shvit_attention"), (is_gcvit_block, "gcvit_block"),
         (is_talking_head_attn, "talking_head_attn"), (is_gpsa, "gpsa"), (is_convit_mhsa, "convit_mhsa"),
         (is_factor_attn, "factor_attn"),
         (is_outlook, "outlook"), (is_volo_attention, "volo_attention"), (is_pixel_embed, "pixel_embed"),
         (is_tnt_block, "tnt_block"), (is_eva_attention, "eva_attention"),
         (is_byoa_attention, "byoa_attention"), (is_attention2d, "attention2d"), (is_sam_block, "sam_block"),
         (is_conv_attention, "conv_attention"), (is_shma, "shma"),
         (is_swiftformer_attention, "swiftformer_attention"), (is_rms_norm_2d, "rms_norm"),
         (is_hiera, "hiera"), (is_hieradet_block, "hieradet_block"),
         (is_mvit_block, "mvit_block"),
         (is_hsm_ssd, "hsm_ssd"), (is_vim_block, "vim_block"))
# may read channels-last values
ON_TOKENS = (is_grn, is_timm_attention, is_levit, is_swin, is_tiny_vit_block, is_maxvit, is_xcit_xca, is_xcit_lpi,
             is_class_attn, is_twins_attention, is_davit_channel, is_pvt_stage, is_nextvit_attention, is_gcvit_block,
             is_talking_head_attn, is_gpsa, is_convit_mhsa, is_factor_attn,
             is_outlook, is_volo_attention, is_eva_attention, is_sam_block,
             is_efficientformer_v1_attention, is_hiera, is_hieradet_block,
             is_mvit_block)


_LEFT_OUT = (" by its class and attributes, so what that code computes would be silently left out; remove it (or call "
             "it from a module of your own, which is traced) before from_torch")


def check_plain_call(m: nn.Module, path: str) -> bool:
    """A layer edgecl keeps whole is converted from its class and attributes, not traced: a forward set on the
    instance (``m.forward = …``) or a forward hook or pre-hook (which may change its input or output), on it or on
    any layer inside it (a hook on an attention's ``qkv``), is code the conversion never sees, so the spec would
    silently be another network; refused by name, as are hooks registered for every module (torch's global ones).
    True: it may be a leaf."""
    for sub_path, sub in m.named_modules():
        extra = ["a forward set on the instance"] if "forward" in vars(sub) else []
        extra += [f"{len(h)} forward {kind}" for kind, h in (("hook(s)", sub._forward_hooks),
                                                            ("pre-hook(s)", sub._forward_pre_hooks)) if h]
        if extra:
            inside = f" (inside {type(m).__name__} at {path!r})" if sub_path else ""
            raise UsageError(f"layer {type(sub).__name__} at {'.'.join(filter(None, (path, sub_path)))!r}{inside} "
                             f"has {' and '.join(extra)}: edgecl converts {'the layer around it' if sub_path else 'it'}"
                             f"{_LEFT_OUT}")
    # hooks registered for every module (register_module_forward_hook): they run in the layer's call too
    extra = [f"{len(h)} global forward {kind} (torch.nn.modules.module.register_module_forward_{name})"
             for kind, name, h in (("hook(s)", "hook", getattr(_torch_module, "_global_forward_hooks", {})),
                                   ("pre-hook(s)", "pre_hook", getattr(_torch_module, "_global_forward_pre_hooks",
                                                                       {}))) if h]
    if extra:
        raise UsageError(f"layer {type(m).__name__} at {path!r} has {' and '.join(extra)}: edgecl converts it"
                         f"{_LEFT_OUT}")
    return True


def shared_parameters(root: nn.Module, converted: set[str]) -> dict[int, list[str]]:
    """Parameter (by id) → its names under the modules and attributes the graph reads (`converted`: call_module
    and get_attr targets), for each parameter read under two names or more (tied weights). A name the graph never
    reads is an alias (``self.classifier = self.fc``): fx calls a module by one name, so it becomes no tensor."""
    names: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if any(".".join(parts[:i]) in converted for i in range(1, len(parts) + 1)):
            names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def check_unshared(model: str, m: nn.Module, path: str, shared: dict[int, list[str]]) -> None:
    """A layer converted from its attributes (a Conv2d, Linear or BatchNorm, or a library block kept whole) names its
    tensors by its own path, so a tensor it shares with another place (`b.weight = a.weight`, an attention assigned
    to two blocks) would become two in the spec, trained apart: refused, as a layer called twice is (`fx_import`'s
    `one_call`)."""
    for name, p in m.named_parameters():
        if id(p) in shared:
            others = [n for n in shared[id(p)] if n != f"{path}.{name}"]
            raise UsageError(f"{model}: {type(m).__name__} at {path!r}: its tensor {name!r} is also {others[:3]} "
                             "(shared weights); edgecl needs one use per layer")
