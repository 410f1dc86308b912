"""RGO's feature encoding layers (FEL, paper Section 4.1) on a graph: which channels each task sees in its own order.

The paper attaches a virtual FEL to each layer of a chain: a task-seeded permutation of the layer's output features,
so the next layer reads them in a task-specific order. Permuting a layer's outputs is the same as permuting its
weight rows and bias, which is how the permutation is folded into the stored tensors (the `permute` delta kind). On a
graph one layer's output is not one layer's business: a residual `add` or a per-channel `mul` gate makes several
layers' outputs one unit (a *channel group*, `edgecl.arch.channel_map`), BatchNorm and depthwise convolutions carry
those channels on. One permutation per group, applied to every tensor whose axis 0 lies in the group — producers'
rows, biases, shared BatchNorm channels, depthwise rows — keeps residual sums and gates aligned, while every reader
(conv/linear columns, the heads) sees the features in the task's order. The group name is the permutation's key, so
the `permute` deltas of one group (``group`` = the group's name) always move together.

A group gets no FEL (its channels keep one order in every task), with the reason recorded, when:

- it is the network input, which no task may reorder;
- a shared tensor's rows span more than the group once — a concatenation gated per channel (an SE gate over a
  `cat`: its expand conv's rows are the blocks of the concatenation) or a flatten: the `permute` delta moves a tensor's
  rows by one permutation of its whole axis, which cannot permute each block alike;
- a grouped (not depthwise) convolution produces it: a permutation would move filters between conv groups, and each
  conv group's projection (`rgo_ops`) describes the inputs of one group only.

Tensors stored per task (BatchNorm under the "task" rule, the heads) are trained in each task's own order and never
constrain a group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgecl.arch.channels import channel_map
from edgecl.arch.spec import INPUT, Arch, is_depthwise, node_by_name
from edgecl.deltas import task_permutation


@dataclass
class FELPlan:
    groups: dict[str, int] = field(default_factory=dict)  # group with a FEL → number of channels
    tensor_group: dict[str, str] = field(default_factory=dict)  # shared tensor → the group its rows follow
    skipped: dict[str, str] = field(default_factory=dict)  # group without a FEL → why

    def permutations(self, seed: int | None) -> dict[str, torch.Tensor]:
        """Each FEL group's permutation for the task with this seed (none without a seed)."""
        if seed is None:
            return {}
        return {g: torch.from_numpy(task_permutation(seed, g, n)) for g, n in self.groups.items()}

    def orders(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensor → the index its rows are taken with in the task of `perms`."""
        return {k: perms[g] for k, g in self.tensor_group.items() if g in perms}


def fel_plan(arch: Arch, per_task: set[str] | frozenset[str] = frozenset()) -> FELPlan:
    """The channel groups of `arch` that get a FEL, and which tensors' rows each permutes. `per_task`: tensors
    stored per task (they follow each task's order by being trained in it)."""
    cm = channel_map(arch)
    nodes = node_by_name(arch)
    plan = FELPlan()
    for group, tensors in cm.members().items():
        shared = [k for k in tensors if k not in per_task]
        if not shared:
            continue
        reason = _refusal(group, shared, cm.rows, nodes)
        if reason:
            plan.skipped[group] = reason
        else:
            plan.groups[group] = cm.groups[group]
            plan.tensor_group.update({k: group for k in shared})
    return plan


def _refusal(group: str, shared: list[str], rows: dict, nodes: dict) -> str | None:
    if group == INPUT:
        return "it is the network input, which no task may reorder"
    for tensor in shared:
        if rows[tensor] != [(group, 1)]:
            return (f"the rows of {tensor} are {len(rows[tensor])} blocks {rows[tensor]} (a concatenation or flatten);"
                    f" a permute delta reorders a tensor's axis by one permutation and cannot permute each block")
        node = nodes[tensor.rsplit(".", 1)[0]]
        if node["op"] == "conv" and node["groups"] > 1 and not is_depthwise(node):
            return (f"{tensor} is a grouped convolution ({node['groups']} groups): a permutation would move its "
                    f"filters between conv groups, whose projections describe different inputs")
    return None
