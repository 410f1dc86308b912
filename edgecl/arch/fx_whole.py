"""The library blocks `from_torch`'s tracer keeps whole (their forwards hold views or Python branches the spec has no
nodes for), each with the `fx_import._Converter` method that converts it, and those of them that may read
channels-last values; judged by class, the libraries not imported. And what makes a leaf layer's call other than
its class's forward (`check_plain_call`)."""
from __future__ import annotations

from torch import nn

from edgecl.arch.fx_attention import is_timm_attention
from edgecl.arch.fx_blur import is_blur_pool
from edgecl.arch.fx_byoa import is_byoa_attention
from edgecl.arch.fx_davit import is_davit_channel, is_davit_spatial
from edgecl.arch.fx_eca import is_eca
from edgecl.arch.fx_edgenext import is_sdta_block
from edgecl.arch.fx_efficientformer import is_efficientformer_attention
from edgecl.arch.fx_efficientvit import is_lite_mla
from edgecl.arch.fx_efficientvit_msra import is_local_window_attention
from edgecl.arch.fx_global_context import is_global_context
from edgecl.arch.fx_lambda import is_lambda_layer
from edgecl.arch.fx_levit import is_levit
from edgecl.arch.fx_maxvit import is_attention2d, is_maxvit
from edgecl.arch.fx_mobilevit import is_mobilevit
from edgecl.arch.fx_nest import is_nest_level
from edgecl.arch.fx_norms import is_grn
from edgecl.arch.fx_space_to_depth import is_space_to_depth
from edgecl.arch.fx_split_attn import is_split_attention
from edgecl.arch.fx_swin import is_swin
from edgecl.arch.fx_tiny_vit import is_tiny_vit_block
from edgecl.arch.fx_twins import is_twins_attention
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
         (is_byoa_attention, "byoa_attention"), (is_attention2d, "attention2d"))
# may read channels-last values
ON_TOKENS = (is_grn, is_timm_attention, is_levit, is_swin, is_tiny_vit_block, is_maxvit, is_xcit_xca, is_xcit_lpi,
             is_class_attn, is_twins_attention, is_davit_channel)


def check_plain_call(m: nn.Module, path: str) -> bool:
    """A layer edgecl keeps whole is converted from its class and attributes, not traced: a forward set on the
    instance (``m.forward = …``) or a forward hook or pre-hook (which may change its input or output) is code the
    conversion never sees, so the spec would silently be another network; refused by name. True: it may be a leaf."""
    extra = ["a forward set on the instance"] if "forward" in vars(m) else []
    extra += [f"{len(h)} forward {kind}" for kind, h in (("hook(s)", m._forward_hooks),
                                                        ("pre-hook(s)", m._forward_pre_hooks)) if h]
    if extra:
        raise UsageError(f"layer {type(m).__name__} at {path!r} has {' and '.join(extra)}: edgecl converts it by "
                         "its class and attributes, so what that code computes would be silently left out; remove "
                         "it (or call it from a module of your own, which is traced) before from_torch")
    return True
