"""The ops a spec's nodes can have: each op's fields with their kinds and defaults (`OPS`), the families the
rest of edgecl asks about (`WEIGHT_OPS`, `CHANNEL_AFFINE_OPS`, …), and the output shape each op computes from its
inputs' shapes (`edgecl.arch.op_shapes`). `edgecl.arch.spec` validates whole specs with these.

Ops (fields and defaults in `OPS`):
- with tensors: ``conv`` (weight ``(out, in/groups, kh, kw)``, optional bias; with ``standardize`` (an eps) a
  weight-standardised conv, timm's ScaledStdConv2d (NF-ResNet): each filter w is replaced by
  gain·gain_scale·(w − mean(w)) / √(var(w) + eps), mean and (biased) variance over the filter's in/groups·kh·kw
  numbers, tensor ``gain`` ``(out,)`` (its module stores ``(out, 1, 1, 1)``), ``gain_scale`` a constant (timm's
  γ/√fan_in, default 1); ``std_gain`` false: no gain tensor, the factor 1 (timm's StdConv2d, BiT); the rule is
  applied to the task's *effective* weight, whatever delta made it: `edgecl.graph.standardize`; with ``window``
  [wh, ww] it runs on each wh × ww window of the map on its own, zeros padding every window's border, the outputs
  put back side by side: EfficientViT-MSRA's depthwise conv on q; same weights, so every channel and method rule is
  a conv's: `edgecl.arch.windows.conv_window_shape`; ``bias_parts``: where its module stores the bias, in equal
  parts, storage only: `edgecl.arch.bias_parts`; ``weight_rows`` [part, parts]: its weight is that row block of its
  module's, storage only: `op_rules.row_table`, ``fused_bias`` with it: its bias the same rows of the module's
  fused bias, a bias-less part's rows a fixed zero: `op_rules.zero_rows`), ``conv_transpose`` (a transposed
  convolution, weight ``(in, out/groups, kh, kw)`` as torch stores it; its tensors belong to no channel:
  `edgecl.arch.conv_transpose`), ``linear`` (weight ``(out, in)``), ``bn``
  (weight, bias, running_mean, running_var of ``ch`` channels; eps, momentum), ``layer_norm`` (normalises each position
  over its ``ch`` channels, as ConvNeXt's LayerNorm after a permute; eps; weight and bias when ``affine``; or, with
  ``over`` "map" (timm's GroupNorm1, a GroupNorm of one group: MobileViTv2), over the whole (C, H, W) map of a
  sample, its affine still per channel; with ``groups`` G (a GroupNorm of G groups: BiT), over each of the G
  contiguous blocks of C/G channels of the map separately; G 1 is left out of the stored spec; ``bias`` false: the
  weight alone, no bias tensor, as MetaFormer v2's norms (timm's LayerNorm2dNoBias, GroupNorm1NoBias); left out of
  the stored spec at its default true; ``rms`` true: an RMSNorm over the channels, x / √(mean of x² + eps) · weight,
  no mean subtracted and no bias, timm's RmsNorm2d (MobileNetV5); left out at its default false), ``layer_scale``
  (weight: one learned factor per channel, ConvNeXt's γ, starting at ``init``; with ``sigmoid`` the factor is
  σ(weight), a gate in (0, 1): EfficientViM's x + σ(α[i])·(f(x) − x); ``weight_rows`` [part, parts]: its weight is
  row ``part`` of its module's (parts, ch) tensor, storage only: `op_rules.row_table`), ``affine`` (y = weight·x + bias,
  one learned factor and offset per channel, starting at 1 and 0: ResMLP's ``Affine`` norm, timm's
  ``torch.addcmul(beta, alpha, x)``; its module stores them as ``MODULE.alpha`` and ``MODULE.beta``, both in the
  ``module_shape`` when given, timm's ``(1, 1, C)``), ``grn`` (ConvNeXt V2's
  global response norm: x + bias + weight·x·n, n = each channel's spatial L2 norm over the channels' mean of it + eps;
  weight and bias start at 0, the identity), ``channel_conv`` (ECA channel attention's 1-D convolution along the
  channels of a pooled ``(ch, 1, 1)`` vector: output channel i is Σ_j weight[j] · x[i + j − (k−1)/2], its ``k`` (odd)
  neighbours, past the ends zero or, when ``circular`` (timm's CecaModule), wrapped around; weight ``(k,)``: not per
  channel, so its input's channels are pinned and keep their order), ``scalar_affine`` (PP-HGNetV2's learnable affine
  block: y = weight·x + bias with one learned number each, weight ``(1,)`` starting at ``init`` and bias ``(1,)`` at
  ``init_bias``, on any tensor; its module stores them as ``MODULE.scale`` and ``MODULE.bias``; they belong to no
  channel, and a channel that is 0 before it is ``bias`` after it; ``bias`` false: y = weight·x, no bias tensor,
  the weight a bare parameter named by the node, NFNet's ``skipinit_gain``) — tensor names are ``NODE.weight`` etc.; an optional
  ``module`` names the layer's path in the traced module where the node's name had to differ (a layer_scale's: its
  parameter's path), and an optional ``module_shape`` the shape in which that module stores the weight where it differs
  by axes of 1 (a 1×1 conv that is an ``nn.Linear`` applied over the channels stores ``(out, in)``; a γ of shape ``(C,
  1, 1)``) (`edgecl.arch.module_state`);
- ``normalize``: L2 normalisation, ``F.normalize``: each position's vector over the channels divided by max(its L2
  norm, ``eps``) (``over`` "channels", the default), or with ``over`` "map" the whole (C, H, W) map of a sample by
  the norm of all its values (SwiftFormer's additive attention normalises its one-channel token scores over the
  tokens); no tensors; every output depends on every channel, so its input's channels are pinned, and a zero vector
  stays 0;
- element-wise: ``relu relu6 hardswish hardsigmoid silu sigmoid gelu tanh``, ``square`` (x²: MetaFormer's StarReLU
  and squared ReLU), ``leaky_relu`` (its ``slope``), and ``scale`` (x·factor + offset with two constant numbers:
  arithmetic with a Python number, a negation);
- ``pad``: a map padded with a constant ``value`` (0, or ``"-inf"``, read by max pools only, whose every window
  holds a real value: `op_rules.check_minus_inf_pads`), ``pads`` =
  [top, left, bottom, right] rows/columns: TensorFlow's "same" padding, which adds the odd one at the bottom and
  right, and ``F.pad``; ``mode`` ``"reflect"`` (the map mirrored about its edge row/column, which is not repeated:
  each pad smaller than that side) or ``"replicate"`` (the edge repeated; ONNX's "edge") instead of the constant
  ``"constant"`` (their ``value`` stays 0): per channel, and a channel constant over the map stays that constant;
- ``blur``: anti-aliased downsampling's fixed filter (timm's BlurPool2d after its pad): each channel convolved with
  the normalised ``k`` × ``k`` binomial filter (`blur_filter`: the outer product of row k−1 of Pascal's triangle over
  2^(k−1), ``k`` from 2 to `MAX_BLUR`) at ``stride``, without padding; no tensors (the filter follows from ``k``), per
  channel, and its taps sum to 1, so a constant channel stays that constant;
- pooling: ``maxpool`` / ``avgpool`` (k, stride, pad, ceil_mode; avgpool's count_include_pad), ``gap`` (global
  average → ``(C, 1, 1)``), ``adaptive_avgpool`` (torch's adaptive average pooling to ``size`` [h, w] where it is
  no plain pool, as VGG's 2×2 → 7×7: output row i averages input rows ⌊i·H/h⌋ to ⌈(i+1)·H/h⌉ − 1, windows of unequal
  lengths that may overlap; a fixed linear map per axis, each row summing to 1; ``size`` at most `MAX_ADAPTIVE` and
  the input's sides at most `MAX_ADAPTIVE_INPUT`, which bounds the work), ``attention_pool`` (GCNet's global
  context: inputs a ``(C, H, W)`` map x and ``(1, H, W)`` logits; softmax of the logits over the H·W positions, then
  each channel's sum of x weighted by it → ``(C, 1, 1)``; the weights sum to 1, so a channel constant over the map pools
  to that constant, as under ``gap``; with ``patch`` [ph, pw], MobileViTv2's context vector: the softmax and sum run
  over the positions at each offset of the map's ph × pw patches separately, and each position gets its offset's
  pool, ``(C, H, W)``); ``upsample`` (by the integer ``scale`` of each spatial axis; ``mode``
  "nearest": every value repeated, or "bilinear": torch's ``align_corners=False`` interpolation, ONNX Resize linear
  half_pixel, as EfficientFormerV2's strided attention up-samples, or with ``align_corners`` true (bilinear only)
  torch's ``align_corners=True`` (``nn.UpsamplingBilinear2d``), ONNX Resize linear align_corners, or "tile": the
  whole map repeated side by side, out[i] = in[i mod size], ONNX Tile, as GC ViT shares its global query with every
  window; each channel alone,
  its weights summing to 1, so either keeps a constant channel constant), ``bicubic`` (torch's ``F.interpolate(x,
  size, mode="bicubic", align_corners=False)`` to ``size`` [h, w], any ratio: CrossViT scales its input to a second
  branch's side; cubic convolution with A = −0.75, source (i + ½)·in/out − ½, the four taps' indices clamped to the
  map; a fixed linear map per axis whose rows sum to 1, so a constant channel stays constant; sides at most
  `MAX_ADAPTIVE_INPUT`);
- structure: ``add`` (residual sum of equal shapes; an input's spatial axes of size 1 broadcast, as GCNet's fused add
  of a ``(C, 1, 1)`` context over a ``(C, H, W)`` map — the channels never do), ``mul`` (broadcast product, e.g.
  squeeze-and-excitation gates), ``cat`` (channel concatenation), ``slice`` (channels ``start`` to ``stop``, of a map
  or of a feature vector: ``x[:, a:b]``, one part of ``torch.split``/``chunk``), ``shuffle`` (ShuffleNet's channel
  shuffle of a map: its C channels as ``groups`` × C/groups, transposed: output channel j·groups + i is input
  channel i·C/groups + j),
  ``space_to_depth`` (TResNet's stem, ONNX's SpaceToDepth: each ``block`` × ``block`` patch into channels; output
  channel (bh·block + bw)·C + c at (i, j) is input channel c at (i·block + bh, j·block + bw): ``block``² copies of the
  input's channels side by side, each of another sub-grid; ``order`` ``"wh"``: channel (bw·block + bh)·C + c, Swin's
  patch merging's x0, x1, x2, x3 = (0, 0), (1, 0), (0, 1), (1, 1)),
  ``flatten``, ``reshape`` (to ``shape``);
- ``branch_softmax``: split attention's softmax across ``branches`` (selective kernel, ResNeSt): the input's R·C
  channels are R consecutive blocks of C, one per branch, and output channel r·C + c is softmax over r' of input
  channel r'·C + c — each channel's R logits compete, channels never mix (the channel map ties the R blocks
  channel by channel, as an ``add`` of them would; removing channel c of every block leaves the others' values);
- tokens (Vision Transformers), a ``(C, T, 1)`` map of T tokens of C channels: ``class_token`` (``tokens`` learned
  tokens put before the others, T → T + tokens: a class token, DeiT's distillation token, register tokens; weight
  ``(ch,)`` for one, ``(ch, tokens)`` for several, which the module stores ``(1, tokens, ch)``), ``pos_embed``
  (weight ``(ch, tokens)``: added to the tokens; its module stores it ``(1, tokens, ch)``; or added to a feature map
  ``(ch, H, W)`` of H·W = ``tokens`` positions, row-major, as PiT and Visformer add theirs, whose module stores it
  ``(1, ch, H, W)``: ``module_shape``, or with ``channels_last`` ``(1, H, W, ch)``, VOLO's; with ``tile`` [wh, ww] one
  embedding of ``tokens`` = wh·ww positions added to every wh × ww window of the map, TNT's pixel embedding;
  with ``resize`` [gh, gw] one embedding of a gh × gw grid (``tokens`` = gh·gw, stored ``(1, ch, gh, gw)``) resized
  to the map by torch's bicubic interpolation (``F.interpolate(pos_embed, size=(H, W), mode="bicubic")``, the
  ``bicubic`` op's numbers) and added, HieraDet's (SAM 2) global embedding;
  ``frozen``: a constant, MAE's fixed sin-cos embedding, a parameter with
  ``requires_grad=False``: no method trains it and an artifact stores it once, `spec.frozen_tensors`), ``token``
  (``count`` tokens from ``index``, as ``(C, count, 1)``: class-token pooling, or the tokens after the class and
  register tokens that a ViT's average pooling reads);
- ``attention`` (inputs q, k, v; over the positions of ``(C, H, W)`` maps, tokens being ``(C, T, 1)``; per head, a
  contiguous block of channels: softmax((scale·q)ᵀk) over the keys times v): q has ``heads`` blocks of d channels, k
  ``kv_heads`` blocks of d (default: ``heads``) and v ``kv_heads`` blocks of dv, at the keys' positions, which may be
  fewer than the queries' (a strided key/value path); q's head i reads k's and v's block i // (heads / kv_heads) —
  ``kv_heads`` 1 is multi-query attention (MobileNetV4's ``MultiQueryAttention2d``: one key and value head shared by
  every query head). The output is ``(heads·dv, H_q, W_q)``, head-major; its heads × T_q × T_kv scores are bounded
  like an output, `intermediates`. With ``bias_offsets`` B, a learned additive bias per head (LeViT's attention
  biases): tensor ``bias`` ``(heads, B)``, a table of B relative offsets, and ``bias_index``, a fixed T_q × T_kv list
  of offsets in [0, B); head i's score of query t and key s gets ``bias[i, bias_index[t][s]]`` before the softmax.
  The table is what trains (positions at one offset share one number, as in LeViT), the index never changes; B is
  at most T_q·T_kv, so the table is bounded by the scores. The bias belongs to no channel (`ROWLESS_OPS`: the heads
  are never pruned); its module stores it as ``MODULE.attention_biases`` (timm's name), or with ``bias_table``
  ``"swin"`` as ``MODULE.relative_position_bias_table`` stored ``(B, heads)`` (Swin's name and layout), or ``"tf"``
  under that name stored ``(heads, 2·wh − 1, 2·ww − 1)`` (TensorFlow MaxViT's; a window, B = (2·wh − 1)(2·ww − 1)).
  ``bias_rows`` [first, of] (LeViT's layout only): the module's ``attention_biases`` holds ``of`` heads' rows and
  this node's heads are rows first … first + heads − 1 of it (EfficientViT-MSRA's cascade: one attention node per
  head, each reading its row of the one table); storage only, the node computes as without it. The nodes naming
  one table agree on ``of`` and ``bias_offsets`` and hold each of its rows once.
  With ``window`` [wh, ww] (Swin's window attention, `edgecl.arch.attention_windows`) it attends within each
  non-overlapping wh × ww window of the map (q, k and v at the same positions, ``kv_heads`` = ``heads``, windows
  that tile the map); T_q = T_kv = wh·ww for the bias, and the scores are heads × H·W × wh·ww. ``shift`` [sh, sw]
  (each below the window's side) rolls the map by (−sh, −sw) first, masks the pairs from different regions of the
  roll, and rolls the output back: Swin's shifted windows. ``dilated`` true spreads each window's wh × ww positions
  at stride (H/wh, W/ww): attention among the positions at one offset of an (H/wh) × (W/ww) tiling — MaxViT's grid
  attention, MobileViT's attention across patches — with no shift; bias, bound and scores as a window's. The
  channel map is attention's, unchanged. ``talking_heads`` true
  (EfficientFormerV2's talking heads; kv_heads = heads, no window) mixes the heads' scores by a learned heads × heads
  matrix and bias before the softmax (tensors ``talk1_weight``, ``talk1_bias``) and the softmax's weights by a second
  one after it (``talk2_weight``, ``talk2_bias``): its module's ``talking_head1`` / ``talking_head2`` 1×1 convs over
  the heads; with ``talking_linear`` true (CaiT's ``TalkingHeadAttn``) its ``proj_l`` / ``proj_w`` ``nn.Linear``s
  over the heads, stored (heads, heads) (the same mixes: storage only). Like the bias they belong to no channel (the
  heads are never pruned). ``gated_pos`` true: ConViT's gated positional attention, `edgecl.arch.gpsa_ops`. ``cosine``
  true (Swin V2's scaled cosine attention; kv_heads = heads, no talking heads, no gated_pos): each head's q and k are
  L2-normalised over its d channels (divided by max(‖·‖, 1e-12), ``F.normalize``) and their scores multiplied by the
  head's exp(min(logit_scale, ln 100)) as well as ``scale``; tensor ``logit_scale`` ``(heads,)``, its module's
  ``MODULE.logit_scale`` stored ``(heads, 1, 1)`` (V2-CR's ``(heads,)``: `edgecl.arch.mlp_bias`), starting at ln 10 (timm's), belonging to no channel. ``rel_pos``
  [kh, kw] with ``rel_dim`` (and ``rel_scaled``): BotNet's relative position logits, q times learned row and column
  embeddings (tensors ``rel_h``, ``rel_w``), `edgecl.arch.rel_pos` (also within each unshifted window: SAM's; with
  ``rel_mvit`` read at the query's offset minus the key's, MViTv2's and SAM's form, q and k then on maps of any
  sizes, ``rel_pos`` the larger; ``rel_prefix`` p with ``rel_query`` and ``rel_key``, the maps: q and k as tokens
  whose first p, MViTv2's class token, get no logits); ``bias_table`` "mlp" with
  ``bias_mlp`` the hidden width: the bias table is an MLP of each offset's log coordinates (timm's RelPosMlp;
  ``bias_mlp_form`` "swin_v2" with ``bias_mlp_span``, Swin V2's continuous position bias, "rel_pos_swin" (with it
  too), RelPosMlp's mode 'swin', or "swin_v2_cr", V2-CR's meta MLP), `edgecl.arch.mlp_bias`. ``halo_blocks`` [bq, bk] with ``halo`` h: HaloNet's blocked attention, each
  bq × bq query block over its bk × bk key block and h around it, `edgecl.arch.halo`.
- ``token_mix`` (MLP-Mixer's token mixing, timm's ``mlp_tokens``: an ``nn.Linear`` over the token axis of
  ``x.transpose(1, 2)``): a ``(C, in, 1)`` token map to ``(C, out, 1)``, output token t of channel c is
  Σ_s weight[t, s]·x[c, s] + bias[t]; weight ``(out, in)``, bias ``(out,)`` when ``bias``; every channel alone, by the
  same matrix. Its rows and columns are token positions, not channels: its tensors belong to no channel
  (`ROWLESS_OPS`: no node, no pruning; methods keep them per task), and a channel constant over the tokens is not
  constant after it (the constants rule treats it as varying).
- EdgeNeXt's ``channel_attention`` (XCA: attention among a head's channels, over the positions) and ``fourier_pos``
  (its sine–cosine position grid, a pure function of the map's shape): `edgecl.arch.sdta_ops`.
- LambdaNetworks' ``lambda_layer`` (content and local position lambdas, or with ``rel_pos`` relative ones, timm's
  LambdaLayer): `edgecl.arch.lambda_ops`.
- VOLO's ``outlook_attention`` (attention within each k × k window, its weights predicted per window):
  `edgecl.arch.outlook_ops`.
- ``rotary`` (a rotary position embedding on q or k, EVA-02's and the RoPE ViTs': fixed per-token rotations of channel
  pairs within each head, its ``table`` part of the architecture): `edgecl.arch.rotary_ops`.
- EfficientViM's hidden-state mixer: ``state_pool`` (x, logits, b → (C, S, 1): the map's positions summed into S
  states, weighted by each state's softmax over the positions times b) and ``state_read`` (states h, a map c of S
  channels → (C, H, W): h·c at each position); no tensors, no fields: `edgecl.arch.state_ops`.

"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgecl.arch.conv_transpose import CONV_TRANSPOSE_FIELDS
from edgecl.arch.outlook_ops import OUTLOOK_FIELDS

MAX_NUMBER = 3.0e38  # a `scale` constant must be a float32: ONNX and the runtime compute in float32
# float32's smallest normal: a smaller eps rounds to 0 (or a denormal) and a zero channel (a node AGS-CL zeroed) is
# 0 / 0 = NaN in F.normalize's max(‖x‖, eps), a BatchNorm's var + eps, a standardised filter's
MIN_EPS = 1.1754943508222875e-38
MAX_BLUR = 16  # a blur filter's largest side: its binomial taps C(k−1, j) / 2^(k−1) are exact float32 numbers
MAX_ADAPTIVE, MAX_ADAPTIVE_INPUT = 64, 4096  # adaptive_avgpool's output and input sides: matrices of out × in
PAD_MODES = ("constant", "reflect", "replicate")  # torch F.pad's; ONNX Pad's "constant", "reflect", "edge"
ACTIVATIONS = ("relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "tanh", "leaky_relu",
               "square")

# op → {field: (kind, default)}; a default of `...` means required. Kinds: size (int ≥ 1), pair (two sizes; an int
# is taken for both), pad (two ints ≥ 0), pads (four ints; a negative one crops), bool, eps, momentum, approximate,
# shape, axis, number (a finite float), fill (a number or "-inf"), pad_mode (one of `PAD_MODES`), upsample_mode
# ("nearest" or "bilinear").
_POOL = {"k": ("pair", ...), "stride": ("pair", None), "pad": ("pad", [0, 0]), "ceil_mode": ("bool", False)}
OPS: dict[str, dict[str, tuple[str, Any]]] = {
    "conv": {"in": ("size", ...), "out": ("size", ...), "k": ("pair", ...), "stride": ("pair", [1, 1]),
             "pad": ("pad", [0, 0]), "dilation": ("pair", [1, 1]), "groups": ("size", 1), "bias": ("bool", True),
             "standardize": ("eps", None), "gain_scale": ("number", None), "std_gain": ("bool", None),
             "window": ("pair", None), "bias_parts": ("bias_parts", None), "weight_rows": ("pad", None),
             "fused_bias": ("bool", False)},
    "conv_transpose": CONV_TRANSPOSE_FIELDS,
    "linear": {"in": ("size", ...), "out": ("size", ...), "bias": ("bool", True)},
    "bn": {"ch": ("size", ...), "eps": ("eps", 1e-5), "momentum": ("momentum", 0.1)},
    "layer_norm": {"ch": ("size", ...), "eps": ("eps", 1e-5), "affine": ("bool", True), "over": ("norm_over", None),
                   "groups": ("size", None), "bias": ("bool", True), "rms": ("bool", False)},
    "layer_scale": {"ch": ("size", ...), "init": ("number", 1.0), "sigmoid": ("bool", False),
                    "weight_rows": ("pad", None)},
    "affine": {"ch": ("size", ...)},
    "grn": {"ch": ("size", ...), "eps": ("eps", 1e-6)},
    "normalize": {"over": ("norm_over", "channels"), "eps": ("eps", 1e-12)},
    "channel_conv": {"ch": ("size", ...), "k": ("size", ...), "circular": ("bool", False)},
    "scalar_affine": {"init": ("number", 1.0), "init_bias": ("number", 0.0), "bias": ("bool", True)},
    **{act: {} for act in ACTIVATIONS},
    "maxpool": {**_POOL, "dilation": ("pair", [1, 1])},
    "avgpool": {**_POOL, "count_include_pad": ("bool", True)},
    "gap": {},
    "adaptive_avgpool": {"size": ("pair", ...)},
    "attention_pool": {"patch": ("pair", None)},
    "bicubic": {"size": ("pair", ...)},
    "upsample": {"scale": ("pair", ...), "mode": ("upsample_mode", "nearest"), "align_corners": ("bool", False)},
    "pad": {"pads": ("pads", ...), "value": ("fill", 0.0), "mode": ("pad_mode", "constant")},
    "blur": {"k": ("size", ...), "stride": ("size", 2)},
    "scale": {"factor": ("number", 1.0), "offset": ("number", 0.0)},
    "add": {},
    "mul": {},
    "cat": {"axis": ("axis", 1)},
    "slice": {"start": ("index", 0), "stop": ("size", ...)},
    "shuffle": {"groups": ("size", ...)},
    "space_to_depth": {"block": ("size", ...), "order": ("order", "hw")},
    "branch_softmax": {"branches": ("size", ...)},
    "flatten": {},
    "reshape": {"shape": ("shape", ...)},
    "class_token": {"ch": ("size", ...), "tokens": ("size", 1)},
    "pos_embed": {"ch": ("size", ...), "tokens": ("size", ...), "frozen": ("bool", False), "block": ("size", None),
                  "channels_last": ("bool", False), "tile": ("pair", None),
                  "resize": ("pair", None)},
    "attention": {"heads": ("size", ...), "scale": ("number", ...), "kv_heads": ("size", None),
                  "bias_offsets": ("size", None), "bias_index": ("index_table", None),
                  "bias_table": ("bias_table", None), "window": ("pair", None), "shift": ("pad", None),
                  "talking_heads": ("bool", None), "dilated": ("bool", False), "bias_rows": ("pad", None),
                  "talking_linear": ("bool", False), "gated_pos": ("bool", False),
                  "cosine": ("bool", None),

                  "rel_pos": ("pair", None), "rel_dim": ("size", None), "rel_scaled": ("bool", False),
                  "rel_mvit": ("bool", False), "rel_prefix": ("size", None), "rel_query": ("pair", None),
                  "rel_key": ("pair", None),
                  "halo_blocks": ("pair", None), "halo": ("index", None), "bias_mlp": ("size", None),
                  "bias_mlp_form": ("bias_mlp_form", None), "bias_mlp_span": ("pair", None)},
    "linear_attention": {"heads": ("size", ...), "eps": ("eps", 1e-5), "kernel": ("kernel", "relu")},
    "token": {"index": ("index", 0), "count": ("size", 1)},
    "token_mix": {"in": ("size", ...), "out": ("size", ...), "bias": ("bool", True)},
    "channel_attention": {"heads": ("size", ...), "eps": ("eps", 1e-12), "normalize": ("bool", True),
                          "scale": ("number", None)},
    "fourier_pos": {"hidden": ("size", ...), "temperature": ("number", 10000.0)},
    "lambda_layer": {"heads": ("size", ...), "dim": ("size", ...), "r": ("size", None), "rel_pos": ("pair", None)},
    "outlook_attention": OUTLOOK_FIELDS,
    "state_pool": {},
    "state_read": {},
    "rotary": {"heads": ("size", ...), "prefix": ("index", 0), "half": ("bool", False), "table": ("number_table", ...)},
}
OPS["gelu"] = {"approximate": ("approximate", "none")}
OPS["leaky_relu"] = {"slope": ("number", 0.01)}  # torch's negative_slope
WEIGHT_OPS = ("conv", "linear")
# per-channel affine layers: BatchNorm, LayerNorm over channels, layer scale (a method's `batchnorm` rule covers them)
CHANNEL_AFFINE_OPS = ("bn", "layer_norm", "layer_scale", "affine", "grn")
NORMALISING_OPS = ("layer_norm", "grn")  # statistics over the channels: each output depends on all of them
# each output channel reads its neighbours: the input's channels can be neither removed nor reordered
NEIGHBOUR_OPS = ("channel_conv",)
# tensors that belong to no channel (ECA's k weights, a scalar affine's two numbers, an attention's bias table): no
# row, no node, no pruning
ROWLESS_OPS = (*NEIGHBOUR_OPS, "scalar_affine", "attention", "channel_attention", "lambda_layer", "token_mix",
               "conv_transpose")
# learned values added to (or put among) the tokens, one row per channel like a bias: a method keeps them as biases
TOKEN_TENSOR_OPS = ("class_token", "pos_embed")
TENSOR_OPS = ("conv", "linear", *CHANNEL_AFFINE_OPS, *ROWLESS_OPS, *TOKEN_TENSOR_OPS)


def blur_filter(k: int) -> np.ndarray:
    """The ``blur`` op's (k, k) float32 filter, as timm's BlurPool2d computes it: binomial taps, summing to 1."""
    taps = np.array([math.comb(k - 1, j) for j in range(k)], dtype=np.float64) / 2 ** (k - 1)
    return np.outer(taps, taps).astype(np.float32)
