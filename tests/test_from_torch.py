"""Your own network: torchvision, timm and custom `nn.Module`s become specs (`edgecl.arch.from_torch`), whose torch
forward and ONNX graph compute what the module computes; unsupported ops get a UsageError naming op and module path."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.arch import channel_map, dense_params, from_torch, param_shapes, prunable
from edgecl.arch.factories import build_module, resolve_arch
from edgecl.errors import UsageError
from torch_nets import MODELS, ResCat, check_parity, module_and_spec, spec_and_weights


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_forward_and_onnx_equal_the_module(name):
    module, spec = module_and_spec(name)
    _, weights = spec_and_weights(name)
    check_parity(module, spec, (3, 32, 32))
    assert set(param_shapes(spec)) == set(weights) - {"head.weight", "head.bias"}  # state-dict keys, classifier out
    assert all(w.startswith(tuple(n["name"] for n in spec["nodes"])) for w in prunable(spec))
    channel_map(spec)  # channels can be followed through every one of these graphs


def test_channel_groups_follow_residual_adds_concat_depthwise_and_gates():
    spec = from_torch(ResCat(), (3, 16, 16))
    cm = channel_map(spec)
    assert cm.rows["branch_a.weight"] == cm.rows["stem.0.weight"] == [("stem.0", 1)]  # the residual add
    assert cm.rows["branch_b.0.weight"] == [("stem.0", 1)]  # depthwise: its rows are its input channels
    assert cm.cols["se_reduce.weight"] == [("stem.0", 1), ("stem.0", 1)]  # cat of x and the depthwise branch
    assert cm.rows["se_expand.weight"] == [("stem.0", 1), ("stem.0", 1)]  # the gate multiplies the concatenation
    assert cm.head_cols == [("stem.0", 1), ("stem.0", 1)]


class Tail(nn.Module):
    def __init__(self, last: nn.Module):
        super().__init__()
        self.conv, self.last = nn.Conv2d(3, 4, 3), last

    def forward(self, x):
        return self.last(torch.flatten(self.conv(x), 1))


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.PReLU()))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class ConvClassifier(nn.Module):
    """DLA's and DPN's head: global pooling, a 1×1 convolution, a flatten (SqueezeNet's has a ReLU after the conv)."""

    def __init__(self, relu: bool = False):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)
        self.relu = relu

    def forward(self, x):
        y = self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1))
        return torch.flatten(torch.relu(y) if self.relu else y, 1)


def test_a_pointwise_conv_on_pooled_features_is_the_classifier():
    module = ConvClassifier()
    spec = from_torch(module, (3, 6, 6))
    assert spec["feature_dim"] == 6 and [n["op"] for n in spec["nodes"]][-2:] == ["gap", "flatten"]
    check_parity(module, spec, (3, 6, 6))
    with pytest.raises(UsageError, match=r"not an nn.Linear classifier \(or a 1×1 convolution on pooled"):
        from_torch(ConvClassifier(relu=True), (3, 6, 6))


def test_unsupported_layer_is_named_with_its_module_path():
    with pytest.raises(UsageError, match=r"PReLU.*features\.1\.0"):
        from_torch(Unsupported(), (3, 8, 8))


def test_a_model_without_a_final_linear_says_how_to_pass_the_trunk():
    with pytest.raises(UsageError, match="classifier=False"):
        from_torch(Tail(nn.ReLU()), (3, 6, 6))
    spec = from_torch(Tail(nn.ReLU()), (3, 6, 6), classifier=False)
    assert spec["feature_dim"] == 4 * 4 * 4
    assert from_torch(Tail(nn.Linear(64, 3)), (3, 6, 6))["feature_dim"] == 64


