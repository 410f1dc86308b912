"""Real user networks for the graph tests (from_torch, compaction, runtime parity, every method on graphs):
torchvision, timm, a custom module with every structure the channel map follows (`ResCat`), and a MobileNet-style
residual block as a spec (`dwres_spec`). Imports torch, torchvision and timm."""
from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from edgecl.arch import from_torch, validate
from edgecl.arch.factories import ensure_torchvision_imports
from edgecl.arch.fx_import import tensors_of

ensure_torchvision_imports()
import timm  # noqa: E402
from timm.layers.grn import GlobalResponseNorm  # noqa: E402
import torchvision  # noqa: E402


class ResCat(nn.Module):
    """A custom trunk + classifier with a residual add, a channel concatenation, a depthwise conv and an SE gate."""

    def __init__(self, classes: int = 5, in_channels: int = 3, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.branch_a = nn.Conv2d(w, w, 3, padding=1)
        self.branch_b = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(2 * w, w // 2, 1), nn.Conv2d(w // 2, 2 * w, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.branch_a(x)
        y = torch.cat([x, self.branch_b(x)], dim=1)
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.fc(torch.flatten(self.pool(y * gate), 1))


class Distilled(nn.Module):
    """RepViT's eval-mode classifier on a small trunk: pooled features, then ``(head(x) + head_dist(x)) / 2``, each
    head timm's NormLinear (BatchNorm1d → Dropout → Linear); `heads=1` keeps only `head` (one NormLinear)."""

    def __init__(self, classes: int = 5, in_channels: int = 3, width: int = 8, heads: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.drop = nn.Dropout(0.1)

        def norm_linear() -> nn.Module:
            return nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(width), drop=nn.Dropout(0.2),
                                             l=nn.Linear(width, classes)))
        self.head = norm_linear()
        self.head_dist = norm_linear() if heads == 2 else None

    def forward(self, x):
        x = self.drop(self.stem(x).mean((2, 3)))
        return self.head(x) if self.head_dist is None else (self.head(x) + self.head_dist(x)) / 2


class GhostSplit(nn.Module):
    """Channel slices as GhostNet, RexNet, CSP and MixNet write them: a ghost module (a conv, a cheap depthwise conv
    of its output, the two concatenated and cut to width with ``[:, :c]``), then a conv whose output is split
    (``split`` with sizes, ``chunk``) into parts that meet again in a residual add, a slice and a concatenation."""

    def __init__(self, classes: int = 3, in_channels: int = 3, width: int = 6):
        super().__init__()
        w = width  # even
        self.primary = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                     nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w, bias=False), nn.BatchNorm2d(w),
                                   nn.ReLU())
        self.out_chs = w + w // 2 + 1
        self.mix = nn.Sequential(nn.Conv2d(self.out_chs, 2 * w, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.1))
        self.fc = nn.Linear(2 * w - 2, classes)  # (a + b) w, then w/2 − 1 channels of each half of b

    def forward(self, x):
        x1 = self.primary(x)
        ghost = torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.out_chs]
        y = self.mix(ghost)
        a, b = y.split([y.shape[1] // 2, y.shape[1] // 2], dim=1)
        c, d = torch.chunk(b, 2, 1)
        z = torch.cat([a + b, c[:, 1:], d[:, -(d.shape[1] - 1):, ...]], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))


class _Norm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an NCHW map, as torchvision's and timm's LayerNorm2d write it."""

    def forward(self, x):
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                        self.eps).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """ConvNeXt in small: a patchify stem with a LayerNorm2d, blocks of depthwise conv → channels last → LayerNorm →
    Linear → GELU → Linear → channels first → layer scale (torchvision's (C, 1, 1) form in one block, timm's
    ``gamma.reshape(1, -1, 1, 1)`` in the other; a global response norm in the second one's MLP, as ConvNeXt V2)
    → residual add, a LayerNorm2d + strided conv downsample, and a LayerNorm on the pooled features before the
    classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 2, stride=2), _Norm2d(w, eps=1e-6))
        self.dw1, self.norm1 = nn.Conv2d(w, w, 3, padding=1, groups=w), nn.LayerNorm(w, eps=1e-6)
        self.mlp1 = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w))
        self.layer_scale = nn.Parameter(torch.full((w, 1, 1), 0.5))
        self.down = nn.Sequential(_Norm2d(w, eps=1e-6), nn.Conv2d(w, 2 * w, 2, stride=2))
        self.dw2, self.norm2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w), nn.LayerNorm(2 * w)
        self.fc1, self.act, self.fc2 = nn.Linear(2 * w, 4 * w), nn.GELU(), nn.Linear(4 * w, 2 * w)
        self.grn = GlobalResponseNorm(4 * w)  # ConvNeXt V2's, on the channels-last hidden units
        self.gamma = nn.Parameter(torch.full((2 * w,), 0.5))
        self.head_norm, self.fc = nn.LayerNorm(2 * w), nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.layer_scale * self.mlp1(self.norm1(self.dw1(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = self.down(x)
        y = self.norm2(self.dw2(x).permute(0, 2, 3, 1))
        y = self.fc2(self.grn(self.act(self.fc1(y)))).permute(0, 3, 1, 2)
        x = x + y.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.fc(self.head_norm(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def _shuffle(x, groups: int):
    """torchvision's `channel_shuffle`, as ShuffleNet v2 writes it."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, c, h, w)


class TinyShuffle(nn.Module):
    """ShuffleNet v2 in small: a block that splits its channels (chunk), transforms one half, concatenates and
    shuffles; a downsampling block whose two branches are concatenated and shuffled in three groups."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 6):
        super().__init__()
        w, h = width, width // 2

        def unit(c_in, c_out, stride=1):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, stride, 1, groups=c_out, bias=False),
                                 nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 1), nn.ReLU())

        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.branch = unit(h, h)
        self.left, self.right = unit(w, w, 2), unit(w, 2 * w, 2)
        self.fc = nn.Linear(3 * w, classes)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = _shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)
        x = _shuffle(torch.cat((self.left(x), self.right(x)), dim=1), 3)
        return self.fc(x.mean([2, 3]))


def shuffle_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyShuffle(in_channels=input_shape[0]), tuple(input_shape))


