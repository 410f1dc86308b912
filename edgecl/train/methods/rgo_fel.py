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

A conv/linear layer whose rows hold several blocks — the expand conv of an SE gate over a concatenation, whose rows
are the concatenation's blocks — cannot take its groups' permutations through a `permute` delta (one permutation of
the whole axis, which cannot permute each block alike). Such a layer is stored per task instead (weight and bias,
trained in each task's order, like per-task BatchNorm: its bytes per task are the price of the FEL), when that lets
one of its groups have a FEL. A group gets no FEL (its channels keep one order in every task), with the reason
recorded, when:

- it is the network input, which no task may reorder;
- a grouped (not depthwise) convolution produces it: a permutation would move filters between conv groups, and each
  conv group's projection (`rgo_ops`) describes the inputs of one group only;
- a shared tensor other than a conv/linear layer's has rows of several blocks (BatchNorm after a concatenation or
  flatten under the "frozen" rule);
- its channels are read in a fixed order (`ChannelMap.ordered`): a ``channel_conv`` (ECA) reads them as neighbours,
  an ``attention`` its q, k and v as heads of contiguous channels; permuted, channel i would be mixed with other
  channels than in the network trained.

Tensors stored per task (BatchNorm under the "task" rule, the heads) are trained in each task's own order and never
constrain a group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgecl.arch.channels import channel_map
from edgecl.arch.spec import INPUT, WEIGHT_OPS, Arch, is_depthwise, node_by_name
from edgecl.deltas import task_permutation


@dataclass
class FELPlan:
    groups: dict[str, int] = field(default_factory=dict)  # group with a FEL → number of channels
    tensor_group: dict[str, str] = field(default_factory=dict)  # shared tensor → the group its rows follow
    skipped: dict[str, str] = field(default_factory=dict)  # group without a FEL → why
    per_task: list[str] = field(default_factory=list)  # conv/linear tensors of several blocks, stored per task
    follows: dict[str, str] = field(default_factory=dict)  # per-task tensor in one FEL group → that group

    def permutations(self, seed: int | None) -> dict[str, torch.Tensor]:
        """Each FEL group's permutation for the task with this seed (none without a seed)."""
        if seed is None:
            return {}
        return {g: torch.from_numpy(task_permutation(seed, g, n)) for g, n in self.groups.items()}

    def orders(self, perms: dict[str, torch.Tensor], follows: bool = False) -> dict[str, torch.Tensor]:
        """Tensor → the index its rows are taken with in the task of `perms`; with `follows`, also the per-task
        tensors of one FEL group (what a task's copy starts from is taken in its order)."""
        groups = {**self.tensor_group, **(self.follows if follows else {})}
        return {k: perms[g] for k, g in groups.items() if g in perms}


def fel_plan(arch: Arch, per_task: set[str] | frozenset[str] = frozenset()) -> FELPlan:
    """The channel groups of `arch` that get a FEL, which tensors' rows each permutes, and the conv/linear tensors
    that go per task so their groups can. `per_task`: tensors already stored per task (they follow each task's
    order by being trained in it)."""
    cm = channel_map(arch)
    nodes = node_by_name(arch)
    members = {g: [k for k in tensors if k not in per_task] for g, tensors in cm.members().items()}
    blocked = [k for k in cm.rows if k not in per_task and _layer_op(k, nodes) in WEIGHT_OPS and len(cm.rows[k]) > 1]
    plan = FELPlan()
    for group, tensors in members.items():
        reason = _refusal(group, [k for k in tensors if k not in blocked], cm.rows, nodes) or (
            "its channels are read in a fixed order (a channel_conv's neighbours, attention heads' contiguous "
            "blocks); a permutation would change which channels meet" if group in cm.ordered else None)
        if reason:
            plan.skipped[group] = reason
        elif tensors:
            plan.groups[group] = cm.groups[group]
    plan.per_task = [k for k in blocked if any(g in plan.groups for g, _ in cm.rows[k])]
    for group in list(plan.groups):
        shared = [k for k in members[group] if k not in blocked]
        if shared:
            plan.tensor_group.update({k: group for k in shared})
        else:  # only per-task tensors: nothing to permute
            del plan.groups[group]
    plan.skipped.update({g: "its only layer is stored per task" for g in members if g not in plan.groups and
                         g not in plan.skipped and members[g] and all(k in plan.per_task for k in members[g])})
    plan.follows = {k: rows[0][0] for k, rows in cm.rows.items()
                    if k in per_task and len(rows) == 1 and rows[0][1] == 1 and rows[0][0] in plan.groups}
    for k in [k for k in blocked if k not in plan.per_task]:
        for g, _ in cm.rows[k]:
            plan.skipped.setdefault(g, f"the rows of {k} are {len(cm.rows[k])} blocks and none of their groups can "
                                       f"have a FEL")
    return plan


def _layer_op(tensor: str, nodes: dict) -> str:
    return nodes[tensor.rsplit(".", 1)[0]]["op"]


def _refusal(group: str, shared: list[str], rows: dict, nodes: dict) -> str | None:
    if group == INPUT:
        return "it is the network input, which no task may reorder"
    for tensor in shared:
        node = nodes[tensor.rsplit(".", 1)[0]]
        if node["op"] == "conv" and node["groups"] > 1 and not is_depthwise(node):
            return (f"{tensor} is a grouped convolution ({node['groups']} groups): a permutation would move its "
                    f"filters between conv groups, whose projections describe different inputs")
        if rows[tensor] != [(group, 1)]:
            return (f"the rows of {tensor} are {len(rows[tensor])} blocks {rows[tensor]} (a concatenation or flatten);"
                    f" a permute delta reorders a tensor's axis by one permutation and cannot permute each block")
    return None