class _Several(nn.Module):
    """A user's net returning logits with an auxiliary output, as a tuple or a dict (`kind`)."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.conv, self.fc = kind, nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        feats = torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1)
        logits = self.fc(feats)
        if self.kind == "split":  # a split's parts (here one: all 2 logits) returned as they come: a tuple too
            return logits.split(2, 1)
        if self.kind == "one":
            return (logits,)
        return (logits, feats) if self.kind == "tuple" else {"logits": logits, "feats": feats}


class _First(nn.Module):
    """The wrapper the refusal suggests: forward returns the logits alone."""

    def __init__(self, net, key):
        super().__init__()
        self.net, self.key = net, key

    def forward(self, x):
        return self.net(x)[self.key]


@pytest.mark.parametrize("kind, shown, key", [("tuple", "a tuple of 2 values", 0),
                                              ("dict", "a dict with keys ['logits', 'feats']", "logits"),
                                              ("split", "a tuple of 1 value", 0), ("one", "a tuple of 1 value", 0)])
def test_a_forward_returning_several_values_is_refused_with_the_wrapper_that_fixes_it(kind, shown, key):
    """It said 'returns immutable_dict' (torch.fx's type), leaving the user to guess what edgecl wanted; a split's
    parts returned whole were 'a value that is not a tensor of the graph', one value '1 values'."""
    with pytest.raises(UsageError, match=rf"returns {re.escape(shown)}; return that tensor alone.*net\(x\)\[0\]"):
        from_torch(_Several(kind), (3, 8, 8))
    assert from_torch(_First(_Several(kind), key), (3, 8, 8))["feature_dim"] == 4


def test_shared_layers_and_data_dependent_control_flow_are_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    class Branchy(Shared):
        def forward(self, x):
            return self.fc(x.mean((2, 3))) if x.sum() > 0 else self.fc(x.amax((2, 3)))

    with pytest.raises(UsageError, match="called twice"):
        from_torch(Shared(), (3, 8, 8))
    with pytest.raises(UsageError, match="data-dependent control flow cannot be converted"):
        from_torch(Branchy(), (3, 8, 8))


def test_arch_strings_resolve_and_are_refused_clearly(tmp_path):
    assert resolve_arch("mlp", (1, 8, 8))["name"] == "mlp"
    spec = resolve_arch("torchvision.models:mobilenet_v2", (3, 32, 32))
    assert spec["feature_dim"] == 1280 and spec["name"] == "mobilenet_v2"
    path = tmp_path / "spec.json"
    path.write_text(__import__("json").dumps(spec))
    assert resolve_arch(str(path), (3, 32, 32)) == spec
    with pytest.raises(UsageError, match="takes inputs of shape"):
        resolve_arch(str(path), (1, 8, 8))
    for bad, match in (("torchvision.models:nosuch", "no callable"), ("nosuchmodule:f", "cannot import"),
                       ("timm:nosuch", "no model"), ("cifar", "unknown architecture"),
                       (str(tmp_path / "missing.json"), "not found")):
        with pytest.raises(UsageError, match=match):
            resolve_arch(bad, (3, 32, 32))
    assert isinstance(build_module("timm:resnet10t"), nn.Module)


def test_factory_arguments_reach_the_factory_and_are_refused_clearly(tmp_path):
    (tmp_path / "net.py").write_text("from torch import nn\n\ndef build(width=16):\n"
                                     "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), "
                                     "nn.Linear(width, 10))\n")
    spec = resolve_arch(f"{tmp_path}/net.py:build", (1, 8, 8), factory_args={"width": 40})
    assert spec["feature_dim"] == 40
    narrow = resolve_arch("torchvision.models:mobilenet_v3_small", (3, 32, 32), factory_args={"width_mult": 0.25})
    full = resolve_arch("torchvision.models:mobilenet_v3_small", (3, 32, 32))
    assert dense_params(narrow) < dense_params(full) / 4
    with pytest.raises(UsageError, match=r"the factory with widht=40 raised TypeError: .*unexpected keyword"):
        resolve_arch(f"{tmp_path}/net.py:build", (1, 8, 8), factory_args={"widht": 40})
    with pytest.raises(UsageError, match="--arch mlp is a preset or a saved spec"):
        resolve_arch("mlp", (1, 8, 8), factory_args={"width": 40})
    for key, value in (("weights", "IMAGENET1K_V1"), ("pretrained", True)):
        with pytest.raises(UsageError, match="without downloaded weights; `edgecl train --init-weights` brings your own"):
            resolve_arch("torchvision.models:resnet18", (3, 32, 32), factory_args={key: value})
    with pytest.raises(UsageError, match="the factory with bogus=1 raised TypeError"):
        build_module("timm:resnet10t", {"bogus": 1})


def test_a_slice_that_cuts_a_channel_group_splits_it_for_every_tensor():
    from torch_nets import GhostSplit

    cm = channel_map(from_torch(GhostSplit(width=6), (3, 8, 8)))
    # the ghost cat [primary, its depthwise copy] cut to 10 channels: primary's 6 channels become 0-4 and 4-6, in
    # both copies, and in the conv, its BatchNorm and the depthwise conv that produce them
    assert cm.groups["primary.0:0-4"] == 4 and cm.groups["primary.0:4-6"] == 2
    assert cm.rows["primary.0.weight"] == cm.rows["cheap.0.weight"] == [("primary.0:0-4", 1), ("primary.0:4-6", 1)]
    assert cm.cols["mix.0.weight"] == [("primary.0:0-4", 1), ("primary.0:4-6", 1), ("primary.0:0-4", 1)]
    assert cm.size(cm.head_cols) == 10


def test_slices_channels_cannot_follow_are_refused_by_the_channel_map():
    from edgecl.arch import ChannelError, validate

    def spec(nodes, shape):
        return validate({"name": "s", "input_shape": shape, "nodes": nodes})

    sliced_input = spec([{"name": "s", "op": "slice", "inputs": ["input"], "stop": 2},
                         {"name": "c", "op": "conv", "inputs": ["s"], "in": 2, "out": 4, "k": 1},
                         {"name": "f", "op": "flatten", "inputs": ["c"]}], [3, 4, 4])
    with pytest.raises(ChannelError, match="splits the network input"):
        channel_map(sliced_input)
    inside_a_channel = spec([{"name": "c", "op": "conv", "inputs": ["input"], "in": 3, "out": 4, "k": 1},
                             {"name": "f", "op": "flatten", "inputs": ["c"]},
                             {"name": "s", "op": "slice", "inputs": ["f"], "start": 3, "stop": 40}], [3, 4, 4])
    with pytest.raises(ChannelError, match="cuts through the 16 features of one channel"):
        channel_map(inside_a_channel)
    with pytest.raises(UsageError, match="slice 5:5 must be a non-empty range of the input's 3 channels"):
        spec([{"name": "s", "op": "slice", "inputs": ["input"], "start": 5, "stop": 5}], [3])


def test_branches_sliced_at_other_points_before_an_add_are_cut_to_match():
    """a[:, :8] and b[:, :4] are taken before a + b: each branch's groups are cut at the other's bounds, so the
    add joins groups of equal sizes, and compaction removes a channel from both branches."""
    import numpy as np

    from edgecl.arch.fx_import import tensors_of
    from edgecl.export import compact_task
    from edgecl.export.onnx_export import run_onnx
    from edgecl.graph.builder import build_onnx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 1), nn.Linear(28, 3)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            p, q = a[:, :8], b[:, :4]
            return self.fc(torch.cat([a + b, p, q], 1).mean((2, 3)))

    torch.manual_seed(0)
    module = Net().eval()
    spec = from_torch(module, (3, 8, 8))
    check_parity(module, spec, (3, 8, 8))
    cm = channel_map(spec)
    assert sorted(cm.groups.values()) == [3, 4, 4, 8] and cm.size(cm.head_cols) == 28
    weights = {**tensors_of(module, spec), "head.weight": module.fc.weight.detach().numpy(),
               "head.bias": module.fc.bias.detach().numpy()}
    for layer in ("a", "b"):  # channel 2 dead in both branches: one unit of the add, and of p and q
        weights[f"{layer}.weight"][2] = 0
        weights[f"{layer}.bias"][2] = 0
    small, small_weights, report = compact_task(spec, weights, channel_multiple=1)
    assert report.layers == {"a": [16, 15], "b": [16, 15]}
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    assert np.abs(run_onnx(build_onnx(spec, weights), x) - run_onnx(build_onnx(small, small_weights), x)).max() < 1e-5


def test_a_split_group_never_takes_a_layers_name():
    from edgecl.arch import validate

    spec = validate({"name": "names", "input_shape": [2, 4, 4], "nodes": [
        {"name": "c:0-4", "op": "conv", "inputs": ["input"], "in": 2, "out": 3, "k": 1},
        {"name": "c", "op": "conv", "inputs": ["input"], "in": 2, "out": 8, "k": 1},
        {"name": "s", "op": "slice", "inputs": ["c"], "stop": 4},
        {"name": "both", "op": "cat", "inputs": ["c:0-4", "s"]},
        {"name": "pool", "op": "gap", "inputs": ["both"]}, {"name": "flat", "op": "flatten", "inputs": ["pool"]}]})
    cm = channel_map(spec)
    assert cm.groups["c:0-4"] == 3 and cm.size(cm.head_cols) == 7


def test_factory_arguments_named_like_edgecls_own_reach_the_factory(tmp_path):
    (tmp_path / "net.py").write_text("from torch import nn\n\ndef build(value=16, factory=None, user_args=None):\n"
                                     "    return nn.Sequential(nn.Flatten(), nn.Linear(64, value), nn.ReLU(), "
                                     "nn.Linear(value, 10))\n")
    spec = resolve_arch(f"{tmp_path}/net.py:build", (1, 8, 8), factory_args={"value": 8, "user_args": 1})
    assert spec["feature_dim"] == 8
    with pytest.raises(UsageError, match="without downloaded weights"):
        resolve_arch("torchvision.models:resnet18", (3, 32, 32), factory_args={"weights_backbone": "DEFAULT"})


def test_a_nodes_module_path_is_checked():
    from edgecl.arch import validate

    nodes = [{"name": "n_head", "op": "conv", "inputs": ["input"], "in": 1, "out": 2, "k": 1, "module": "head"},
             {"name": "f", "op": "flatten", "inputs": ["n_head"]}]
    assert validate({"input_shape": [1, 2, 2], "nodes": nodes})["nodes"][0]["module"] == "head"
    for bad in (5, "", "a\nb"):
        with pytest.raises(UsageError, match="module .* must be a module path"):
            validate({"input_shape": [1, 2, 2], "nodes": [{**nodes[0], "module": bad}, nodes[1]]})
    with pytest.raises(UsageError, match="unknown fields"):
        validate({"input_shape": [1, 2, 2], "nodes": [nodes[0], {**nodes[1], "module": "x"}]})


def test_factory_arguments_repeated_or_saying_no_download_and_factory_errors(tmp_path, capsys):
    from cli_run import run_cli

    from edgecl.config import parse_overrides

    assert parse_overrides(["width=3", "width=5"], "--arch-arg") == {"width": 5}  # the later value, as --set
    assert isinstance(build_module("torchvision.models:resnet18", {"weights": False, "num_classes": 4}), nn.Module)
    (tmp_path / "net.py").write_text("import torch\nfrom torch import nn\n\ndef build(width=4):\n"
                                     "    return nn.Sequential(nn.Conv2d(1, width, 3), nn.Flatten(), "
                                     "nn.Linear(width * 36, 10))\n")
    with pytest.raises(UsageError, match=r"raised \w+Error: ") as info:
        build_module(f"{tmp_path}/net.py:build", {"width": 10 ** 20})
    assert "\n" not in str(info.value) and "c10::" not in str(info.value)  # torch's C++ stack left out
    code, _, err = run_cli(capsys, "train", "--method", "lps", "--stream", "split-digits", "--tasks", "1", "--set",
                           "epochs=1", "--no-progress", "--arch", f"{tmp_path}/net.py:build", "--out",
                           str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--method", "lps", "--stream", "split-digits", "--tasks", "1",
                           "--no-progress", "--arch", f"{tmp_path}/net.py:build", "--arch-arg", "width=5",
                           "--resume", str(tmp_path / "a" / "model.edgecl"), "--out", str(tmp_path / "b"))
    assert code == 2 and "node '0' (conv) has out=4 in the artifact, out=5 here" in err, err


def test_a_conv_that_overrides_its_forward_is_refused_not_run_as_a_plain_conv():
    """Weight standardisation written by the user computes another function with the same tensors: run as a plain
    Conv2d it would give other outputs silently. (TensorFlow's same padding goes in: tests/test_padding.py; timm's
    ScaledStdConv2d: tests/test_std_conv.py; StdConv2d / StdConv2dSame: tests/test_std_conv_nfnet.py.)"""
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True)
                                                                             + 1e-5)
            return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    net = nn.Sequential(StdConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(UsageError, match=r"layer StdConv at '0' overrides Conv2d.forward"):
        from_torch(net, (3, 8, 8))
    # timm's StdConv2d / StdConv2dSame are recognised (a gainless standardised conv): tests/test_std_conv_nfnet.py
    assert from_torch(build_module("timm:lcnet_050"), (3, 32, 32))  # timm's Linear computes nn.Linear's forward


def test_no_two_converter_mixins_define_one_method():  # the later one would never run (EfficientViT-MSRA's ConvNorm)
    from edgecl.arch.fx_import import _Converter

    owners: dict[str, list[str]] = {}
    for mixin in _Converter.__mro__[1:-1]:
        for name, value in vars(mixin).items():
            if callable(value) and not name.startswith("__"):
                owners.setdefault(name, []).append(mixin.__name__)
    assert {name: found for name, found in owners.items() if len(found) > 1} == {}


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_a_weight_tied_between_two_layers_is_refused_not_untied(layer):
    """`b.weight = a.weight`: two layers, one tensor. Each layer is converted from its attributes and names its
    tensors by its path, so the spec held a.weight and b.weight, equal at conversion and trained apart (parity
    held, the tie silently gone). Refused as shared weights, naming both."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            make = (lambda: nn.Conv2d(4, 4, 3, padding=1)) if layer == "conv" else (lambda: nn.Linear(4, 4))
            self.a, self.b, self.fc = make(), make(), nn.Linear(4, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            if layer == "conv":
                return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))
            return self.fc(self.b(torch.relu(self.a(x.mean((2, 3))))))

    with pytest.raises(UsageError, match=r"'a'.*'b\.weight'.*shared weights"):
        from_torch(Tied().eval(), (4, 4, 4))


