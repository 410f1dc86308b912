"""Baseline `stl` (single-task learning): an independent model per task. No forgetting, no sharing, N× the bytes —
the accuracy reference the papers compare against. Each task's model has its own BatchNorm (affine pair and
running statistics), like every other tensor of it — except the trunk's constants (a frozen position embedding),
which every task takes from task 0's draw and the artifact stores once."""
from __future__ import annotations

import torch

from edgecl.arch.spec import frozen_tensors
from edgecl.deltas import PackedModel, TaskInfo
from edgecl.train.batchnorm import leaves, recalibrate, trainable
from edgecl.train.data import TaskData
from edgecl.train.methods.finetune import fit
from edgecl.train.models import Params, init_head, init_params, to_numpy
from edgecl.train.protocol import Method, TrainContext


class STL(Method):
    name = "stl"
    redraws_trunk = True  # each task's model starts from a fresh draw

    def __init__(self, arch, config=None, start=None):
        super().__init__(arch, config, start)
        self.models: list[Params] = []
        self.infos: list[TaskInfo] = []

    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        gen = torch.Generator().manual_seed(self.config.seed * 1000 + t)
        fresh = self.initial_params(gen)
        if self.models:  # constants are one for all tasks
            fresh.update({k: self.models[0][k].detach().cpu() for k in frozen_tensors(self.arch)})
        params = leaves({**fresh, **init_head(self.arch, task.n_classes, gen)}, ctx.device)
        fit(self.arch, params, trainable(params), task, self.config, ctx, t, f"stl task {t}")
        recalibrate(self.arch, params, task, ctx.device)
        self.models.append(params)
        self.infos.append(TaskInfo(task.name, task.n_classes))

    def pack(self) -> PackedModel:
        names = self.models[0].keys() if self.models else init_params(self.arch).keys()
        shared = frozen_tensors(self.arch)
        params = {k: {"kind": "shared" if k in shared else "task"} for k in names}
        base = to_numpy({k: self.models[0][k] for k in shared}) if self.models else {}
        return PackedModel(self.arch, self.name, self.config.to_json(), params, base, list(self.infos),
                           [to_numpy({k: v for k, v in m.items() if k not in shared}) for m in self.models])