def convnext_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(TinyConvNeXt(in_channels=input_shape[0]), tuple(input_shape))


def ghost_spec(input_shape=(1, 8, 8)) -> dict:
    return from_torch(GhostSplit(in_channels=input_shape[0]), tuple(input_shape))


def randomised_all(module: nn.Module) -> nn.Module:
    """`module` in eval mode with every weight, bias and norm drawn at random (N(0, 0.3²), seed 0): a zero qkv bias
    would make padded keys' scores 0 and hide padding left out; a unit LayerNorm would hide one skipped."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.eval()


def randomised_with_biases(module: nn.Module) -> nn.Module:
    """`randomise_batchnorm` (norms, layer scales) and LeViT-style attention biases drawn at random (timm starts
    them at 0, which would hide a misread bias index), the bias cache cleared; in eval mode."""
    torch.manual_seed(0)
    randomise_batchnorm(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("attention_biases"):
                p.normal_(0, 1)
    for m in module.modules():
        if hasattr(m, "attention_bias_cache"):
            m.attention_bias_cache = {}
    return module.eval()


def assert_refused(module: nn.Module, *words: str, input_shape: tuple[int, ...] = (1, 8, 8)) -> None:
    """`from_torch` refuses `module` with a UsageError whose message holds every one of `words` (the class, the
    module path, the offending layer...)."""
    import pytest

    from edgecl.errors import UsageError

    with pytest.raises(UsageError) as info:
        from_torch(module.eval(), input_shape)
    for word in words:
        assert word in str(info.value), str(info.value)


def randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (fresh modules have identity BatchNorm and LayerNorm,
    ConvNeXt's and EdgeNeXt's layer scales are 1e-6, PP-HGNetV2's scalar affines and MetaFormer's StarReLU 1 and 0,
    MetaFormer's res scales 1, LeViT's attention biases 0, EdgeNeXt's temperatures 1, ResMLP's Affine 1 and 0, and
    weights initialised to 0 or near it — heads, class tokens, NF nets' last gains, gMLP's token mixing —, which
    would hide them from a parity check)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith(("gamma", "gamma_xca", "layer_scale", "temperature", ".scale", ".alpha")):  # EdgeNeXt's XCA:
            # its layer scale, per-head temperature; MetaFormer's Scale layers; ResMLP's Affine (1)
            p.data.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        if name.endswith(".bias") and p.numel() == 1 or name.endswith("attention_biases"):  # a scalar affine's, LeViT's
            p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
        if p.numel() > 1 and not name.endswith("bias") and float(p.detach().abs().max()) < 1e-4:  # (near) zero:
            # a classifier (torchvision's ViT, timm's Mixer), a class token, NF nets' last gains, a GC block's fc2,
            # ResMLP's Affine beta and its layer scales (1e-5), gMLP's token mixing (std 1e-6)
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    for m in module.modules():
        if type(m).__name__ == "GlobalResponseNorm":  # timm's starts at the identity (weight and bias 0)
            m.weight.data.copy_(0.5 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        if type(m).__name__.startswith("RmsNorm") and getattr(m, "weight", None) is not None:  # timm's (MobileNetV5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:  # GroupNorm1: MobileViTv2
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.bias is not None:
            m.bias.data.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=g))


MODELS = {
    "torchvision resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "torchvision mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25),
    "timm mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),
    "custom residual + concat": ResCat,
    "timm convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=5),
    "torchvision convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=5),
    "torchvision shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=5),
}


def module_and_spec(name: str, input_shape: tuple[int, ...] = (3, 32, 32)) -> tuple[nn.Module, dict]:
    """A seeded module of MODELS (eval mode, random BatchNorm statistics) and its spec."""
    torch.manual_seed(0)
    module = MODELS[name]().eval()
    randomise_batchnorm(module)
    return module, from_torch(module, input_shape)


@functools.lru_cache(maxsize=None)
def spec_and_weights(name: str, input_shape: tuple[int, ...] = (3, 32, 32)) -> tuple[dict, dict[str, np.ndarray]]:
    """The spec of a MODELS network and its tensors, the module's classifier as the head (cached: tracing and
    torchvision's constructors take seconds). Callers must copy the tensors before changing them."""
    module, spec = module_and_spec(name, input_shape)
    weights = tensors_of(module, spec)
    weights.update(classifier_of(module))
    return spec, weights


