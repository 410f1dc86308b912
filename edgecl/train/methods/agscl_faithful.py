"""AGS-CL's faithfulness check (method: `agscl.py`): after each task, does the network it deploys compute what it
trained? Ω (8) is read where each node's value is read so that a node cut for Ω = 0 changes no logit, but a cut can
still move them where a value survives that no measure sees (a BatchNorm's shift β right after a ReLU the lasso
silenced in Adam's metric: `tests/test_agscl_deployed.py::ReluThenBn`, logit gap 0.61 on task 0 before this check).

So after the cut, the logits of the trained network (as its training ended, before the cut) and of the task's
deployed network (`AGSCL.deployed`, equal to `materialize(pack(), t)`) are compared on a fixed sample of the task's
training data (`SAMPLE` examples, the same on every run for a seed). A gap above `REL_TOL` × the logits' scale
(+ `ABS_TOL`) is one the cut made: with ``faithful="keep"`` (default) the cut nodes whose cut alone moves the logits are found (per
group, then by bisection inside a moving group) and kept important, and the cut is redone; whatever gap remains (or,
with ``faithful="warn"``, the gap itself) is recorded per task (``deploy_gap``, 0.0 on a healthy run) and above the
tolerance becomes a warning note naming the task, the gap, the groups and the settings to change.

The tolerance, measured on the 21 graphs of `test_agscl_deployed` at its settings (2 seeds, 2 tasks each: 84 task
checks): every gap is 0 but TinyNFNet's float rounding (≤ 2.2e-8, logits of scale 0.03-0.14; scales over all
0.0085-12.7) and no node was kept; the gaps this check exists for are ≥ 7.7e-3 (hgnetv2_b0's head before
`fold_into_head`) up to 0.61. REL_TOL · scale + ABS_TOL sits 45× above that rounding even at the smallest scale and
far below those gaps. A run whose check finds no gap (every ReLU network measured: resnet preset, LeNet, MLP; Ω,
masks and artifact arrays hashed identical with and without the check) computes exactly what it did without it: the
sample is drawn from its own generator and both passes are no-grad evaluations. Cost: one forward of the sample
through the trained network and one through the deployed one per task (plus a one-task `materialize`), measured at
0.7 % of those runs' training time (≤ 3 % on any one); the search for moving nodes runs only above the tolerance.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from edgecl.deltas import TaskInfo
from edgecl.train.data import TaskData
from edgecl.train.methods.agscl_nodes import NodeMap
from edgecl.train.models import Params, forward, from_numpy

SAMPLE = 256  # training examples the trained and deployed logits are compared on
REL_TOL, ABS_TOL = 1e-4, 1e-6  # a gap above REL_TOL · max |trained logit| + ABS_TOL is the cut's, not float rounding


def sample(task: TaskData, seed: int, t: int, device: str) -> torch.Tensor:
    """Up to `SAMPLE` of the task's training inputs, the same on every run for a (seed, task)."""
    n = len(task.x_train)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + t))[:SAMPLE].sort().values
    return torch.from_numpy(task.x_train[pick.numpy()]).to(device)


def tolerance(trained: torch.Tensor) -> float:
    """The largest logit gap counted as float rounding for these trained logits."""
    return REL_TOL * float(trained.abs().max()) + ABS_TOL


def gap(trained: torch.Tensor, deployed: torch.Tensor) -> float:
    """Largest |trained − deployed| logit (inf where the deployed network is not finite)."""
    diff = (trained - deployed).abs().max()
    return float(diff) if torch.isfinite(diff) else float("inf")


def moving_nodes(cut: np.ndarray, groups: dict[str, int], measure: Callable[[np.ndarray], float],
                 tol: float) -> np.ndarray:
    """Bool per node: cut nodes whose cut alone moves the logits by more than `tol`. `measure(dropped)` is the gap of
    the network with only the nodes `dropped` cut (every other node kept). Per group first — one pass each — then by
    bisection inside a group that moves them: a group whose nodes all move costs about twice its size in passes."""
    moving = np.zeros(len(cut), bool)
    start = 0
    for size in groups.values():
        members = np.flatnonzero(cut[start:start + size]) + start
        start += size
        todo = [members] if len(members) else []
        while todo:
            part = todo.pop()
            dropped = np.zeros(len(cut), bool)
            dropped[part] = True
            if measure(dropped) <= tol:
                continue
            if len(part) == 1:
                moving[part] = True
            else:
                todo += [part[:len(part) // 2], part[len(part) // 2:]]
    return moving


class Cut(NamedTuple):
    """The cut a task ends with: trunk and head after it, the node mask, the gap of the cut Ω alone asked for, the
    cut nodes whose cut alone moved the logits and those of them kept important."""

    trunk: Params
    head: Params
    alive: np.ndarray
    gap: float
    moving: np.ndarray
    kept: np.ndarray


def cut_keeping_logits(method: Any, info: TaskInfo, head: Params, alive: np.ndarray, features: torch.Tensor | None,
                       carrying: np.ndarray, x: torch.Tensor, trained: torch.Tensor, tol: float) -> Cut:
    """Cut the nodes `alive` leaves out (`AGSCL._cut`, on copies) and measure the deployed logits on `x`; above
    `tol`, find the cut nodes that move them (`moving_nodes`) and, with ``faithful="keep"``, make them important
    (Ω of the least important node, so every later task holds them) and cut again."""
    device = x.device

    def cut(alive: np.ndarray) -> tuple[float, Params, Params]:
        trunk, cut_head = method._cut(head, alive, features, carrying)
        with torch.no_grad():
            now = forward(method.arch, from_numpy(method._deployed(trunk, info, cut_head, alive), device), x)
        return gap(trained, now), trunk, cut_head

    first, trunk, cut_head = cut(alive)
    moving = kept = np.zeros(len(alive), bool)
    if first > tol:
        moving = moving_nodes(~alive, method.nodes.groups, lambda dropped: cut(~dropped)[0], tol)
        if moving.any() and method.config.faithful == "keep":
            used = method.omega[method.omega > 0]
            method.omega[torch.from_numpy(moving)] = float(used.min()) if len(used) else 1.0
            kept, alive = moving, alive | moving
            _, trunk, cut_head = cut(alive)
    return Cut(trunk, cut_head, alive, first, moving, kept)


def warning(t: int, gap_now: float, tol: float, examples: int, nodes: NodeMap, cut: Cut, config: Any,
            arch: dict) -> str:
    """The note a task leaves when its deployed logits differ from the trained ones: the gap, the groups whose cut
    moved them, and the setting to change."""
    groups = [g for g, m in nodes.split(cut.moving).items() if m.any()]
    where = f" (cutting nodes of {', '.join(groups)} moves them" + \
        (f"; {int(cut.kept.sum())} of them kept, not enough" if cut.kept.any() else "") + ")" if groups else ""
    name = "mu_adam" if config.uses_adam_metric(arch) else "mu"
    keep = "" if config.faithful == "keep" else ", or faithful='keep' (keeps the nodes whose cut moves them)"
    return (f"agscl task {t}: the deployed network's logits differ from the trained network's by up to {gap_now:.3g} "
            f"on {examples} training examples (tolerance {tol:.2g}){where}: the cut dropped a value the task "
            f"used; lower {name} ({getattr(config, name):g} now: --set {name}=…){keep}")
