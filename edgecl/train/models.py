"""Torch side of an architecture spec: initial parameters and one functional forward.

Methods keep their own (often re-parametrised) tensors and hand this forward a dict of effective tensors, so every
method runs the exact graph the exporter emits. Convolutions are plain conv2d; their GEMM view is (out, in·k·k).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from edgecl.arch import INPUT, WEIGHT_OPS, Arch, param_shapes
from edgecl.arch.attention_windows import window_of
from edgecl.arch.gpsa_ops import GATED_POS
from edgecl.arch.op_rules import TALKING, has_gain, is_standardized
from edgecl.arch.ops import blur_filter
from edgecl.arch.rotary_ops import rotary_constants
from edgecl.arch.sdta_ops import fourier_grid
from edgecl.train.outlook import outlook_attention
from edgecl.train import distributed
from edgecl.train.attention_forms import (attention, channel_attention, gathered_bias, in_windows, lambda_layer,
                                         linear_attention, patch_context, window_attention)
from edgecl.train.halo_attention import halo_blocks, halo_unblock
from edgecl.train.rel_logits import mlp_bias_table, prefixed_rel_logits, rel_logits

Params = dict[str, torch.Tensor]
# Optional hook applied to each linear/conv output, keyed by layer name (RGO's feature encoding, AGS-CL's
# activation statistics). It receives (layer_name, activation) and returns the activation to continue with.
Hook = Callable[[str, torch.Tensor], torch.Tensor]


def init_params(arch: Arch, n_classes: int | None = None, generator: torch.Generator | None = None) -> Params:
    """Kaiming-uniform weights (torch's nn.Linear/Conv2d/Conv1d default), zero biases, identity BatchNorm, LayerNorm
    and global response norm, standardised convs' gains at 1, layer scales at their ``init`` (ConvNeXt's 1e-6: each
    residual block starts close to the identity), class tokens and position embeddings normal with std 0.02 (as ViTs
    start)."""
    params = _init(param_shapes(arch, n_classes), generator)
    for node in arch["nodes"]:
        if node["op"] == "layer_scale":
            params[f"{node['name']}.weight"].fill_(node["init"])
        if has_gain(node):  # timm's ScaledStdConv2d gain_init
            params[f"{node['name']}.gain"].fill_(1.0)
        if node["op"] == "grn":  # ConvNeXt V2's start: the identity
            params[f"{node['name']}.weight"].zero_()
        if node["op"] == "scalar_affine":  # a fresh LearnableAffineBlock's numbers (1 and 0 in timm)
            params[f"{node['name']}.weight"].fill_(node["init"])
            if node.get("bias", True):
                params[f"{node['name']}.bias"].fill_(node["init_bias"])
        if node["op"] in ("class_token", "pos_embed"):  # timm's start: normal, std 0.02 (the class token's 1e-6
            # would leave every task's token alike; a spread start is what torchvision and timm's pos_embed use)
            weight = params[f"{node['name']}.weight"]
            params[f"{node['name']}.weight"] = torch.randn(weight.shape, generator=generator) * 0.02
        if node["op"] == "channel_attention" and node.get("scale") is None:  # timm's XCA: every head's at 1
            params[f"{node['name']}.temperature"].fill_(1.0)
        if node["op"] == "attention" and node.get("bias_offsets") and not node.get("bias_mlp"):  # LeViT's start:
            # no bias (an MLP-generated one starts from its layers' draw, as timm's)
            params[f"{node['name']}.bias"].zero_()
        if node["op"] == "attention" and node.get("gated_pos"):  # timm's GPSA start: every gate at 1
            params[f"{node['name']}.gating"].fill_(1.0)
        if node["op"] == "attention" and node.get("cosine"):  # Swin V2's start: every head's scores times 10
            params[f"{node['name']}.logit_scale"].fill_(math.log(10))
        if node["op"] == "channel_conv":  # torch's Conv1d(1, 1, k) default: uniform within 1/√k
            bound = 1.0 / math.sqrt(node["k"])
            params[f"{node['name']}.weight"] = (torch.rand(node["k"], generator=generator) * 2 - 1) * bound
    return params


def init_head(arch: Arch, n_classes: int, generator: torch.Generator | None = None) -> Params:
    """A fresh head for one task."""
    return _init({"head.weight": (n_classes, arch["feature_dim"]), "head.bias": (n_classes,)}, generator)


def _init(shapes: dict[str, tuple[int, ...]], generator: torch.Generator | None) -> Params:
    out: Params = {}
    for name, shape in shapes.items():
        if name.endswith("running_var"):
            out[name] = torch.ones(shape)
        elif name.endswith("running_mean"):
            out[name] = torch.zeros(shape)
        elif len(shape) == 1:
            is_bn_scale = name.endswith(".weight")
            out[name] = torch.ones(shape) if is_bn_scale else torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            out[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return out


def forward(arch: Arch, params: Params, x: torch.Tensor, *, train: bool = False, hook: Hook | None = None,
            head: bool = True) -> torch.Tensor:
    """Run the trunk (and the head in `params`) on a batch, node by node. BatchNorm uses batch statistics and updates
    the running statistics in `params` when `train` is true (under several ranks those of the global batch, every
    rank's slice together), running statistics otherwise. Each activation is freed
    after its last reader, so inference holds only the live ones."""
    env = {INPUT: x.reshape((x.shape[0],) + tuple(arch["input_shape"]))}
    remaining = _reader_counts(arch)
    for node in arch["nodes"]:
        h = _apply(node, [env[s] for s in node["inputs"]], params, train)
        if hook is not None and node["op"] in WEIGHT_OPS:
            h = hook(node["name"], h)
        env[node["name"]] = h
        for s in node["inputs"]:
            remaining[s] -= 1
            if remaining[s] == 0 and s != arch["output"]:
                del env[s]
    h = env[arch["output"]]
    if head:
        h = F.linear(h, params["head.weight"], params["head.bias"])
    return h


def _reader_counts(arch: Arch) -> dict[str, int]:
    counts = {INPUT: 0, **{n["name"]: 0 for n in arch["nodes"]}}
    for node in arch["nodes"]:
        for s in node["inputs"]:
            counts[s] += 1
    return counts


_ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
                "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "square": torch.square}


def activation(node: dict, h: torch.Tensor) -> torch.Tensor:
    """An activation node (`edgecl.arch.ops.ACTIVATIONS`) on h; also what AGS-CL measures a node's use by."""
    if node["op"] == "gelu":
        return F.gelu(h, approximate=node["approximate"])
    if node["op"] == "leaky_relu":
        return F.leaky_relu(h, node["slope"])
    return _ACTIVATIONS[node["op"]](h)


def _apply(node: dict, ins: list[torch.Tensor], params: Params, train: bool) -> torch.Tensor:
    """One node of the spec, exactly as `edgecl.graph.builder` emits it in ONNX."""
    op, name, h = node["op"], node["name"], ins[0]
    if op == "conv":
        weight = params[f"{name}.weight"]
        if is_standardized(node):  # of the task's effective weight (`edgecl.graph.standardize`)
            weight = standardized(weight, params.get(f"{name}.gain"), node["standardize"], node["gain_scale"])
        bias = params.get(f"{name}.bias")
        conv = functools.partial(F.conv2d, weight=weight, bias=bias, stride=node["stride"], padding=node["pad"],
                                 dilation=node["dilation"], groups=node["groups"])
        return in_windows(conv, h, *node["window"]) if node.get("window") else conv(h)
    if op == "conv_transpose":  # weight (in, out/groups, kh, kw), as torch stores it
        return F.conv_transpose2d(h, params[f"{name}.weight"], params.get(f"{name}.bias"), node["stride"],
                                  node["pad"], node["output_padding"], node["groups"], node["dilation"])
    if op == "linear":
        return F.linear(h, params[f"{name}.weight"], params.get(f"{name}.bias"))
    if op == "bn":
        if train and distributed.active():  # statistics of the global batch, not of this rank's slice
            return distributed.batch_norm(h, params[f"{name}.running_mean"], params[f"{name}.running_var"],
                                          params[f"{name}.weight"], params[f"{name}.bias"], node["momentum"],
                                          node["eps"])
        return F.batch_norm(h, params[f"{name}.running_mean"], params[f"{name}.running_var"],
                            params[f"{name}.weight"], params[f"{name}.bias"], training=train,
                            momentum=node["momentum"], eps=node["eps"])
    if op == "layer_norm":  # over the channels at each position, as ConvNeXt's permute + LayerNorm computes it
        w, b = params.get(f"{name}.weight"), params.get(f"{name}.bias")
        if node.get("over") == "map":  # a GroupNorm: each of its groups of channels over the whole map of a sample
            return F.group_norm(h, node.get("groups", 1), w, b, node["eps"])
        if node.get("rms"):  # an RMSNorm over the channels at each position, as timm's rms_norm2d
            h = h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + node["eps"])
            return h if w is None else h * w.reshape(-1, *[1] * (h.dim() - 2))
        if h.dim() == 2:
            return F.layer_norm(h, (node["ch"],), w, b, node["eps"])
        return F.layer_norm(h.movedim(1, -1), (node["ch"],), w, b, node["eps"]).movedim(-1, 1)  # (C, H, W), (C, L)
    if op == "layer_scale":  # (C,) over the channels of features (N, C) or of any map (N, C, …); σ(w): a gate
        weight = torch.sigmoid(params[f"{name}.weight"]) if node.get("sigmoid") else params[f"{name}.weight"]
        return h * weight.reshape(-1, *[1] * (h.dim() - 2))
    if op == "affine":  # ResMLP's Affine: a factor and an offset per channel
        w, b = (params[f"{name}.{k}"].reshape(-1, *[1] * (h.dim() - 2)) for k in ("weight", "bias"))
        return torch.addcmul(b, w, h)
    if op == "grn":  # timm's GlobalResponseNorm, on the channels-first map
        g = h.norm(p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + node["eps"])
        return h + torch.addcmul(params[f"{name}.bias"].reshape(-1, 1, 1), params[f"{name}.weight"].reshape(-1, 1, 1),
                                 h * n)
    if op == "normalize":  # F.normalize over the channels, or over each sample's whole map
        if node["over"] == "map":
            return F.normalize(h.flatten(1), dim=1, eps=node["eps"]).reshape(h.shape)
        return F.normalize(h, dim=1, eps=node["eps"])
    if op == "scalar_affine":  # one learned number times every value, plus one: (1,) tensors broadcast
        scaled = h * params[f"{name}.weight"]
        return scaled + params[f"{name}.bias"] if node.get("bias", True) else scaled  # none: NFNet's skipinit gain
    if op == "channel_conv":  # ECA: a 1-D convolution along the channels of the pooled (N, C, 1, 1) vector
        return _channel_conv(h, params[f"{name}.weight"], node["circular"])
    if op == "token_mix":  # MLP-Mixer's Linear over the tokens: (N, C, T, 1) → (N, C, out, 1), every channel alike
        return F.linear(h.squeeze(3), params[f"{name}.weight"], params.get(f"{name}.bias")).unsqueeze(3)
    if op == "class_token":  # (N, C, T, 1) → (N, C, tokens + T, 1), the learned tokens first
        token = params[f"{name}.weight"].reshape(1, node["ch"], -1, 1).expand(h.shape[0], -1, -1, -1)
        return torch.cat([token, h], dim=2)
    if op == "pos_embed":  # a frozen one is a constant: no gradient reaches it, whatever a method steps
        weight = params[f"{name}.weight"]
        weight = weight.detach() if node["frozen"] else weight
        if node.get("resize"):  # HieraDet's: its grid resized to the map, torch's bicubic (`onnx_spatial`'s matrices)
            grid = weight.reshape(1, node["ch"], *node["resize"])
            return h + F.interpolate(grid, size=tuple(h.shape[2:]), mode="bicubic", align_corners=False)
        if node.get("tile"):  # TNT's: every window of the map gets the one embedding
            (wh, ww), (height, width) = node["tile"], h.shape[2:]
            return h + weight.reshape(node["ch"], wh, ww).repeat(1, height // wh, width // ww)
        return h + weight.reshape(h.shape[1:])  # tokens or a map
    if op == "attention":
        table = mlp_bias_table(node, params, [0, *h.shape[2:]]) if node.get("bias_mlp") else \
            params.get(f"{name}.bias")  # an MLP's output (RelPosMlp's, Swin V2's), or the table itself
        bias = gathered_bias(node, table) if node.get("bias_offsets") else None
        cosine = params[f"{name}.logit_scale"] if node.get("cosine") else None
        rel = (params[f"{name}.rel_h"], params[f"{name}.rel_w"]) if node.get("rel_pos") else None
        if window_of(node):
            return window_attention(*ins, node, bias, cosine, rel)
        talking = tuple(params[f"{name}.{k}"] for k in TALKING) if node.get("talking_heads") else None
        gated = tuple(params[f"{name}.{k}"] for k in GATED_POS) if node.get("gated_pos") else None
        blocks = halo_blocks(*ins, node) if node.get("halo_blocks") else ins  # HaloNet: q blocks, k, v windows
        keys = tuple(ins[1].shape[2:]) if node.get("rel_mvit") else None  # MViTv2: pooled keys, their own map
        logits = prefixed_rel_logits(ins[0], node, *rel, ins[1].shape[2]) if node.get("rel_prefix") else \
            rel_logits(blocks[0], node, *rel, keys=keys) if rel else None  # MViTv2's class token: none of its own
        out = attention(*blocks, node["heads"], node["scale"], node["kv_heads"], bias, talking=talking, gated=gated,
                        cosine=cosine, logits=logits)
        return halo_unblock(out, node, *ins[0].shape[2:]) if node.get("halo_blocks") else out
    if op == "linear_attention":
        return linear_attention(*ins, node["heads"], node["eps"], node["kernel"])
    if op == "channel_attention":
        scale = node.get("scale")
        return channel_attention(*ins, params[f"{name}.temperature"] if scale is None else scale, node["eps"],
                                 node.get("normalize", True), node["heads"])
    if op == "lambda_layer":  # local position lambdas (a conv), or a relative embedding
        if node.get("rel_pos"):
            return lambda_layer(*ins, node["heads"], pos_emb=params[f"{name}.pos_emb"])
        return lambda_layer(*ins, node["heads"], params[f"{name}.weight"], params[f"{name}.bias"])
    if op == "outlook_attention":
        return outlook_attention(*ins, node)
    if op == "state_pool":  # EfficientViM's states: x (N, C, H·W) @ (softmax over positions · b)ᵀ → (N, C, S, 1)
        weights = torch.softmax(ins[1].flatten(2), dim=2) * ins[2].flatten(2)
        return (h.flatten(2) @ weights.transpose(1, 2)).unsqueeze(3)
    if op == "state_read":  # the states read back at each position: h (N, C, S) @ c (N, S, H·W)
        return (h.squeeze(3) @ ins[1].flatten(2)).reshape(h.shape[0], h.shape[1], *ins[1].shape[2:])
    if op == "fourier_pos":  # a constant of the map's shape, the same in every sample (`edgecl.arch.sdta_ops`)
        grid = torch.from_numpy(fourier_grid(node["hidden"], node["temperature"], *h.shape[2:])).to(h)
        return grid.unsqueeze(0).expand(h.shape[0], -1, -1, -1)
    if op == "token":
        return h[:, :, node["index"]:node["index"] + node["count"]]
    if op == "rotary":  # RoPE: fixed per-token rotations of channel pairs (`edgecl.arch.rotary_ops`)
        cos, sin, partners = (torch.from_numpy(a).to(h.device) for a in rotary_constants(node, list(h.shape[1:])))
        return h * cos.to(h.dtype) + h[:, partners] * sin.to(h.dtype)
    if op in (*_ACTIVATIONS, "gelu", "leaky_relu"):
        return activation(node, h)
    if op == "maxpool":
        return F.max_pool2d(h, node["k"], node["stride"], node["pad"], node["dilation"], node["ceil_mode"])
    if op == "avgpool":
        return F.avg_pool2d(h, node["k"], node["stride"], node["pad"], node["ceil_mode"], node["count_include_pad"])
    if op == "adaptive_avgpool":  # torch's own windows; ONNX multiplies by the same averages (`onnx_spatial`)
        return F.adaptive_avg_pool2d(h, node["size"])
    if op == "bicubic":  # torch's own resampling; ONNX multiplies by the same weights (`onnx_spatial`)
        return F.interpolate(h, size=tuple(node["size"]), mode="bicubic", align_corners=False)
    if op == "gap":
        return h.mean(dim=(2, 3), keepdim=True)
    if op == "attention_pool" and node.get("patch"):
        return patch_context(h, ins[1], node["patch"])
    if op == "attention_pool":  # GCNet: (N, C, H·W) @ softmax over positions (N, H·W, 1), as timm's GlobalContext
        weights = torch.softmax(ins[1].flatten(1), dim=1).unsqueeze(2)
        return (h.flatten(2) @ weights).unsqueeze(3)
    if op == "pad":
        top, left, bottom, right = node["pads"]
        if node["mode"] != "constant":  # torch's reflect / replicate, ONNX's reflect / edge
            return F.pad(h, (left, right, top, bottom), mode=node["mode"])
        return F.pad(h, (left, right, top, bottom), value=float(node["value"]))
    if op == "blur":  # timm's BlurPool2d after its pad: the fixed binomial filter on each channel
        k, c = node["k"], h.shape[1]
        weight = torch.as_tensor(blur_filter(k), dtype=h.dtype, device=h.device).expand(c, 1, k, k)
        return F.conv2d(h, weight, stride=node["stride"], groups=c)
    if op == "upsample" and node.get("mode") == "bilinear":  # torch's nn.Upsample(scale_factor, "bilinear")
        return F.interpolate(h, scale_factor=tuple(float(s) for s in node["scale"]), mode="bilinear",
                             align_corners=bool(node.get("align_corners")))
    if op == "upsample" and node.get("mode") == "tile":  # the whole map repeated (GC ViT's global query per window)
        return h.repeat(1, 1, *node["scale"])
    if op == "upsample":  # nearest by integer factors: each value repeated, exactly as ONNX Resize below
        return h.repeat_interleave(node["scale"][0], dim=2).repeat_interleave(node["scale"][1], dim=3)
    if op == "scale":  # a factor of 1 or offset of 0 is skipped, as in ONNX: the same float32 steps
        h = h if node["factor"] == 1.0 else h * node["factor"]
        return h if node["offset"] == 0.0 else h + node["offset"]
    if op == "add":
        for other in ins[1:]:
            h = h + other
        return h
    if op == "mul":
        return h * ins[1]
    if op == "cat":
        return torch.cat(ins, dim=1)
    if op == "slice":
        return h[:, node["start"]:node["stop"]]
    if op == "shuffle":  # (N, g, C/g, H, W) transposed to (N, C/g, g, H, W), as ShuffleNet writes it
        n, c, height, width = h.shape
        return h.reshape(n, node["groups"], c // node["groups"], height, width).transpose(1, 2).reshape(h.shape)
    if op == "space_to_depth":  # timm's SpaceToDepth and ONNX's: channel (bh·b + bw)·C + c; "wh": Swin's (bw·b + bh)
        n, c, height, width, b = *h.shape, node["block"]
        perm = (0, 5, 3, 1, 2, 4) if node.get("order") == "wh" else (0, 3, 5, 1, 2, 4)
        return h.reshape(n, c, height // b, b, width // b, b).permute(*perm).reshape(
            n, c * b * b, height // b, width // b)
    if op == "branch_softmax":  # (N, R, C, H, W), softmax over R: timm's SelectiveKernelAttn and RadixSoftmax
        n, c, height, width = h.shape
        return torch.softmax(h.reshape(n, node["branches"], c // node["branches"], height, width), dim=1
                             ).reshape(h.shape)
    if op == "flatten":
        return h.flatten(1)
    if op == "reshape":
        return h.reshape((h.shape[0], *node["shape"]))
    raise ValueError(f"node {name!r}: op {op!r} has no torch form")


def standardized(weight: torch.Tensor, gain: torch.Tensor | None, eps: float, scale: float) -> torch.Tensor:
    """Each filter as gain·scale·(w − mean) / √(var + eps), biased variance (no gain: 1): timm's ScaledStdConv2d
    and StdConv2d compute it by this same ``F.batch_norm`` of the weight, so they agree bit for bit."""
    out = weight.shape[0]
    factor = (gain * scale).reshape(-1) if gain is not None else None if scale == 1.0 else \
        torch.full((out,), scale, dtype=weight.dtype)
    if weight[0].numel() == 1:  # one weight a filter: centred, it is 0 (batch_norm refuses a single value); as the
        return weight - weight  # numpy and ONNX forms compute it (`edgecl.graph.standardize`), gradient 0 too
    return F.batch_norm(weight.reshape(1, out, -1), None, None, weight=factor, training=True, momentum=0.0,
                        eps=eps).reshape_as(weight)


def _channel_conv(h: torch.Tensor, weight: torch.Tensor, circular: bool) -> torch.Tensor:
    """timm's EcaModule / CecaModule on (N, C, 1, 1): the channels as a (N, 1, C) sequence, padded by (k−1)/2 with
    zeros or wrapped around, convolved with the k weights."""
    pad = (weight.shape[0] - 1) // 2
    seq = F.pad(h.reshape(h.shape[0], 1, -1), (pad, pad), mode="circular" if circular else "constant")
    return F.conv1d(seq, weight.reshape(1, 1, -1)).reshape(h.shape)


def to_numpy(params: Params) -> dict:
    """Detached float32 numpy copies, the form `PackedModel` holds."""
    return {k: v.detach().cpu().to(torch.float32).numpy().copy() for k, v in params.items()}


def from_numpy(params: dict, device: str | torch.device = "cpu") -> Params:
    return {k: torch.from_numpy(v.copy()).to(device) for k, v in params.items()}
