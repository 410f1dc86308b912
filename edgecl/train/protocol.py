"""The one small protocol every continual-learning method implements, plus the helpers they share.

A method sees tasks one at a time: `learn_task(t, task, ctx)` trains it (the method owns its phases), and `pack()`
returns the whole model so far as a `PackedModel` — shared base, per-task deltas, heads. The engine evaluates every
task through `materialize(pack(), t)`, so what is measured during training is exactly what gets deployed.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, NamedTuple

import numpy as np
import torch

from edgecl.arch import Arch
from edgecl.config import MethodConfig
from edgecl.deltas import PackedModel
from edgecl.errors import UsageError
from edgecl.progress import bar as progress_bar
from edgecl.train import distributed
from edgecl.train.data import TaskData
from edgecl.train.initial import StartingWeights
from edgecl.train.models import Params, init_params


@dataclass
class TrainContext:
    """What the engine lends a method: device, progress bars, and a place to leave per-task notes."""

    device: str = "cpu"
    progress: bool = True
    notes: dict[int, dict[str, Any]] = field(default_factory=dict)

    def bar(self, total: int, desc: str):
        """A progress bar (silent when progress is off or off a terminal) that methods advance once per step or
        epoch."""
        return progress_bar(total=total, desc=desc, enabled=self.progress)


class Method(ABC):
    """Base class of a continual-learning method. Subclasses set `name` and `Config` and implement two calls."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # What appending tasks must leave bit-identical for earlier tasks: every tensor ("all"), or only their heads
    # ("heads": methods whose shared trunk keeps learning, like RGO). `edgecl train --resume` verifies it.
    append_keeps: ClassVar[str] = "all"
    # Whether `training_state()` is needed to resume (RGO's projection matrices): only then is the `.state` file beside
    # an artifact read, so a stale one left by an earlier model in the folder cannot block another method's resume.
    has_training_state: ClassVar[bool] = False
    # Whether later tasks draw trunk values again (LPS's free weights, STL's models, AGS-CL's re-initialised nodes):
    # only then does a resume from starting weights need them given again (`edgecl.train.initial`).
    redraws_trunk: ClassVar[bool] = False

    def __init__(self, arch: Arch, config: MethodConfig | None = None, start: StartingWeights | None = None):
        self.arch = arch
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise UsageError(f"method {self.name!r} needs a {self.Config.__name__}, got {type(self.config).__name__}")
        self.start = start
        self.start_record = start.record() if start is not None else None  # what the artifact says it started from
        seed_everything(self.config.seed)

    def not_learned_hint(self) -> str | None:
        """A method's own likely cause when a task stays at chance (a default that does not suit this network),
        printed after the engine's generic one; None where it has none."""
        return None

    def initial_params(self, generator: torch.Generator | None = None) -> Params:
        """The trunk a method starts from (every draw it makes: first, per task, re-initialisations): a fresh
        draw, or the starting weights in its place. The draw is made either way, so the generator advances alike and
        heads drawn after it are the same with or without starting weights."""
        params = init_params(self.arch, generator=generator)
        if self.start is not None:
            params.update({k: torch.from_numpy(v.copy()) for k, v in self.start.values.items()})
        return params

    @abstractmethod
    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        """Learn task t (0-based, in order) with all of the method's phases."""

    @abstractmethod
    def pack(self) -> PackedModel:
        """The model after the tasks learned so far, as shared base + per-task deltas + heads (numpy copies)."""

    def resume(self, packed: PackedModel, state: dict[str, np.ndarray] | None = None) -> None:
        """Continue from a deployed model (lifelong append); `state` is what `training_state()` returned when the
        model was trained. Methods that support it override this."""
        raise UsageError(f"method {self.name!r} cannot resume from an artifact")

    def training_state(self) -> dict[str, np.ndarray]:
        """Tensors needed to go on learning that the deployed model does not need (RGO's projection matrices).
        Saved beside the artifact, never inside it, so devices do not carry them."""
        return {}


def check_resumable(packed: PackedModel, method_name: str, arch: Arch) -> None:
    """Resume only into the same method and architecture: anything else would silently retrain from scratch. The
    one check every method's `resume` and `edgecl train --resume` run."""
    if packed.method != method_name:
        raise UsageError(f"cannot resume a model made by method {packed.method!r} with {method_name!r}")
    if packed.arch != arch:
        raise UsageError(f"cannot resume: architecture {packed.arch.get('name')!r} {packed.arch.get('input_shape')} "
                         f"differs from {arch.get('name')!r} {arch.get('input_shape')}"
                         f"{_first_difference(packed.arch, arch)}")


