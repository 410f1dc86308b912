"""What the shape-flow tracer keeps of its example values between decisions (`edgecl.arch.fx_shape_values`): only the
tensors a later node can still read — through a proxy or attribute the model's code holds, or as the input of a node
traced but not yet run — so a deep network with a decision per layer does not keep every activation at three batch
sizes until the trace ends; a value released and read again is recomputed, and the traced graph is the same."""
from __future__ import annotations

import torch
from torch import fx, nn

from edgecl.arch.fx_shape_flow import ShapeFlowTracer
from edgecl.arch.fx_shape_values import ExampleValues


class Counting(ShapeFlowTracer):
    """Counts the nodes it runs and, after each decision, the real tensors its example values hold."""

    def __init__(self, input_shape, keep_reachable: bool = True) -> None:
        super().__init__(input_shape)
        self.keep_reachable, self.runs, self.held = keep_reachable, 0, []

    def _release(self, values: ExampleValues, nodes=None) -> None:
        values.release(nodes, keep_reachable=self.keep_reachable)

    def _run(self, runner, node, batch):
        self.runs += 1
        return super()._run(runner, node, batch)

    def resolve(self, proxy, use, items=False):
        value = super().resolve(proxy, use, items)
        self.held.append(sum(isinstance(v, torch.Tensor) and not v.is_meta for values in self._values.values()
                             for v in values.env.values()))
        return value


class DecidedChain(nn.Module):
    """`depth` convolutions, each followed by a decision on the map's shape."""

    def __init__(self, depth: int = 30) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(depth))

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
            if x.shape[-1] % 2:
                x = x * 2
        return x


class HeldAcross(nn.Module):
    """`y` and `t` (an attribute of `y`) are read after later decisions: the model's code holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        t = y.mT
        if t.shape[-1] % 2:  # y and t run
            y = y + 1
        z = self.b(x)
        if z.shape[1] == 4:  # y's users have all run: held only by the code
            z = z * 2
        out = y + t.mT + z
        if out.shape[-1] > 1:  # reads y and t again
            out = out - 1
        return out


def _trace(module: nn.Module, shape: tuple[int, ...], **kwargs) -> tuple[Counting, fx.GraphModule]:
    tracer = Counting(shape, **kwargs)
    return tracer, fx.GraphModule(module, tracer.trace(module))


def test_a_decision_per_layer_keeps_only_the_frontier():
    """Before: 3 batches × (the input and 2 tensors per layer): 183 tensors held at the last of 30 decisions; now 6."""
    module = DecidedChain().eval()
    tracer, traced = _trace(module, (4, 6, 6))
    assert len(tracer.held) == 30
    assert max(tracer.held) <= 6, tracer.held  # per batch: the input and the frontier (the last relu)
    assert tracer.runs == 3 * (1 + 30 * 5)  # each node once per batch (conv, relu, shape, [-1], % 2): none again
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(traced(x), module(x))


def test_values_the_code_holds_stay_and_released_ones_are_recomputed():
    module = HeldAcross().eval()
    tracer, traced = _trace(module, (3, 5, 5))
    forced, again = _trace(module, (3, 5, 5), keep_reachable=False)  # releases y and t while the code holds them
    assert tracer.runs < forced.runs  # y (and t) recomputed for the last decision when released
    assert again.code == traced.code
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(traced(x), module(x)) and torch.equal(again(x), module(x))
