"""AGS-CL's node importance measure (8) (method: `agscl.py`): how active each node is on a task's training data,
read where its value enters the rest of the network."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.arch import Arch
from edgecl.train import distributed
from edgecl.train.data import TaskData
from edgecl.train.methods.agscl_affine import BiasMasks
from edgecl.train.methods.agscl_nodes import NodeMap
from edgecl.train.models import Params, activation, forward
from edgecl.train.protocol import batches


def node_activity(arch: Arch, nodes: NodeMap, trunk: Params, task: TaskData, device: str,
                  important: np.ndarray | None, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each node's mean activity over the task's training data (spatial mean for convs), averaged over the
    conv/linear outputs of its group, each after the BatchNorm that follows it and read as its readers read it: the
    mean ReLU activation where every reader reads it through a ReLU (`NodeMap.relu_read`: the paper's), the mean
    |GELU(a)| of one a GELU, SiLU, … alone reads (`NodeMap.passes`), else the mean |a| (a value below 0 that a
    LayerNorm, attention, a plain layer, a gate or the head reads is used); channels no layer writes stay 0. Measured
    on the network the task trained (`important`: the nodes important before it, whose affine biases are never masked).
    With `features`, the same pass also gives the mean of the head's input features (what `fold_into_head` folds):
    one pass over the data, not two. Every rank's samples count (`distributed.all_sum`)."""
    params = {k: v.to(device) for k, v in trunk.items()}
    bias = BiasMasks(arch, nodes, device)
    bias.update(params, np.zeros(nodes.n, bool) if important is None else important)
    params = bias.apply(params)
    rows = {w: torch.from_numpy(nodes.rows[w]).to(device) for w in nodes.hooks.values()}
    total = torch.zeros(nodes.n, device=device)
    summed = torch.zeros(len(nodes.head), device=device)  # the head's input features, summed over the data

    def hook(name: str, h: torch.Tensor) -> torch.Tensor:
        a, bn = h, nodes.bn_after.get(name)
        if bn is not None:
            b = bn["name"]
            a = F.batch_norm(a, params[f"{b}.running_mean"], params[f"{b}.running_var"], params[f"{b}.weight"],
                             params[f"{b}.bias"], training=False, eps=bn["eps"])
        a = F.relu(a) if name in nodes.relu_read else \
            activation(nodes.passes[name], a).abs() if name in nodes.passes else a.abs()
        total.index_add_(0, rows[nodes.hooks[name]], (a.flatten(2).mean(2) if a.dim() > 2 else a).sum(0))
        return h

    with torch.no_grad():
        for x, _ in batches(task, 512, torch.Generator().manual_seed(0), device):  # order is irrelevant
            out = forward(arch, params, x, hook=hook, head=False)
            if features:
                summed += out.reshape(len(x), -1).sum(0)
    total = distributed.all_sum(total)  # every rank's samples (each read its slice of every batch)
    counts = torch.from_numpy(nodes.row_counts()).to(total.dtype).clamp(min=1)  # unwritten nodes: Ω stays 0
    activity = total.cpu() / len(task.x_train) / counts
    return activity, (distributed.all_sum(summed) / len(task.x_train)).cpu() if features else None
