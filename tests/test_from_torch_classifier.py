"""The final classifier `from_torch` replaces with edgecl's heads (`edgecl.arch.fx_classifier`): an average of
classifiers — RepViT's ``(head(x) + head_dist(x)) / 2`` of NormLinears — goes in as the features they all read, each
chain's own BatchNorm1d dropped with it; a single NormLinear keeps its BatchNorm1d in the trunk as before; anything
near the pattern but not it is refused naming the op and the source line."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.arch import from_torch, param_shapes
from edgecl.arch.module_state import state_keys
from edgecl.errors import UsageError
from torch_nets import Distilled, averaged_head, check_parity, randomise_batchnorm

HERE = r"[^ ]*test_from_torch_classifier\.py:\d+"


def _trunk_keys(module: nn.Module) -> set[str]:
    return {k for k in module.state_dict() if k.startswith("stem.") and "num_batches_tracked" not in k}


def test_an_average_of_norm_linear_heads_is_the_classifier():
    torch.manual_seed(0)
    module = Distilled()
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 6, 6))
    assert spec["feature_dim"] == 8 and [n["op"] for n in spec["nodes"]][-2:] == ["gap", "flatten"]
    assert set(state_keys(spec).values()) == _trunk_keys(module)  # both heads, their BatchNorms too, are dropped
    check_parity(module, spec, (3, 6, 6))  # the spec's features, with the average folded into one head, = module


def test_a_single_norm_linears_batchnorm_stays_in_the_trunk():
    """Unchanged: one classifier reads what its BatchNorm1d gives, so that BatchNorm is trunk (renamed, as every
    layer called head*, with its state-dict path in `module`)."""
    module = Distilled(heads=1)
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 6, 6))
    bn = spec["nodes"][-1]
    assert bn["op"] == "bn" and bn["module"] == "head.bn" and spec["output"] == bn["name"]
    assert set(state_keys(spec).values()) == _trunk_keys(module) | {f"head.bn.{k}" for k in (
        "weight", "bias", "running_mean", "running_var")}
    check_parity(module, spec, (3, 6, 6))


class Averaged(nn.Module):
    """A trunk and `heads` classifiers, combined by `combine(outputs, features, pooled map)`."""

    def __init__(self, combine, heads: int = 2, pointwise: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        layer = (lambda: nn.Conv2d(6, 4, 1)) if pointwise else (lambda: nn.Sequential(nn.BatchNorm1d(6),
                                                                                        nn.Linear(6, 4)))
        self.heads = nn.ModuleList(layer() for _ in range(heads))
        self.combine, self.pointwise = combine, pointwise

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1)
        if self.pointwise:
            return self.combine([torch.flatten(h(pooled), 1) for h in self.heads])
        x = torch.flatten(pooled, 1)
        return self.combine(x, [h(x) for h in self.heads])


def test_three_heads_times_a_third_and_pointwise_conv_heads():
    module = Averaged(lambda x, y: (y[0] + y[1] + y[2]) * (1 / 3), heads=3)
    randomise_batchnorm(module)
    spec = from_torch(module, (3, 6, 6))
    assert spec["feature_dim"] == 6 and set(state_keys(spec).values()) == {"conv.weight", "conv.bias"}
    check_parity(module, spec, (3, 6, 6), head=averaged_head(list(module.heads)))
    module = Averaged(lambda y: (y[0] + y[1]) / 2, pointwise=True)  # DLA-style 1×1 convolutions on the pooled map
    spec = from_torch(module, (3, 6, 6))
    assert spec["feature_dim"] == 6 and [n["op"] for n in spec["nodes"]][-2:] == ["gap", "flatten"]
    head = averaged_head([lambda z, h=h: torch.flatten(h(z[:, :, None, None]), 1) for h in module.heads], 6)
    check_parity(module, spec, (3, 6, 6), head=head)


@pytest.mark.parametrize("combine, error", [
    (lambda x, y: (y[0] + y[1]) / 3, r"sum of 2 terms times 0.333333 \(call_function truediv.*" + HERE +
     r".*not a weighted sum"),
    (lambda x, y: (0.25 * y[0] + 0.75 * y[1]) / 2, r"a term of the final average is scale \(mul.*" + HERE),
    (lambda x, y: (torch.relu(y[0]) + y[1]) / 2, r"a term of the final average is relu \(relu.*" + HERE),
    (lambda x, y: y[0] + y[1], r"last operation is add \(add.*" + HERE + r".*or an average of such"),
    (lambda x, y: (x + x) / 2, r"a term of the final average is flatten .*classifier=False"),
])
def test_near_misses_of_an_average_are_refused_at_the_users_line(combine, error):
    with pytest.raises(UsageError, match=error):
        from_torch(Averaged(combine), (3, 6, 6))


class ReadsApart(nn.Module):
    """Two NormLinear-like heads, one reading the features through a ReLU (or another tensor altogether)."""

    def __init__(self, relu: bool):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 6, 3), relu
        self.head, self.head_dist = nn.Linear(6, 4), nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 4))

    def forward(self, x):
        y = self.conv(x)
        x = y.mean((2, 3))
        other = torch.relu(x) if self.relu else y.amax((2, 3))
        return (self.head(x) + self.head_dist(other)) / 2


@pytest.mark.parametrize("relu, op", [(True, "relu"), (False, "amax")])
def test_averaged_heads_reading_different_tensors_are_refused(relu, op):
    error = rf"read different tensors \(head reads mean \(call_method mean, at {HERE}: x = y.mean.*; head_dist.1 reads "
    error += rf"{op} "
    with pytest.raises(UsageError, match=rf"average of 2 classifiers that {error}.*{HERE}"):
        from_torch(ReadsApart(relu), (3, 6, 6))


def test_an_average_of_classifiers_on_the_input_leaves_no_trunk():
    class Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.head_dist = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            return (self.head(x) + self.head_dist(x)) / 2

    with pytest.raises(UsageError, match=r"only its classifier \(head: nn.Linear 5→3, head_dist: .*no trunk"):
        from_torch(Only(), (5,))


def test_starting_weights_of_an_averaged_model_are_its_trunk_alone(tmp_path):
    """The dropped heads' tensors (their BatchNorms' statistics too) are never asked for nor taken: the start is the
    trunk's values, from the module or from a file of its whole state dict, with the same digest."""
    import numpy as np

    from edgecl.train.initial import starting_weights

    module = Distilled(in_channels=1)
    randomise_batchnorm(module)
    spec = from_torch(module, (1, 8, 8))
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    np.savez(tmp_path / "w.npz", **state)
    start = starting_weights(module, spec)
    assert set(start.values) == set(param_shapes(spec))
    assert all(np.array_equal(start.values[name], state[key]) for name, key in state_keys(spec).items())
    assert starting_weights(str(tmp_path / "w.npz"), spec).sha256 == start.sha256
    trunk_only = {k: v for k, v in state.items() if not k.startswith("head")}
    assert starting_weights(trunk_only, spec).sha256 == start.sha256


class ReluClassifier(nn.Module):
    """SqueezeNet's classifier: dropout, a 1×1 convolution, a ReLU, global pooling, a flatten."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(6, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.stem(x)), 1)


def test_a_relu_after_a_pointwise_classifier_is_refused_with_the_call_that_keeps_it():
    """The ReLU sits between the convolution and the pooling, so no linear head computes the classifier: refused
    naming the layer and the line, and the call the message gives keeps it as the trunk's last layer, exactly."""
    module = ReluClassifier()
    with pytest.raises(UsageError, match=r"1×1 convolution classifier \(classifier\.1 .*" + HERE +
                       r".*relu between it and the pooling.*classifier=False\) \(its 5 pooled channels"):
        from_torch(module, (3, 6, 6))
    spec = from_torch(module, (3, 6, 6), classifier=False)
    assert spec["feature_dim"] == 5 and [n["op"] for n in spec["nodes"]][-4:] == ["conv", "relu", "gap", "flatten"]
    check_parity(module, spec, (3, 6, 6), head=averaged_head([nn.Identity()], 5))
