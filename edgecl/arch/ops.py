"""The ops a spec's nodes can have: each op's fields with their kinds and defaults (`OPS`), the families the
rest of edgecl asks about (`WEIGHT_OPS`, `CHANNEL_AFFINE_OPS`, …), and the output shape each op computes from its
inputs' shapes (`output_shape`). `edgecl.arch.spec` validates whole specs with these.

Ops (fields and defaults in `OPS`):
- with tensors: ``conv`` (weight ``(out, in/groups, kh, kw)``, optional bias; with ``standardize`` (an eps) a
  weight-standardised conv, timm's ScaledStdConv2d (NF-ResNet): each filter w is replaced by
  gain·gain_scale·(w − mean(w)) / √(var(w) + eps), mean and (biased) variance over the filter's in/groups·kh·kw
  numbers, tensor ``gain`` ``(out,)`` (its module stores ``(out, 1, 1, 1)``), ``gain_scale`` a constant (timm's
  γ/√fan_in, default 1); ``std_gain`` false: no gain tensor, the factor 1 (timm's StdConv2d, BiT); the rule is
  applied to the task's *effective* weight, whatever delta made it: `edgecl.graph.standardize`; with ``window``
  [wh, ww] it runs on each wh × ww window of the map on its own, zeros padding every window's border, the outputs
  put back side by side: EfficientViT-MSRA's depthwise conv on q; same weights, so every channel and method rule is
  a conv's: `edgecl.arch.windows.conv_window_shape`), ``linear`` (weight ``(out, in)``), ``bn``
  (weight, bias, running_mean, running_var of ``ch`` channels; eps, momentum), ``layer_norm`` (normalises each position
  over its ``ch`` channels, as ConvNeXt's LayerNorm after a permute; eps; weight and bias when ``affine``; or, with
  ``over`` "map" (timm's GroupNorm1, a GroupNorm of one group: MobileViTv2), over the whole (C, H, W) map of a
  sample, its affine still per channel; with ``groups`` G (a GroupNorm of G groups: BiT), over each of the G
  contiguous blocks of C/G channels of the map separately; G 1 is left out of the stored spec; ``bias`` false: the
  weight alone, no bias tensor, as MetaFormer v2's norms (timm's LayerNorm2dNoBias, GroupNorm1NoBias); left out of
  the stored spec at its default true), ``layer_scale``
  (weight: one learned factor per channel, ConvNeXt's γ, starting at ``init``), ``affine`` (y = weight·x + bias,
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
  torch's ``align_corners=True`` (``nn.UpsamplingBilinear2d``), ONNX Resize linear align_corners; each channel alone,
  its weights summing to 1, so either keeps a constant channel constant);
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
  ``(1, ch, H, W)``: ``module_shape``; ``frozen``: a constant, MAE's fixed sin-cos embedding, a parameter with
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
  the heads. Like the bias they belong to no channel (the heads are never pruned). ``rel_pos`` [kh, kw] with
  ``rel_dim`` (and ``rel_scaled``): BotNet's relative position logits, q times learned row and column embeddings
  (tensors ``rel_h``, ``rel_w``), `edgecl.arch.rel_pos`; ``bias_table`` "mlp" with ``bias_mlp`` the hidden width:
  the bias table is an MLP of each offset's log coordinates (timm's RelPosMlp), same place. ``halo_blocks`` [bq, bk] with ``halo`` h: HaloNet's
  blocked attention, each bq × bq query block over its bk × bk key block and h around it, `edgecl.arch.halo`.
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

"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgecl.arch.lambda_ops import lambda_intermediates, lambda_shape
from edgecl.arch.halo import halo_intermediates
from edgecl.arch.rel_pos import rel_intermediates
from edgecl.arch.sdta_ops import SDTA_OPS, sdta_intermediates, sdta_shape
from edgecl.arch.token_shapes import attention_shape, token_shape
from edgecl.arch.windows import check_pool_windows, conv_window_shape, window_length
from edgecl.errors import UsageError

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
             "window": ("pair", None)},
    "linear": {"in": ("size", ...), "out": ("size", ...), "bias": ("bool", True)},
    "bn": {"ch": ("size", ...), "eps": ("eps", 1e-5), "momentum": ("momentum", 0.1)},
    "layer_norm": {"ch": ("size", ...), "eps": ("eps", 1e-5), "affine": ("bool", True), "over": ("norm_over", None),
                   "groups": ("size", None), "bias": ("bool", True)},
    "layer_scale": {"ch": ("size", ...), "init": ("number", 1.0)},
    "affine": {"ch": ("size", ...)},
    "grn": {"ch": ("size", ...), "eps": ("eps", 1e-6)},
    "channel_conv": {"ch": ("size", ...), "k": ("size", ...), "circular": ("bool", False)},
    "scalar_affine": {"init": ("number", 1.0), "init_bias": ("number", 0.0), "bias": ("bool", True)},
    **{act: {} for act in ACTIVATIONS},
    "maxpool": {**_POOL, "dilation": ("pair", [1, 1])},
    "avgpool": {**_POOL, "count_include_pad": ("bool", True)},
    "gap": {},
    "adaptive_avgpool": {"size": ("pair", ...)},
    "attention_pool": {"patch": ("pair", None)},
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
    "pos_embed": {"ch": ("size", ...), "tokens": ("size", ...), "frozen": ("bool", False), "block": ("size", None)},
    "attention": {"heads": ("size", ...), "scale": ("number", ...), "kv_heads": ("size", None),
                  "bias_offsets": ("size", None), "bias_index": ("index_table", None),
                  "bias_table": ("bias_table", None), "window": ("pair", None), "shift": ("pad", None),
                  "talking_heads": ("bool", None), "dilated": ("bool", False), "bias_rows": ("pad", None),
                  "rel_pos": ("pair", None), "rel_dim": ("size", None), "rel_scaled": ("bool", False),
                  "halo_blocks": ("pair", None), "halo": ("index", None), "bias_mlp": ("size", None)},
    "linear_attention": {"heads": ("size", ...), "eps": ("eps", 1e-5), "kernel": ("kernel", "relu")},
    "token": {"index": ("index", 0), "count": ("size", 1)},
    "token_mix": {"in": ("size", ...), "out": ("size", ...), "bias": ("bool", True)},
    "channel_attention": {"heads": ("size", ...), "eps": ("eps", 1e-12), "normalize": ("bool", True),
                          "scale": ("number", None)},
    "fourier_pos": {"hidden": ("size", ...), "temperature": ("number", 10000.0)},
    "lambda_layer": {"heads": ("size", ...), "dim": ("size", ...), "r": ("size", None), "rel_pos": ("pair", None)},
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
ROWLESS_OPS = (*NEIGHBOUR_OPS, "scalar_affine", "attention", "channel_attention", "lambda_layer", "token_mix")
# learned values added to (or put among) the tokens, one row per channel like a bias: a method keeps them as biases
TOKEN_TENSOR_OPS = ("class_token", "pos_embed")
TENSOR_OPS = ("conv", "linear", *CHANNEL_AFFINE_OPS, *ROWLESS_OPS, *TOKEN_TENSOR_OPS)


def blur_filter(k: int) -> np.ndarray:
    """The ``blur`` op's (k, k) float32 filter, as timm's BlurPool2d computes it: binomial taps, summing to 1."""
    taps = np.array([math.comb(k - 1, j) for j in range(k)], dtype=np.float64) / 2 ** (k - 1)
    return np.outer(taps, taps).astype(np.float32)


def intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Elements per sample a node computes on the way to its output, as `edgecl.graph.builder` emits it (0 for
    most). ``attention``: the scores and their softmax (heads × T_q × T_kv each: quadratic in the positions, so a
    small spec file can ask for a huge one; `spec.validate` bounds it) and the heads' copies of q, k, v and the output
    (an upper bound); ``attention_pool``: the logits' softmax and reshaped copies of the logits and the map (an upper
    bound); ``adaptive_avgpool``: the map averaged along its width only, (C, H, w), between its two MatMuls; a conv
    with ``window``: its input and output, each once more in the windows' order."""
    if node["op"] == "attention":
        (cq, *q), (ck, *k), (cv, _, _) = ins
        tq, tk, h = math.prod(q), math.prod(k), node["heads"]
        out = cv * h // (node.get("kv_heads") or h)
        if node.get("halo_blocks"):  # HaloNet's blocks and haloed windows
            return halo_intermediates(node, ins) + rel_intermediates(node, tq)
        if node.get("window"):  # each query meets the w = wh·ww keys of its window; the scores, their masked sum and
            # softmax; q, k, v and the output rolled, partitioned and transposed (an upper bound)
            w = math.prod(node["window"])
            return 3 * h * tq * w + (h * w * w if node.get("bias_offsets") else 0) + 3 * (cq + ck + cv + out) * tq
        bias = h * tq * tk if node.get("bias_offsets") else 0  # the gathered (heads, T_q, T_kv) bias
        bias += 4 * h * tq * tk if node.get("talking_heads") else 0  # the mixed scores and weights, their sums
        bias += rel_intermediates(node, tq)  # BotNet's relative position logits
        return 2 * h * tq * tk + bias + 2 * (cq * tq + ck * tk) + 2 * (cv * tk + out * tq)
    if node["op"] == "linear_attention":  # q, k relu'd and reshaped; v reshaped; the heads' dv × d sums, the
        # numerator, the keys' sums, the denominator and the quotient before its reshape (an upper bound)
        (cq, *hw), (ck, _, _), (cv, _, _) = ins
        t, h = math.prod(hw), node["heads"]
        return 2 * (cq + ck) * t + 3 * cv * t + cv * (cq // h) + ck + 2 * h * t
    if node["op"] in SDTA_OPS:
        return sdta_intermediates(node, ins)
    if node["op"] == "lambda_layer":
        return lambda_intermediates(node, ins)
    if node["op"] == "attention_pool":  # with patches: the map and logits transposed, their product, the pool
        return 2 * math.prod(ins[1]) + (3 if node.get("patch") else 1) * math.prod(ins[0])
    if node["op"] == "layer_norm" and node.get("over") == "map":  # its mean, centred map, square, normalised map
        return 4 * math.prod(ins[0])
    if node["op"] == "adaptive_avgpool":
        return ins[0][0] * ins[0][1] * node["size"][1]
    if node["op"] == "token_mix":  # the MatMul's output before the bias is added
        return ins[0][0] * node["out"]
    if node["op"] == "conv" and node.get("window"):  # the input in windows and the conv's windowed output: Transposes
        return math.prod(ins[0]) + math.prod(conv_window_shape(node, ins[0], node["name"]))
    return 0


def output_shape(node: dict[str, Any], ins: list[list[int]], where: str = "node") -> list[int]:
    """Shape (without batch) of a normalised node's output from its inputs' shapes; UsageError when they do not
    fit the op."""
    op, x = node["op"], ins[0]
    if op == "linear":
        if x != [node["in"]]:
            raise UsageError(f"{where}: linear expects [{node['in']}] features, gets {x}")
        return [node["out"]]
    if op in ("conv", "maxpool", "avgpool"):
        if len(x) != 3:
            raise UsageError(f"{where}: {op} needs a (channels, height, width) input, gets {x}")
        if op == "conv":
            if x[0] != node["in"]:
                raise UsageError(f"{where}: conv expects {node['in']} channels, gets {x}")
            g = node["groups"]
            if node["in"] % g or node["out"] % g:
                raise UsageError(f"{where}: groups={g} must divide in={node['in']} and out={node['out']}")
        if op == "conv" and node.get("window"):
            return conv_window_shape(node, x, where)
        pad = node["pad"]
        dil = node.get("dilation", [1, 1])
        if op != "conv" and any(2 * p > k for p, k in zip(pad, node["k"])):
            raise UsageError(f"{where}: pad {pad} must be at most half the window {node['k']}")
        hw = [window_length(x[1 + a], node["k"][a], node["stride"][a], pad[a], dil[a], node.get("ceil_mode", False))
              for a in range(2)]
        if min(hw) <= 0:
            raise UsageError(f"{where}: the window {node['k']} does not fit the input {x}; output would be empty")
        if op != "conv":
            check_pool_windows(node, x, hw, where)
        return [node["out"] if op == "conv" else x[0], *hw]
    if op in CHANNEL_AFFINE_OPS:
        of_map = op == "grn" or node.get("over") == "map"  # statistics over the map (GRN, GroupNorm1)
        if x[0] != node["ch"] or of_map and len(x) != 3:
            raise UsageError(f"{where}: {op} has {node['ch']} channels{' of a map' * of_map}, gets {x}")
        return list(x)
    if op == "channel_conv":
        k, c = node["k"], node["ch"]
        if x != [c, 1, 1] or k % 2 == 0 or node["circular"] and k // 2 > c:
            raise UsageError(f"{where}: channel_conv needs a pooled ({c}, 1, 1) input and an odd k (circular: at most "
                             f"{2 * c + 1}), gets {x} and k={k}")
        return list(x)
    if op == "attention":
        return attention_shape(node, ins, where)
    if op == "linear_attention":
        q, k, v = ins
        h = node["heads"]
        if len(q) != 3 or q != k or v[1:] != q[1:] or q[0] % h or v[0] % h:
            raise UsageError(f"{where}: linear_attention needs maps q and k of {h} heads of d channels and v of {h} "
                             f"heads, all at the same positions, gets {ins}")
        return list(v)
    if op in SDTA_OPS:
        return sdta_shape(node, ins, where)
    if op == "lambda_layer":
        return lambda_shape(node, ins, where)
    if op in (*TOKEN_TENSOR_OPS, "token", "token_mix"):
        return token_shape(node, ins, where)
    if op == "shuffle":
        if len(x) != 3 or x[0] % node["groups"]:
            raise UsageError(f"{where}: shuffle needs a (channels, height, width) input whose channels "
                             f"{node['groups']} groups divide, gets {x}")
        return list(x)
    if op == "branch_softmax":
        if len(x) != 3 or x[0] % node["branches"]:
            raise UsageError(f"{where}: branch_softmax needs a (channels, height, width) input whose channels "
                             f"{node['branches']} branches divide, gets {x}")
        return list(x)
    if op == "adaptive_avgpool":
        if len(x) != 3 or max(node["size"]) > MAX_ADAPTIVE or max(x[1:]) > MAX_ADAPTIVE_INPUT:
            raise UsageError(f"{where}: adaptive_avgpool needs a (channels, height, width) map of sides at most "
                             f"{MAX_ADAPTIVE_INPUT} and a size of at most {MAX_ADAPTIVE}, gets {x} and "
                             f"size={node['size']}")
        return [x[0], *node["size"]]
    if op == "gap":
        if len(x) != 3:
            raise UsageError(f"{where}: gap needs a (channels, height, width) input, gets {x}")
        return [x[0], 1, 1]
    if op == "attention_pool":
        patch = node.get("patch") or x[1:]  # one patch: the whole map
        if len(x) != 3 or ins[1] != [1, *x[1:]] or x[1] % patch[0] or x[2] % patch[1]:
            raise UsageError(f"{where}: attention_pool needs a (channels, height, width) map and (1, height, width) "
                             f"logits (and patches that tile the map), gets {ins} and patch {node.get('patch')}")
        return list(x) if node.get("patch") else [x[0], 1, 1]
    if op == "space_to_depth":
        b = node["block"]
        if len(x) != 3 or x[1] % b or x[2] % b:
            raise UsageError(f"{where}: space_to_depth needs a (channels, height, width) map whose height and width "
                             f"block={b} divides, gets {x}")
        return [x[0] * b * b, x[1] // b, x[2] // b]
    if op == "pad":
        return _pad_shape(node, x, where)
    if op == "blur":
        k, s = node["k"], node["stride"]
        if len(x) != 3 or not 2 <= k <= MAX_BLUR or min(x[1:]) < k:
            raise UsageError(f"{where}: blur needs a (channels, height, width) map at least k × k and k from 2 to "
                             f"{MAX_BLUR}, gets {x} and k={k}")
        return [x[0], *(window_length(d, k, s, 0, 1, False) for d in x[1:])]
    if op == "upsample":
        if len(x) != 3:
            raise UsageError(f"{where}: upsample needs a (channels, height, width) input, gets {x}")
        return [x[0], x[1] * node["scale"][0], x[2] * node["scale"][1]]
    if op == "flatten":
        return [math.prod(x)]
    if op == "reshape":
        if math.prod(node["shape"]) != math.prod(x):
            raise UsageError(f"{where}: cannot reshape {x} to {node['shape']}")
        return list(node["shape"])
    if op == "add":  # equal shapes, or spatial axes of 1 broadcast (never the channels: channel i meets channel i)
        out = [max(d) for d in zip(*ins)]
        if any(len(s) != len(x) or s[0] != x[0] or any(d not in (1, o) for d, o in zip(s[1:], out[1:])) for s in ins):
            raise UsageError(f"{where}: add needs equal shapes or spatial axes of 1, gets {ins}")
        return out
    if op == "mul":
        a, b = ins
        if len(a) != len(b) or any(p != q and 1 not in (p, q) for p, q in zip(a, b)):
            raise UsageError(f"{where}: mul needs broadcastable shapes of one rank, gets {a} and {b}")
        return [max(p, q) for p, q in zip(a, b)]
    if op == "cat":
        if any(len(s) != len(x) or s[1:] != x[1:] for s in ins):
            raise UsageError(f"{where}: cat needs inputs that differ only in channels, gets {ins}")
        return [sum(s[0] for s in ins), *x[1:]]
    if op == "slice":
        if not node["start"] < node["stop"] <= x[0]:
            raise UsageError(f"{where}: slice {node['start']}:{node['stop']} must be a non-empty range of the input's "
                             f"{x[0]} channels")
        return [node["stop"] - node["start"], *x[1:]]
    return list(x)  # element-wise activations


def _pad_shape(node: dict[str, Any], x: list[int], where: str) -> list[int]:
    """Output shape of ``pad``; a reflection must be smaller than the side it mirrors (torch and ONNX refuse
    otherwise), and only a constant pad has a value."""
    if len(x) != 3:
        raise UsageError(f"{where}: pad needs a (channels, height, width) input, gets {x}")
    top, left, bottom, right = node["pads"]
    mode = node["mode"]
    if mode != "constant" and node["value"] != 0.0:
        raise UsageError(f"{where}: pad mode {mode!r} takes no value (gets {node['value']}); only mode 'constant' does")
    if (problem := crop_problem(x, node["pads"], mode, node["value"])) is not None:
        raise UsageError(f"{where}: {problem}")
    if mode == "reflect" and (max(top, bottom) >= x[1] or max(left, right) >= x[2]):
        raise UsageError(f"{where}: reflect pad {node['pads']} (top, left, bottom, right) must be smaller than the "
                         f"input's height and width {x[1:]}")
    return [x[0], x[1] + top + bottom, x[2] + left + right]


def crop_problem(x: list[int], pads: list[int], mode: str, value: Any) -> str | None:
    """Why negative ``pads`` (top, left, bottom, right; a crop, as torch's F.pad and ONNX Pad take them) cannot
    apply to a (C, H, W) map, or None: a crop leaves at least one row and column, crops only with mode 'constant'
    (which torch and ONNX agree on) and never with a -inf fill (which exists for a max pool's windows)."""
    if min(pads) >= 0:
        return None
    top, left, bottom, right = pads
    if x[1] + top + bottom < 1 or x[2] + left + right < 1 or min(top, bottom) <= -x[1] or min(left, right) <= -x[2]:
        return f"pad {pads} (top, left, bottom, right) crops the whole {x[1]}×{x[2]} map away"
    if mode != "constant" or value in ("-inf", -math.inf):
        return (f"pad {pads} crops (negative sides) with mode {mode!r} and value {value!r}; a crop needs mode "
                "'constant' and a finite value")
    return None
