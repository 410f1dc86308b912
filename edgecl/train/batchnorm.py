"""BatchNorm under a continual-learning method: which tasks learn it, whether it runs on batch statistics, and where
its tensors live in the packed model. The one place these rules are implemented, so methods cannot disagree.

A BatchNorm layer has an affine pair (weight, bias) that gradient descent learns and running statistics (mean,
variance) that are buffers: updated by the forward in training mode, never trainable. What a method may do with them
follows from its guarantee about earlier tasks — a shared running mean that keeps moving changes every old task:

- ``task``: every task learns its own affine pair and statistics (``task``-kind deltas, 4 floats per channel per
  task); earlier tasks' BatchNorm is never touched again. Each task starts from task 0's values.
- ``frozen``: task 0 learns them, later tasks run them as fixed (inference-mode) layers: one shared copy.
- ``shared``: every task goes on training one shared copy (the `finetune` baseline: it forgets by design).
- ``identity``: no task learns them; every layer is held at the identity (weight 1, bias 0, mean 0, variance
  1 − eps) in training and in the stored model, so the network trained and deployed is the one without BatchNorm
  (RGO's paper removes BatchNorm: "its parameters are not updated by gradient descent").

The same rule covers the other per-channel affine tensors (`CHANNEL_AFFINE_OPS`): a LayerNorm's weight and bias,
a layer scale's factors (ConvNeXt) and a global response norm's pair (ConvNeXt V2); they have no statistics, and
their identity is weight 1, bias 0 (a LayerNorm held so still normalises; a global response norm's is weight 0).

Methods keep BatchNorm tensors as training leaves from `start`, run the forward with ``train=batch_stats(t)``,
`settle` the running statistics once the task's weights are final and hand the trained tensors back with
`commit`. A method whose tasks see a trunk's channels in a task-specific order
(RGO's feature encoding) passes that order: shared copies are stored in the trunk's own channel order.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edgecl.arch.ops import CHANNEL_AFFINE_OPS
from edgecl.arch.spec import Arch, param_shapes
from edgecl.deltas import PackedModel
from edgecl.errors import UsageError
from edgecl.train.data import TaskData
from edgecl.train.models import Params, forward, to_numpy
from edgecl.train.protocol import shards

RULES = ("task", "frozen", "shared", "identity")
RECALIBRATION_BATCH = 256
SIGNAL_BATCH = 64
MIN_SIGNAL = 1e-4  # features' std ÷ input's std below which a network without BatchNorm is refused (`check_signal`)
STATISTICS = ("running_mean", "running_var")


def batchnorm_names(arch: Arch) -> list[str]:
    """Every BatchNorm tensor of the trunk (affine pairs and running statistics), and every other per-channel affine
    tensor (LayerNorm, layer scale, global response norm), in node order."""
    bn = {n["name"] for n in arch["nodes"] if n["op"] in CHANNEL_AFFINE_OPS}
    return [k for k in param_shapes(arch) if k.rsplit(".", 1)[0] in bn]


def is_statistic(name: str) -> bool:
    """True for running statistics: buffers the forward updates, never trainable."""
    return name.rsplit(".", 1)[-1] in STATISTICS


def leaves(params: Params, device: str | torch.device, trainable=lambda name: True) -> Params:
    """Detached copies on `device`; every tensor that `trainable(name)` allows and that is not a running statistic
    requires grad. How every method turns stored tensors into what its optimiser trains."""
    return {k: v.detach().clone().to(device).requires_grad_(trainable(k) and not is_statistic(k))
            for k, v in params.items()}


def recalibrate(arch: Arch, params: Params, task: TaskData, device: str | torch.device = "cpu",
                batch_size: int = RECALIBRATION_BATCH, silence: bool = True) -> None:
    """Set the running statistics in `params` to the average of the batch statistics over the task's training data,
    computed with the final weights (a cumulative average: momentum 1/k on the k-th batch). The moving average
    kept during training trails weights that were still moving: with RGO's SGD (lr 0.1, batch 10) on the resnet
    preset, task 0's accuracy read 0.61 / 0.98 / 0.98 / 0.85 after 2 / 4 / 6 / 8 epochs before this pass. Under
    several ranks each forwards its slice of every batch and the batch statistics are the global batch's. Then
    `silence_noise_channels`, unless `silence` is False (a method whose γ is shared with earlier tasks, which a
    later task's statistics must not change)."""
    if not any(n["op"] == "bn" for n in arch["nodes"]):
        return
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, (x, _, size) in enumerate(shards(task, batch_size, generator, device), 1):
            if size == 1 and k > 1:
                break
            pass_k = {**arch, "nodes": [{**n, "momentum": 1.0 / k} if n["op"] == "bn" else n for n in arch["nodes"]]}
            forward(pass_k, params, x, train=True, head=False)
        if silence:
            silence_noise_channels(arch, params)


NOISE_VARIANCE = 1e-6  # × eps: below it a channel's spread over the task's data is float rounding, not signal


def silence_noise_channels(arch: Arch, params: Params) -> int:
    """Set γ = 0 (the output becomes β exactly) on every BatchNorm channel whose running variance is below
    NOISE_VARIANCE·eps. Such a channel (a pruned filter reading almost nothing: LPS at α = 10 % on mobilenet_v2 leaves
    hundreds) varies by less than 1e-3·√eps over the task's data, and BatchNorm multiplies that rounding noise by
    γ/√eps ≈ 316γ; through a dozen blocks the noise reached the logits: float32 and float64 forwards of one trained
    model differed by 0.08, ONNX Runtime and torch by 0.68, at equal accuracy. Silenced, they differ by 1e-4 and
    the accuracy is unchanged (measured on 2,006 channels). Runs where the statistics are set, before the task is
    evaluated or packed, so training, artifact and device compute the same network. Returns the number silenced."""
    silenced = 0
    for node in arch["nodes"]:
        if node["op"] == "bn" and f"{node['name']}.weight" in params:
            noise = params[f"{node['name']}.running_var"] < NOISE_VARIANCE * node["eps"]
            if bool(noise.any()):
                params[f"{node['name']}.weight"].data.masked_fill_(noise, 0.0)
                silenced += int(noise.sum())
    return silenced


def trainable(params: Params) -> list[torch.Tensor]:
    """The tensors of `params` an optimiser should step (those that require grad)."""
    return [v for v in params.values() if v.requires_grad]


class RuledTensors:
    """Named tensors kept under one of the rules (see the module docstring): BatchNorm's, or any other a method
    stores per task (RGO's layers whose rows are several blocks)."""

    def __init__(self, names: list[str], rule: str, init: Params):
        if rule not in RULES:
            raise UsageError(f"unknown BatchNorm rule {rule!r} (known: {', '.join(RULES)})")
        self.rule = rule
        self.names = list(names)
        # what a new task starts from: task 0's tensors ("task", "frozen") or the latest ones ("shared"), stored in
        # the trunk's own channel order
        self.start_values: Params = {k: init[k].detach().clone() for k in self.names}
        self.per_task: list[Params] = []  # rule "task": each task's tensors, in that task's channel order

    def learns(self, t: int) -> bool:
        """Whether task t trains these tensors (BatchNorm then also runs on batch statistics, training mode)."""
        return self.rule in ("task", "shared") or (self.rule == "frozen" and t == 0)

    def start(self, t: int, device: str | torch.device = "cpu", order: dict[str, torch.Tensor] | None = None) -> Params:
        """Task t's BatchNorm tensors as leaves on `device`: the affine pair trainable when the task learns it.
        `order` (tensor → index over its channels) gives channels in the task's order."""
        values = self._ordered(self.start_values, order, inverse=False)
        return leaves(values, device, lambda name: self.learns(t))

    def commit(self, t: int, params: Params, order: dict[str, torch.Tensor] | None = None) -> None:
        """Keep what task t leaves: its own copy ("task"), task 0's copy as every task's start, the latest ("shared").
        `order` as in `start`: shared copies go back to the trunk's channel order."""
        values = {k: params[k].detach().cpu().clone() for k in self.names}
        if self.rule == "task":
            self.per_task.append(values)
        if t == 0 or self.rule == "shared":
            self.start_values = self._ordered(values, order, inverse=True)

    def _ordered(self, values: Params, order: dict[str, torch.Tensor] | None, inverse: bool) -> Params:
        if not order:
            return dict(values)
        out = {}
        for k, v in values.items():
            index = order.get(k)
            if index is not None:
                index = index.cpu()
                v = v.index_select(0, torch.argsort(index) if inverse else index)
            out[k] = v
        return out

    # -- the packed form --------------------------------------------------------------------------------------
    def specs(self, groups: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """Delta specs: ``task`` per task, else ``shared`` — or ``permute`` with the channel group a shared tensor's
        rows follow when tasks see the channels in their own order (`groups`: tensor → group)."""
        if self.rule == "task":
            return {k: {"kind": "task"} for k in self.names}
        groups = groups or {}
        return {k: {"kind": "permute", "group": groups[k]} if k in groups else {"kind": "shared"} for k in self.names}

    def base(self) -> dict[str, np.ndarray]:
        """The shared tensors (none under the "task" rule)."""
        return {} if self.rule == "task" else to_numpy(self.start_values)

    def task_tensors(self, t: int) -> dict[str, np.ndarray]:
        """Task t's own tensors (only under the "task" rule)."""
        return to_numpy(self.per_task[t]) if self.rule == "task" else {}

    def resume(self, packed: PackedModel) -> None:
        """Take the tensors back from a packed model that keeps them under this rule."""
        if self.rule == "task":
            self.per_task = [{k: _tensor(tt[k]) for k in self.names} for tt in packed.task_tensors]
            self.start_values = dict(self.per_task[0])
        else:
            self.start_values = {k: _tensor(packed.base[k]) for k in self.names}


class BatchNorm(RuledTensors):
    """The BatchNorm tensors of one trunk under one rule (see the module docstring)."""

    def __init__(self, arch: Arch, rule: str, init: Params):
        super().__init__(batchnorm_names(arch), rule, identity(arch, init) if rule == "identity" else init)

    batch_stats = RuledTensors.learns

    def specs(self, groups: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """As `RuledTensors.specs`; the identity is the same in every channel order, so it is stored shared."""
        return super().specs(None if self.rule == "identity" else groups)

    def check_signal(self, arch: Arch, params: Params, task: TaskData, who: str) -> None:
        """Under "identity": refuse a network that, without BatchNorm, does not carry its input to the features at
        initialisation (measured: torchvision mobilenet_v2's features are 1e-9 of its input's scale, so no gradient
        reaches its layers and it never trains), instead of training it to chance."""
        if self.rule != "identity" or not self.names:
            return
        x = torch.from_numpy(np.asarray(task.x_train[:SIGNAL_BATCH], dtype=np.float32))
        with torch.no_grad():
            features = forward(arch, {k: v.detach().cpu() for k, v in params.items()}, x, head=False)
        ratio = float(features.std() / x.std().clamp_min(1e-12))
        if not ratio >= MIN_SIGNAL:
            raise UsageError(f"{who}: batchnorm='identity' removes BatchNorm, and without it {arch.get('name', 'this')}"
                             f" network's features are {ratio:.1e} of its input's scale at initialisation (below "
                             f"{MIN_SIGNAL:g}): it cannot train; use batchnorm='task'")

    def settle(self, t: int, arch: Arch, params: Params, task: TaskData, device: str | torch.device = "cpu") -> None:
        """Once task t's weights are final: its running statistics from them (`recalibrate`), when it learns them.
        `params` holds every tensor the forward needs, BatchNorm's the ones `commit` will keep."""
        if self.learns(t):
            recalibrate(arch, params, task, device)

    def resume(self, packed: PackedModel) -> None:
        """Take the tensors back from a packed model. An artifact written before methods had a `batchnorm` setting
        keeps the rule it was trained with (read from its delta kinds; the method stores it in its config); one that
        has the setting must match this rule (UsageError otherwise)."""
        found = rule_in(packed, self.names)
        stored = packed.config.get("batchnorm")
        if stored is not None and (stored == "identity") != (self.rule == "identity"):
            raise UsageError(f"cannot resume: the artifact was trained with batchnorm={stored!r}, this config has "
                             f"batchnorm={self.rule!r} (a network with BatchNorm held at the identity is another "
                             f"network)")
        if found is not None and "batchnorm" not in packed.config:
            self.rule = found
        elif found is not None and found != ("task" if self.rule == "task" else "frozen"):
            raise UsageError(f"cannot resume: the artifact keeps BatchNorm {_WORDS[found]}, this config "
                             f"(batchnorm={self.rule!r}) {_WORDS['task' if self.rule == 'task' else 'frozen']}")
        super().resume(packed)


def identity(arch: Arch, params: Params) -> Params:
    """`params` with every BatchNorm layer set to the identity map: weight 1, bias 0, running mean 0 and running
    variance 1 − eps, so (x − mean)/sqrt(var + eps) is x to float rounding; LayerNorm and layer scale tensors at
    weight 1, bias 0; a global response norm at weight 0, bias 0 (the identity map)."""
    out = dict(params)
    zero_weight = {f"{n['name']}.weight" for n in arch["nodes"] if n["op"] == "grn"}  # its identity: weight 0
    for key in batchnorm_names(arch):
        if not is_statistic(key):
            one = key.endswith(".weight") and key not in zero_weight
            out[key] = torch.ones_like(params[key]) if one else torch.zeros_like(params[key])
    for node in arch["nodes"]:
        if node["op"] == "bn":
            name = node["name"]
            ones = torch.ones_like(params[f"{name}.weight"])
            out.update({f"{name}.running_mean": torch.zeros_like(ones), f"{name}.running_var": ones - node["eps"]})
    return out


_WORDS = {"task": "per task", "frozen": "shared (learned on the first task)"}


def rule_in(packed: PackedModel, names: list[str] | None = None) -> str | None:
    """The BatchNorm rule a packed model was made with, read from its delta kinds: "task" when BatchNorm tensors
    are per task, "frozen" when they are shared (or permuted); None without BatchNorm. Artifacts written before
    methods had a `batchnorm` setting carry no other record of it."""
    names = batchnorm_names(packed.arch) if names is None else names
    kinds = {packed.params[k]["kind"] for k in names if k in packed.params}
    if not kinds:
        return None
    if len(kinds) > 1 and "task" in kinds:
        raise UsageError(f"cannot resume: BatchNorm tensors mix delta kinds {sorted(kinds)}")
    return "task" if kinds == {"task"} else "frozen"


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))