def classifier_of(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's classifier as edgecl's head: its last nn.Linear, or (DLA, DPN) its last 1×1 convolution, or —
    where a module holds a `head` and a `head_dist` (timm's name for the averaged classifiers of RepViT and the
    distilled heads) — their average, folded into one (`averaged_head`); with a `dist_token` (DeiT) or two class
    tokens (PiT's `num_tokens`) each head reads its own token and the features are [class token, distillation token]
    (`edgecl.arch.fx_classifier`); EfficientViM's softmax-weighted `heads` as one (`weighted_heads`)."""
    pair = [m for m in module.modules() if isinstance(getattr(m, "head", None), nn.Module) and
            isinstance(getattr(m, "head_dist", None), nn.Module) and not isinstance(m.head_dist, nn.Identity)]
    # an identity head_dist is no second classifier (iFormer's RepVitClassifier without distillation: head alone)
    if pair and (getattr(pair[-1], "dist_token", None) is not None or getattr(pair[-1], "num_tokens", 1) == 2):
        owner, dim = pair[-1], pair[-1].head.in_features
        return averaged_head([lambda z: owner.head(z[:, :dim]), lambda z: owner.head_dist(z[:, dim:])], 2 * dim)
    if pair:
        return averaged_head([pair[-1].head, pair[-1].head_dist])
    if isinstance(getattr(module, "heads", None), nn.ModuleList) and isinstance(getattr(module, "weights", None),
                                                                                nn.Parameter):
        return weighted_heads(module)  # EfficientViM's softmax-weighted heads
    linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    layer = linear[-1] if linear else [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0])
    return {"head.weight": layer.weight.detach().reshape(layer.weight.shape[0], -1).numpy().copy(),
            "head.bias": bias.detach().numpy().copy()}


def weighted_heads(module: nn.Module) -> dict[str, np.ndarray]:
    """timm's EfficientViM head, Σ_i softmax(weights)_i·heads[i](x_i), as the one linear head of the features side by
    side: [s_0·W_0 … s_n·W_n] and Σ_i s_i·b_i (computed here from the module, not by edgecl); a distilled model's
    two such sums averaged."""
    def weighted(weights: torch.Tensor, heads: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
        s = weights.softmax(-1)
        return (torch.cat([s[i] * head.weight for i, head in enumerate(heads)], dim=1),
                sum(s[i] * head.bias for i, head in enumerate(heads)))

    with torch.no_grad():
        pairs = [weighted(module.weights, module.heads)]
        if hasattr(module, "heads_dist"):
            pairs.append(weighted(module.weights_dist, module.heads_dist))
        weight, bias = (sum(p[k] for p in pairs) / len(pairs) for k in (0, 1))
    return {"head.weight": weight.numpy().copy(), "head.bias": bias.numpy().copy()}


def averaged_head(chains: list[nn.Module], features: int | None = None) -> dict[str, np.ndarray]:
    """The one linear head that computes the mean of `chains` (each BatchNorm1d/dropout → Linear, affine in eval;
    or any affine callable of `features` values): read off its values at 0 and at every unit vector."""
    for chain in chains:
        if isinstance(chain, nn.Module):
            chain.eval()
    features = features or next(m for m in chains[0].modules() if isinstance(m, nn.Linear)).in_features
    probe = torch.cat([torch.zeros(1, features), torch.eye(features)])
    with torch.no_grad():
        out = torch.stack([chain(probe) for chain in chains]).double().mean(0)
    return {"head.weight": (out[1:] - out[0]).T.float().numpy().copy(), "head.bias": out[0].float().numpy().copy()}


def crossvit_head(module: nn.Module) -> dict[str, np.ndarray]:
    """CrossViT's averaged classifiers as one head on the two class tokens side by side."""
    d = module.embed_dim[0]
    return averaged_head([lambda z: module.head[0](z[:, :d]), lambda z: module.head[1](z[:, d:])],
                         sum(module.embed_dim))


def check_parity(module: nn.Module, spec: dict, input_shape: tuple[int, ...], post=None, batch: int = 4,
                 head: dict[str, np.ndarray] | None = None) -> None:
    """The spec's torch forward and its ONNX graph (ONNX Runtime) give the module's output, with the module's own
    tensors and its classifier as the head (`head`, or `classifier_of`); `post` maps the spec's logits to what the
    module returns (a final log_softmax that from_torch drops)."""
    import onnxruntime as ort

    from edgecl.graph.builder import build_onnx
    from edgecl.train.models import forward, from_numpy

    module.eval()
    weights = tensors_of(module, spec)
    weights.update(head or classifier_of(module))
    post = post or (lambda logits: logits)
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(x).numpy()
        got = post(forward(spec, from_numpy(weights), x)).numpy()
    assert np.abs(want).max() > 1e-6, "the module's logits are all 0: parity would prove nothing (randomise_batchnorm)"
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-5 * scale
    session = ort.InferenceSession(build_onnx(spec, weights).SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = post(torch.from_numpy(session.run(None, {"x": x.numpy()})[0])).numpy()
    assert np.abs(onnx_out - want).max() <= 1e-4 * scale


def randomised_parity(module: nn.Module, shape: tuple[int, ...] = (3, 8, 8)) -> dict:
    """The module's spec, checked against the module (`check_parity`) with its BatchNorm statistics drawn at random
    (fresh ones are the identity, which would hide a BatchNorm left out)."""
    torch.manual_seed(0)
    randomise_batchnorm(module)
    spec = from_torch(module.eval(), shape)
    check_parity(module, spec, shape)
    return spec


def spec_logits(spec: dict, weights: dict[str, np.ndarray], x: torch.Tensor) -> np.ndarray:
    """The spec's torch forward on `x`, checked against its ONNX graph (ONNX Runtime) within 1e-4 of the largest
    logit (at least 1e-4: float32 rounding grows with the logits)."""
    import onnxruntime as ort

    from edgecl.graph.builder import build_onnx
    from edgecl.train.models import forward, from_numpy

    with torch.no_grad():
        got = forward(spec, from_numpy(weights), x).numpy()
    session = ort.InferenceSession(build_onnx(spec, weights).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x.numpy()})[0] - got).max() <= 1e-4 * max(1.0, np.abs(got).max())
    return got


def rescat_spec(input_shape=(1, 8, 8), width: int = 8) -> dict:
    """ResCat's spec for inputs of `input_shape` (`width` channels in the stem and each branch)."""
    return from_torch(ResCat(in_channels=input_shape[0], width=width), tuple(input_shape))


def dwres_spec(input_shape=(1, 8, 8)) -> dict:
    """A MobileNet-style residual block as a spec: stem conv, depthwise conv + BatchNorm, pointwise conv + BatchNorm
    added back to the stem. The depthwise rows, both BatchNorms and both convs' rows are one channel group."""
    c = input_shape[0]
    return validate({"name": "dwres", "input_shape": list(input_shape), "nodes": [
        {"name": "stem", "op": "conv", "inputs": ["input"], "in": c, "out": 6, "k": 3, "pad": 1},
        {"name": "stem_act", "op": "relu", "inputs": ["stem"]},
        {"name": "dw", "op": "conv", "inputs": ["stem_act"], "in": 6, "out": 6, "k": 3, "pad": 2, "dilation": 2,
         "groups": 6},
        {"name": "dwbn", "op": "bn", "inputs": ["dw"], "ch": 6},
        {"name": "dw_act", "op": "relu6", "inputs": ["dwbn"]},
        {"name": "pw", "op": "conv", "inputs": ["dw_act"], "in": 6, "out": 6, "k": 1, "bias": False},
        {"name": "pwbn", "op": "bn", "inputs": ["pw"], "ch": 6},
        {"name": "add", "op": "add", "inputs": ["pwbn", "stem_act"]},
        {"name": "pool", "op": "gap", "inputs": ["add"]},
        {"name": "flat", "op": "flatten", "inputs": ["pool"]}]})
