"""The spec graphs `gpu_check` checks for parity beyond the presets: together they carry every op the ONNX
builder emits, so a GPU run meets each one on the CUDA execution provider."""
from __future__ import annotations

# a residual add, a channel concatenation, a depthwise conv and an SE gate, as a spec (no torch needed)
GRAPH = {"name": "rescat", "input_shape": [3, 16, 16], "nodes": [
    {"name": "stem", "op": "conv", "inputs": ["input"], "in": 3, "out": 8, "k": 3, "pad": 1, "bias": False},
    {"name": "stem_bn", "op": "bn", "inputs": ["stem"], "ch": 8}, {"name": "r0", "op": "relu", "inputs": ["stem_bn"]},
    {"name": "a", "op": "conv", "inputs": ["r0"], "in": 8, "out": 8, "k": 3, "pad": 1},
    {"name": "res", "op": "add", "inputs": ["r0", "a"]},
    {"name": "dw", "op": "conv", "inputs": ["res"], "in": 8, "out": 8, "k": 3, "pad": 1, "groups": 8},
    {"name": "dw_act", "op": "silu", "inputs": ["dw"]}, {"name": "cat", "op": "cat", "inputs": ["res", "dw_act"]},
    {"name": "sq", "op": "gap", "inputs": ["cat"]},
    {"name": "se1", "op": "conv", "inputs": ["sq"], "in": 16, "out": 4, "k": 1},
    {"name": "se_act", "op": "relu", "inputs": ["se1"]},
    {"name": "se2", "op": "conv", "inputs": ["se_act"], "in": 4, "out": 16, "k": 1},
    {"name": "gate", "op": "sigmoid", "inputs": ["se2"]}, {"name": "gated", "op": "mul", "inputs": ["cat", "gate"]},
    {"name": "pool", "op": "gap", "inputs": ["gated"]}, {"name": "flat", "op": "flatten", "inputs": ["pool"]}]}
# a ConvNeXt block (LayerNorm, a bias-less one and a square as MetaFormer v2's, MLP as 1×1 convs, global response
# norm, layer scale), a ShuffleNet shuffle, TensorFlow's "same" padding (pad nodes of zeros and of −∞), BlurPool
# (reflect pad, blur, replicate pad) and adaptive average pooling of unequal windows (two MatMuls)
NORMS = {"name": "norms", "input_shape": [3, 16, 16], "nodes": [
    {"name": "stem", "op": "conv", "inputs": ["input"], "in": 3, "out": 8, "k": 2, "stride": 2},
    {"name": "ln0", "op": "layer_norm", "inputs": ["stem"], "ch": 8, "eps": 1e-6},
    {"name": "dw", "op": "conv", "inputs": ["ln0"], "in": 8, "out": 8, "k": 3, "pad": 1, "groups": 8},
    {"name": "ln1", "op": "layer_norm", "inputs": ["dw"], "ch": 8, "eps": 1e-6, "bias": False},  # MetaFormer v2's
    {"name": "fc1", "op": "conv", "inputs": ["ln1"], "in": 8, "out": 16, "k": 1},
    {"name": "act", "op": "gelu", "inputs": ["fc1"]}, {"name": "sq", "op": "square", "inputs": ["act"]},  # StarReLU's
    {"name": "grn", "op": "grn", "inputs": ["sq"], "ch": 16},
    {"name": "fc2", "op": "conv", "inputs": ["grn"], "in": 16, "out": 8, "k": 1},
    {"name": "gamma", "op": "layer_scale", "inputs": ["fc2"], "ch": 8, "init": 1e-6},
    {"name": "res", "op": "add", "inputs": ["ln0", "gamma"]},
    {"name": "mix", "op": "shuffle", "inputs": ["res"], "groups": 2},
    {"name": "tf_pad", "op": "pad", "inputs": ["mix"], "pads": [0, 0, 1, 1]},
    {"name": "even", "op": "conv", "inputs": ["tf_pad"], "in": 8, "out": 8, "k": 2},
    {"name": "max_pad", "op": "pad", "inputs": ["even"], "pads": [0, 0, 1, 1], "value": "-inf"},
    {"name": "max", "op": "maxpool", "inputs": ["max_pad"], "k": 3, "stride": 2},
    {"name": "aa_pad", "op": "pad", "inputs": ["max"], "pads": [1, 1, 1, 1], "mode": "reflect"},
    {"name": "aa", "op": "blur", "inputs": ["aa_pad"], "k": 3, "stride": 2},
    {"name": "edge_pad", "op": "pad", "inputs": ["aa"], "pads": [0, 1, 1, 0], "mode": "replicate"},
    {"name": "adaptive", "op": "adaptive_avgpool", "inputs": ["edge_pad"], "size": [5, 2]},
    {"name": "pool", "op": "gap", "inputs": ["adaptive"]}, {"name": "flat", "op": "flatten", "inputs": ["pool"]},
    {"name": "feat_ln", "op": "layer_norm", "inputs": ["flat"], "ch": 8}], "output": "feat_ln"}

