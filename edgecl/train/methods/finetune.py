"""Baseline `finetune`: one shared trunk trained on every task in turn with Adam, a head per task. It forgets —
that is its job: it shows a benchmark can tell forgetting from remembering."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.deltas import PackedModel, TaskInfo
from edgecl.train.models import Params, forward, init_head, init_params, to_numpy
from edgecl.train.protocol import Method, TrainContext, adam, run_epochs, task_generator
from edgecl.train.data import TaskData


def fit(arch, params: Params, trainable: list[torch.Tensor], task: TaskData, config, ctx: TrainContext, t: int,
        desc: str) -> None:
    """Plain Adam on cross-entropy for config.epochs epochs: the training loop the baselines share."""
    with ctx.bar(config.epochs, desc) as bar:
        run_epochs(task, adam(trainable, config.lr),
                   lambda x, y: F.cross_entropy(forward(arch, params, x, train=True), y), epochs=config.epochs,
                   batch_size=config.batch_size, generator=task_generator(config, t), bar=bar, device=ctx.device)


class Finetune(Method):
    name = "finetune"

    def __init__(self, arch, config=None):
        super().__init__(arch, config)
        self.trunk = {k: v.requires_grad_(True) for k, v in init_params(arch).items()}
        self.heads: list[Params] = []
        self.infos: list[TaskInfo] = []

    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        head = init_head(self.arch, task.n_classes)
        self.trunk = {k: v.to(ctx.device).detach().requires_grad_(True) for k, v in self.trunk.items()}
        params = {**self.trunk, **{k: v.to(ctx.device).detach().requires_grad_(True) for k, v in head.items()}}
        trainable = [v for k, v in params.items() if "running" not in k]
        fit(self.arch, params, trainable, task, self.config, ctx, t, f"finetune task {t}")
        self.heads.append({k: params[k] for k in ("head.weight", "head.bias")})
        self.infos.append(TaskInfo(task.name, task.n_classes))

    def pack(self) -> PackedModel:
        params = {k: {"kind": "shared"} for k in self.trunk}
        params.update({"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}})
        return PackedModel(self.arch, self.name, self.config.to_json(), params, to_numpy(self.trunk),
                           list(self.infos), [to_numpy(h) for h in self.heads])