def test_a_layer_aliased_under_a_second_name_still_converts():
    """``self.classifier = self.fc``: one module under two names, called once, is one layer (fx calls it by one
    name); the tied-weight refusal reads only the names the graph converts."""

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)
            self.classifier, self.features = self.fc, self.conv

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    module = Aliased().eval()
    spec = from_torch(module, (4, 4, 4))
    check_parity(module, spec, (4, 4, 4))


def test_a_timm_model_built_for_another_size_is_refused_saying_how_to_build_it_for_this_one():
    """A first-time user's `--arch timm:volo_d1_224 --input-shape 3,32,32`: the model's own error (here a ViT's
    patch embedding assert) comes without torch.fx's appended graph node and traceback, and says the model was built
    for 224×224 and how to build it for the input (`img_size`); built so, it goes in."""
    timm = pytest.importorskip("timm")
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1)
    with pytest.raises(UsageError) as refused:
        from_torch(module, (3, 32, 32))
    message = str(refused.value)
    assert "does not run on inputs of shape (3, 32, 32)" in message and "While executing" not in message
    assert "built this model for 224×224 inputs" in message and "--arch-arg img_size=32" in message
    assert from_torch(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1,
                                        img_size=32), (3, 32, 32))["feature_dim"] == 192
    with pytest.raises(UsageError) as plain:  # a module of one's own, no built-for size: the error alone
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)), (3, 31, 31))
    assert "does not run" in str(plain.value) and "img_size" not in str(plain.value)