def _first_difference(old: Arch, new: Arch) -> str:
    """Where two specs of the same name and input first differ, said in their terms (a factory argument changes a
    layer's width, not the name)."""
    for a, b in zip(old.get("nodes", []), new.get("nodes", [])):
        if a != b:
            fields = [k for k in {**a, **b} if a.get(k) != b.get(k)]
            return (f": node {a.get('name')!r} ({a.get('op')}) has " +
                    ", ".join(f"{k}={a.get(k)!r}" for k in fields) + " in the artifact, " +
                    ", ".join(f"{k}={b.get(k)!r}" for k in fields) + " here")
    if len(old.get("nodes", [])) != len(new.get("nodes", [])):
        return f": {len(old.get('nodes', []))} nodes in the artifact, {len(new.get('nodes', []))} here"
    return ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Shard(NamedTuple):
    """This rank's slice of one global mini-batch (all of it in a single process) and the global batch's size."""

    x: torch.Tensor
    y: torch.Tensor
    size: int


def shards(task: TaskData, batch_size: int, generator: torch.Generator, device: str = "cpu") -> Iterator[Shard]:
    """Shuffled global mini-batches of a task's training split, as this rank's slice of each: every rank draws the
    same permutation from `generator` and takes its part (`distributed.local_part`), so N ranks together see exactly
    the batches one process sees."""
    x, y = torch.from_numpy(task.x_train), torch.from_numpy(task.y_train)
    order = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        part = distributed.local_part(idx)
        yield Shard(x[part].to(device), y[part].to(device), len(idx))


def batches(task: TaskData, batch_size: int, generator: torch.Generator,
            device: str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of a task's training split: under several ranks this rank's slice of each (`shards`),
    so whatever a caller computes from them must be summed or gathered across ranks (`edgecl.train.distributed`)."""
    for shard in shards(task, batch_size, generator, device):
        yield shard.x, shard.y


def run_epochs(task: TaskData, opt: torch.optim.Optimizer, loss_fn, *, epochs: int, batch_size: int,
               generator: torch.Generator, bar, device: str = "cpu", after_backward=None, after_step=None,
               end_of_epoch=None, zero_to_none: bool = True) -> None:
    """The one mini-batch loop every method trains with. Per batch: zero the grads, `loss_fn(x, y)`, backward,
    `after_backward()` (gradient edits: projections, closed-form penalties), step, `after_step()` (proximal maps,
    cuts); per epoch: `end_of_epoch(epoch)`, then one tick of `bar`. Methods differ only in these hooks. A
    non-finite loss stops training with a UsageError (a diverged model is never packed or written). A last
    batch of one sample is left out (a different one each epoch): BatchNorm in training mode cannot normalise a
    channel from one value (the 1×1 feature maps ImageNet-style networks reach on small inputs). Under several ranks
    each computes its slice of every global batch and the gradients are summed before the hooks run, so the hooks and
    the step see the gradient one process would (`edgecl.train.distributed`)."""
    for epoch in range(epochs):
        for x, y, size in shards(task, batch_size, generator, device):
            if size == 1 and len(task.x_train) > 1:
                continue
            opt.zero_grad(set_to_none=zero_to_none)
            loss = distributed.weighted(loss_fn(x, y), len(x), size)
            loss.backward()
            # the global batch's gradient and loss on every rank (nothing alone): every rank stops together, or none
            global_loss = distributed.sum_grads(opt, loss)
            if not bool(torch.isfinite(global_loss)):
                raise UsageError(f"training diverged on task {task.name!r}, epoch {epoch + 1}: the loss is "
                                 f"{float(global_loss.detach())}; nothing was written. Lower the learning rate, or check the "
                                 "data's scale and the network (BatchNorm on 1×1 feature maps of tiny inputs explodes)")
            if after_backward is not None:
                after_backward()
            opt.step()
            if after_step is not None:
                after_step()
        if end_of_epoch is not None:
            end_of_epoch(epoch)
        bar.update(1)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass per tensor, measured 2.5× faster per step than the default on CPU for
    our layer sizes). Every method and baseline uses this one, so training-cost ratios compare like with like."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def task_generator(config: MethodConfig, t: int) -> torch.Generator:
    """A per-task torch generator, so a task's shuffling does not depend on what ran before it."""
    return torch.Generator().manual_seed(config.seed * 1000 + t)