# the layer families added later: TResNet's space_to_depth, a weight-standardised conv (NF-ResNet), a scalar affine
# (HGNetV2), ECA's channel_conv, GCNet's attention_pool and broadcast add, split attention's branch_softmax, Swin's
# shifted window attention, EfficientViT's linear attention, MobileViTv2's GroupNorm1 (and MetaFormer v2's bias-less
# one) and patch context, BiT's GroupNorm of 4 groups, EdgeNeXt's Fourier grid and channel attention, and a ViT
# block on the (C, T, 1) token map (register tokens, class token, position embedding, attention, token pooling)
LAYERS = {"name": "layers", "input_shape": [3, 16, 16], "nodes": [
    {"name": "s2d", "op": "space_to_depth", "inputs": ["input"], "block": 2},
    {"name": "stem", "op": "conv", "inputs": ["s2d"], "in": 12, "out": 8, "k": 1, "standardize": 1e-5,
     "gain_scale": 0.5},
    {"name": "act", "op": "relu", "inputs": ["stem"]},
    {"name": "lab", "op": "scalar_affine", "inputs": ["act"], "init": 0.9, "init_bias": 0.1},
    {"name": "eca_pool", "op": "gap", "inputs": ["lab"]},
    {"name": "eca", "op": "channel_conv", "inputs": ["eca_pool"], "ch": 8, "k": 3},
    {"name": "eca_gate", "op": "sigmoid", "inputs": ["eca"]}, {"name": "eca_out", "op": "mul", "inputs": ["lab", "eca_gate"]},
    {"name": "gc_logits", "op": "conv", "inputs": ["eca_out"], "in": 8, "out": 1, "k": 1},
    {"name": "gc_pool", "op": "attention_pool", "inputs": ["eca_out", "gc_logits"]},
    {"name": "gc_fc", "op": "conv", "inputs": ["gc_pool"], "in": 8, "out": 8, "k": 1},
    {"name": "gc", "op": "add", "inputs": ["eca_out", "gc_fc"]},
    {"name": "path0", "op": "conv", "inputs": ["gc"], "in": 8, "out": 8, "k": 3, "pad": 1},
    {"name": "path1", "op": "conv", "inputs": ["gc"], "in": 8, "out": 8, "k": 3, "pad": 2, "dilation": 2},
    {"name": "paths", "op": "add", "inputs": ["path0", "path1"]}, {"name": "sk_pool", "op": "gap", "inputs": ["paths"]},
    {"name": "sk_fc", "op": "conv", "inputs": ["sk_pool"], "in": 8, "out": 16, "k": 1},
    {"name": "sk_soft", "op": "branch_softmax", "inputs": ["sk_fc"], "branches": 2},
    {"name": "w0", "op": "slice", "inputs": ["sk_soft"], "start": 0, "stop": 8},
    {"name": "w1", "op": "slice", "inputs": ["sk_soft"], "start": 8, "stop": 16},
    {"name": "p0", "op": "mul", "inputs": ["path0", "w0"]}, {"name": "p1", "op": "mul", "inputs": ["path1", "w1"]},
    {"name": "sk", "op": "add", "inputs": ["p0", "p1"]},
    {"name": "w_qkv", "op": "conv", "inputs": ["sk"], "in": 8, "out": 24, "k": 1},
    *({"name": f"w{p}", "op": "slice", "inputs": ["w_qkv"], "start": 8 * i, "stop": 8 * i + 8}
      for i, p in enumerate("qkv")),
    {"name": "w_attend", "op": "attention", "inputs": ["wq", "wk", "wv"], "heads": 2, "scale": 0.5, "window": [4, 4],
     "shift": [2, 2], "bias_offsets": 49, "bias_table": "swin", "bias_index": [  # Swin's relative position index
         [(t // 4 - s // 4 + 3) * 7 + t % 4 - s % 4 + 3 for s in range(16)] for t in range(16)]},
    {"name": "w_res", "op": "add", "inputs": ["sk", "w_attend"]},
    {"name": "g_attend", "op": "attention", "inputs": ["w_res", "w_res", "w_res"], "heads": 2, "scale": 0.5,
     "window": [2, 4], "dilated": True},  # grid attention (MobileViT, MaxViT): positions 4 rows, 2 columns apart
    {"name": "g_res", "op": "add", "inputs": ["w_res", "g_attend"]},
    {"name": "l_norm", "op": "layer_norm", "inputs": ["g_res"], "ch": 8, "over": "map"},  # MobileViTv2's GroupNorm1
    {"name": "l_norm_nb", "op": "layer_norm", "inputs": ["l_norm"], "ch": 8, "over": "map", "bias": False},  # its
    # bias-less form (MetaFormer v2's GroupNorm1NoBias)
    {"name": "gn_norm", "op": "layer_norm", "inputs": ["l_norm_nb"], "ch": 8, "over": "map", "groups": 4},  # BiT's
    {"name": "l_attend", "op": "linear_attention", "inputs": ["gn_norm"] * 3, "heads": 2},  # EfficientViT's
    {"name": "l_logits", "op": "conv", "inputs": ["l_attend"], "in": 8, "out": 1, "k": 1},
    {"name": "l_context", "op": "attention_pool", "inputs": ["l_attend", "l_logits"], "patch": [2, 2]},  # MobileViTv2
    {"name": "l_res", "op": "add", "inputs": ["g_res", "l_context"]},
    {"name": "e_grid", "op": "fourier_pos", "inputs": ["l_res"], "hidden": 4},  # EdgeNeXt's position grid
    {"name": "e_pos", "op": "conv", "inputs": ["e_grid"], "in": 8, "out": 8, "k": 1},
    {"name": "e_in", "op": "add", "inputs": ["l_res", "e_pos"]},
    {"name": "e_attend", "op": "channel_attention", "inputs": ["e_in"] * 3, "heads": 2},  # EdgeNeXt's XCA
    {"name": "e_res", "op": "add", "inputs": ["e_in", "e_attend"]},
    {"name": "lam_k", "op": "conv", "inputs": ["e_res"], "in": 8, "out": 4, "k": 1},
    {"name": "lam_v", "op": "conv", "inputs": ["e_res"], "in": 8, "out": 4, "k": 1},
    {"name": "lam", "op": "lambda_layer", "inputs": ["e_res", "lam_k", "lam_v"], "heads": 2, "dim": 4, "r": 3},
    {"name": "lam_res", "op": "add", "inputs": ["e_res", "lam"]},  # a lambda layer (lambda_resnet)
    {"name": "bot", "op": "attention", "inputs": ["lam_res"] * 3, "heads": 2, "scale": 0.5, "rel_pos": [8, 8],
     "rel_dim": 4},  # BotNet's relative position logits over the map
    {"name": "bot_res", "op": "add", "inputs": ["lam_res", "bot"]},
    {"name": "halo", "op": "attention", "inputs": ["bot_res"] * 3, "heads": 2, "scale": 0.5, "halo_blocks": [4, 4],
     "halo": 1, "rel_pos": [6, 6], "rel_dim": 4, "rel_scaled": True},  # HaloNet's blocks and haloed windows
    {"name": "halo_res", "op": "add", "inputs": ["bot_res", "halo"]},
    {"name": "lam_rel", "op": "lambda_layer", "inputs": ["halo_res", "lam_k", "lam_v"], "heads": 2, "dim": 4,
     "rel_pos": [8, 8]},  # lambda_resnet26rpt's relative position lambdas
    {"name": "rel_res", "op": "add", "inputs": ["halo_res", "lam_rel"]},
    {"name": "tokens", "op": "reshape", "inputs": ["rel_res"], "shape": [8, 64, 1]},
    {"name": "reg", "op": "class_token", "inputs": ["tokens"], "ch": 8, "tokens": 4},
    {"name": "cls", "op": "class_token", "inputs": ["reg"], "ch": 8},
    {"name": "pos", "op": "pos_embed", "inputs": ["cls"], "ch": 8, "tokens": 69},
    {"name": "ln", "op": "layer_norm", "inputs": ["pos"], "ch": 8},
    {"name": "qkv", "op": "conv", "inputs": ["ln"], "in": 8, "out": 24, "k": 1},
    {"name": "q", "op": "slice", "inputs": ["qkv"], "start": 0, "stop": 8},
    {"name": "k", "op": "slice", "inputs": ["qkv"], "start": 8, "stop": 16},
    {"name": "v", "op": "slice", "inputs": ["qkv"], "start": 16, "stop": 24},
    {"name": "attend", "op": "attention", "inputs": ["q", "k", "v"], "heads": 2, "scale": 0.5},
    {"name": "proj", "op": "conv", "inputs": ["attend"], "in": 8, "out": 8, "k": 1},
    {"name": "res", "op": "add", "inputs": ["pos", "proj"]},
    {"name": "first", "op": "token", "inputs": ["res"], "index": 0},
    {"name": "flat", "op": "flatten", "inputs": ["first"]}]}
