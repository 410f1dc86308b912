"""Weight-standardised convs (NF-ResNet's ScaledStdConv2d) standardised when a task's weights are written, not in
the graph: the in-place strategy's host slots.

Why: the switchable graph standardises the weight it is bound to (`edgecl.graph.standardize.standardized_onnx`) on
every call — mean, variance and a division over every standardised filter — although a task's weights only change
on a switch. On nf_resnet26 at 64×64, one thread, that made a warm call 55.9 ms against 12.5 ms for the same tasks
folded, and ONNX Runtime kept 104 MB more (1.9× the weights) that the budget did not count (tools/bench_std_conv.py).
Here a conv whose weight a switch writes into a slot (masked, permuted, low-rank, read on a miss) is standardised in
that slot right after the fill, and one whose weight each task owns is standardised once at start-up (its own
copies, counted as the model's tensors), as is a shared one bound as an input with a shared gain (``factor=False``:
55.0 ms a call against 11.0 folded before); the graph then holds a plain conv for it and does not read its gain. The
numbers are `standardized`'s, as a per-task session's folded model has them. A conv whose weight is a constant keeps
the graph's form (ONNX Runtime folds the constant part: 9.6 ms against 9.5 folded). The device store
(`edgecl.runtime.device_standardize`) uses the same rules and, through `after_fill`'s `xp`, the same arithmetic on
its slots in device memory."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgecl.arch.op_rules import has_gain, is_standardized
from edgecl.arch.spec import Arch
from edgecl.graph.standardize import STANDARDIZE_FIELDS, check_finite, standardized
from edgecl.runtime.plan import TensorPlan


class SwitchStandardized:
    """The standardised convs the host store standardises itself (`convs`: node name → (eps, gain_scale)), and
    what that changes: the graph's spec, the tensors it no longer reads, each task's owned weights."""

    def __init__(self, arch: Arch, plans: list[TensorPlan]):
        by_name = {p.name: p for p in plans}
        self.convs: dict[str, tuple[float, float]] = {}
        for node in arch["nodes"]:
            weight, gain = by_name.get(f"{node['name']}.weight"), by_name.get(f"{node['name']}.gain")
            if not is_standardized(node) or weight is None or gain is None and has_gain(node):
                continue
            if weight.varies or weight.plan == "own" and (gain is None or not gain.varies) or \
                    weight.plan == "static" and (gain is None or gain.plan in ("static", "const")):
                self.convs[node["name"]] = (node["standardize"], node["gain_scale"])  # no gain: StdConv2d's
        self.gains = {f"{name}.gain" for name in self.convs if f"{name}.gain" in by_name}
        self.unread = set(self.gains)  # tensors the graph does not read
        self.arch = {**arch, "nodes": [{k: v for k, v in n.items() if k not in STANDARDIZE_FIELDS}
                                       if n["name"] in self.convs else n for n in arch["nodes"]]}
        self.written = [name for name in self.convs if by_name[f"{name}.weight"].varies]
        for name in self.convs:
            plan = by_name[f"{name}.weight"]
            gain = by_name.get(f"{name}.gain")
            if plan.plan == "own":  # each task's own weight, standardised once: the plan's arrays from now on
                plan.per_task = [self._standardized(name, w, gain_value(gain, t)) for t, w in enumerate(plan.per_task)]
            elif plan.plan == "static":  # one weight and gain for every task (an unfactored shared one): once
                plan.base = self._standardized(name, plan.base, gain_value(gain, 0))

    def _standardized(self, name: str, weight: np.ndarray, gain: np.ndarray | None, out: np.ndarray | None = None
                      ) -> np.ndarray:
        eps, scale = self.convs[name]
        return check_finite(name, standardized(weight, gain, eps, scale, out), gain, scale)

    def after_fill(self, tensors: dict[str, Any], gain_of: Callable[[str], Any], xp: Any = np) -> None:
        """Standardise, in place, each written weight a slot's fill left in `tensors` (numpy arrays, or `xp`'s: a
        device slot's views); `gain_of(tensor)`: its gain. One finiteness check over all of them (on a device: one
        read back), then, only if it fails, the conv to name."""
        done = []
        for name in self.written:
            weight = tensors[f"{name}.weight"]
            gain = gain_of(f"{name}.gain") if f"{name}.gain" in self.gains else None
            standardized(weight, gain, *self.convs[name], out=weight, xp=xp)
            done.append((name, weight, gain))
        if done and not bool(xp.stack([xp.isfinite(w).all() for _, w, _ in done]).all()):
            for name, weight, gain in done:
                check_finite(name, weight, gain, self.convs[name][1], xp)


    def fold(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`params` (a task's `materialize`) with the weights of the convs standardised here standardised: what the
        session reads for them (`TaskRuntime.bound_tensors`); `params` unchanged."""
        out = dict(params)
        for name in self.convs:
            gain = params.get(f"{name}.gain") if f"{name}.gain" in self.gains else None
            out[f"{name}.weight"] = self._standardized(name, params[f"{name}.weight"], gain)
        return out


def gain_value(plan: TensorPlan | None, t: int, host: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    """Task t's value of a gain tensor whatever its plan: a slot's buffer (filled for t), its own array, the base;
    None for a conv without a gain (``std_gain`` false)."""
    if plan is None:
        return None
    return plan.task_view(host[plan.name], t) if plan.varies else plan.value(t)  # a filled buffer is not refilled
