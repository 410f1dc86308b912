"""The layer families `from_torch`'s converter is made of: one mixin per family of layers or calls (its own module,
docs/FROM_TORCH.md), gathered here so that `fx_import` holds the tracing and the dispatch alone. The order is the
method resolution order: earlier families answer first where two define the same hook."""
from __future__ import annotations

from edgecl.arch.fx_affine import _AffineConverter
from edgecl.arch.fx_attention import _AttentionConverter
from edgecl.arch.fx_attention2d import _Attention2dConverter
from edgecl.arch.fx_blur import _BlurConverter
from edgecl.arch.fx_byoa import _ByoaConverter
from edgecl.arch.fx_cait import _CaitConverter
from edgecl.arch.fx_calls import _CallConverter
from edgecl.arch.fx_classifier import _ClassifierConverter
from edgecl.arch.fx_coat import _CoatConverter
from edgecl.arch.fx_conv_attention import _ConvAttentionConverter
from edgecl.arch.fx_convit import _ConvitConverter
from edgecl.arch.fx_davit import _DavitConverter
from edgecl.arch.fx_eca import _EcaConverter
from edgecl.arch.fx_efficientvim import _EfficientVimConverter
from edgecl.arch.fx_edgenext import _EdgeNextConverter
from edgecl.arch.fx_efficientformer import _EfficientFormerConverter
from edgecl.arch.fx_efficientvit import _EfficientVitConverter
from edgecl.arch.fx_efficientvit_msra import _EfficientVitMsraConverter
from edgecl.arch.fx_eva import _EvaConverter
from edgecl.arch.fx_gcvit import _GcVitConverter
from edgecl.arch.fx_global_context import _GlobalContextConverter
from edgecl.arch.fx_iformer import _IFormerConverter
from edgecl.arch.fx_hiera import _HieraConverter
from edgecl.arch.fx_hieradet import _HieraDetConverter
from edgecl.arch.fx_lambda import _LambdaConverter
from edgecl.arch.fx_levit import _LevitConverter
from edgecl.arch.fx_maxvit import _MaxVitConverter
from edgecl.arch.fx_mobilevit import _MobileVitConverter
from edgecl.arch.fx_nest import _NestConverter
from edgecl.arch.fx_nextvit import _NextVitConverter
from edgecl.arch.fx_norms import _NormConverter
from edgecl.arch.fx_padding import _PaddingConverter
from edgecl.arch.fx_param_embed import _ParamEmbedConverter
from edgecl.arch.fx_pvt import _PvtConverter
from edgecl.arch.fx_mvit import _MvitConverter
from edgecl.arch.fx_sam import _SamConverter
from edgecl.arch.fx_rms_norm import _RmsNormConverter
from edgecl.arch.fx_shuffle import _ShuffleConverter
from edgecl.arch.fx_shvit import _ShvitConverter
from edgecl.arch.fx_slices import _SliceConverter
from edgecl.arch.fx_space_to_depth import _SpaceToDepthConverter
from edgecl.arch.fx_stack import _StackConverter
from edgecl.arch.fx_split_attn import _SplitAttnConverter
from edgecl.arch.fx_swiftformer import _SwiftFormerConverter
from edgecl.arch.fx_swin import _SwinConverter
from edgecl.arch.fx_swin_v2 import _SwinV2Converter
from edgecl.arch.fx_tiny_vit import _TinyVitConverter
from edgecl.arch.fx_token_mix import _TokenMixConverter
from edgecl.arch.fx_tokens import _TokenConverter
from edgecl.arch.fx_tnt import _TntConverter
from edgecl.arch.fx_twins import _TwinsConverter
from edgecl.arch.fx_vim_head import _VimHeadConverter
from edgecl.arch.fx_volo import _VoloConverter
from edgecl.arch.fx_xcit import _XcitConverter


class Families(_CallConverter, _SliceConverter, _NormConverter, _ShuffleConverter,
               _PaddingConverter, _ClassifierConverter, _EcaConverter, _AffineConverter,
               _SplitAttnConverter, _TokenConverter, _AttentionConverter, _Attention2dConverter,
               _GlobalContextConverter, _SpaceToDepthConverter, _LevitConverter, _SwinConverter,
               _TinyVitConverter, _BlurConverter, _EfficientFormerConverter, _MobileVitConverter,
               _MaxVitConverter, _EfficientVitConverter, _EfficientVitMsraConverter, _EdgeNextConverter,
               _LambdaConverter, _TokenMixConverter, _XcitConverter, _TwinsConverter, _DavitConverter,
               _NestConverter, _PvtConverter, _NextVitConverter, _ShvitConverter, _GcVitConverter,
               _CaitConverter, _ConvitConverter, _CoatConverter, _SwinV2Converter,
               _StackConverter, _VoloConverter, _TntConverter,
               _EvaConverter, _ByoaConverter, _SamConverter, _ConvAttentionConverter,
               _IFormerConverter, _SwiftFormerConverter,
               _RmsNormConverter, _HieraConverter,
               _HieraDetConverter, _ParamEmbedConverter, _MvitConverter,
               _EfficientVimConverter, _VimHeadConverter):
    """Every family's conversions, in one base class."""
