"""Baseline `finetune`: one shared trunk trained on every task in turn with Adam, a head per task. It forgets —
that is its job: it shows a benchmark can tell forgetting from remembering. BatchNorm is part of the one trunk: every
task trains its affine pair and moves its running statistics (`edgecl.train.batchnorm`'s "shared" rule)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.deltas import PackedModel, TaskInfo
from edgecl.train.batchnorm import leaves, recalibrate, trainable
from edgecl.train.data import TaskData
from edgecl.train.models import Params, forward, init_head, to_numpy
from edgecl.train.protocol import Method, TrainContext, adam, run_epochs, task_generator


def fit(arch, params: Params, trainable: list[torch.Tensor], task: TaskData, config, ctx: TrainContext, t: int,
        desc: str, batch_stats: bool = True) -> None:
    """Plain Adam on cross-entropy for config.epochs epochs: the training loop the baselines share. BatchNorm runs on
    batch statistics (and updates the running ones in `params`) when `batch_stats`, else on the running ones."""
    with ctx.bar(config.epochs, desc) as bar:
        run_epochs(task, adam(trainable, config.lr),
                   lambda x, y: F.cross_entropy(forward(arch, params, x, train=batch_stats), y),
                   epochs=config.epochs, batch_size=config.batch_size, generator=task_generator(config, t), bar=bar,
                   device=ctx.device)


class Finetune(Method):
    name = "finetune"

    def __init__(self, arch, config=None, start=None):
        super().__init__(arch, config, start)
        self.trunk: Params = self.initial_params()
        self.heads: list[Params] = []
        self.infos: list[TaskInfo] = []

    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        params = leaves({**self.trunk, **init_head(self.arch, task.n_classes)}, ctx.device)
        fit(self.arch, params, trainable(params), task, self.config, ctx, t, f"finetune task {t}")
        recalibrate(self.arch, params, task, ctx.device)
        self.trunk = {k: params[k].detach().cpu() for k in self.trunk}
        self.heads.append({k: params[k].detach().cpu() for k in ("head.weight", "head.bias")})
        self.infos.append(TaskInfo(task.name, task.n_classes))

    def pack(self) -> PackedModel:
        params = {k: {"kind": "shared"} for k in self.trunk}
        params.update({"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}})
        return PackedModel(self.arch, self.name, self.config.to_json(), params, to_numpy(self.trunk),
                           list(self.infos), [to_numpy(h) for h in self.heads])
