"""AGS-CL (Jung et al., NeurIPS 2020): adaptive group sparsity over nodes.

A *node* is one output unit of a linear layer or one filter of a convolution: its incoming weight row (GEMM view)
together with its bias form one group θ_n. Task t minimises (2)

    L_t(θ) = CE + μ Σ_{Ω_n = 0} ‖θ_n‖₂ + λ Σ_{Ω_n > 0} Ω_n ‖θ_n − θ̂_n‖₂

by Adam on the cross-entropy followed by the proximal operator of the two group penalties (closed form (7)) with the
current learning rate as step size: unimportant groups shrink toward zero and become exactly zero, important ones are
pulled toward their previous value θ̂_n and become exactly equal to it (frozen). The reference implementation applies
the proximal step once per epoch after that epoch's Adam steps (`prox_every="epoch"`, the default); `"step"` applies it
after every Adam step, which is textbook proximal gradient descent.

After a task, Ω is updated by (8) (η·Ω + mean ReLU activation on the task's training data, spatial mean for conv
filters); nodes with Ω = 0 are the unimportant set G₀. Then, in this order, (I.1) the connections from unimportant
nodes into the next layer are zeroed — permanently for rows that are important, and old heads lose their inputs from
nodes dead for them — and (I.2) a fraction ρ of the unimportant nodes get freshly initialised incoming weights.

Because of (I.1), task t's function only ever reads the nodes important up to t; the deployed form is one shared set
of weights plus a node bit vector per task (delta kind ``node``), and `materialize(t)` reproduces task t exactly.

Differences from the reference code, on purpose: the learning rate stays constant (no validation split, so no
plateau decay and no restore of the best epoch); a cut connection stays zero for all later tasks, as the paper states,
not only while its source is dead under the latest Ω (this matters whenever a freeze is not exact); (I.2) re-draws
exactly round(ρ·|G₀|) nodes per layer, with edgecl's initialiser (zero biases).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.arch import Arch, dense_params, is_sequential, last_layer, param_shapes, prunable, unit_sources
from edgecl.deltas import PackedModel, TaskInfo
from edgecl.errors import UsageError
from edgecl.train.data import TaskData
from edgecl.train.methods.agscl_config import AGSCLConfig
from edgecl.train.models import Params, forward, from_numpy, init_head, init_params, to_numpy
from edgecl.train.protocol import Method, TrainContext, adam, batches, check_resumable, run_epochs, task_generator

def prox_coefficients(norm: torch.Tensor, drift: torch.Tensor, omega: torch.Tensor, alpha: float, mu: float,
                      lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (a, b) with prox(θ_n) = a_n θ_n + b_n θ̂_n, the closed form (7), from ‖θ_n‖ and ‖θ_n − θ̂_n‖.

    Ω_n = 0: group-lasso shrinkage a = (1 − αμ/‖θ_n‖)₊, b = 0 — exactly zero when ‖θ_n‖ ≤ αμ.
    Ω_n > 0: a = γ = (1 − αλΩ_n/‖θ_n − θ̂_n‖)₊, b = 1 − γ — exactly θ̂_n (a = 0, b = 1) when the drift ≤ αλΩ_n."""
    shrink = torch.where(norm > alpha * mu, 1 - alpha * mu / norm.clamp_min(1e-30), torch.zeros_like(norm))
    limit = alpha * lam * omega
    gamma = torch.where(drift > limit, 1 - limit / drift.clamp_min(1e-30), torch.zeros_like(drift))
    important = omega > 0
    return torch.where(important, gamma, shrink), torch.where(important, 1 - gamma, torch.zeros_like(gamma))


def prox_groups(theta: torch.Tensor, theta_hat: torch.Tensor, omega: torch.Tensor, alpha: float, mu: float,
                lam: float) -> torch.Tensor:
    """The proximal step (7) on groups stored as rows of `theta` (N × d), anchors θ̂ in `theta_hat`."""
    a, b = prox_coefficients(theta.norm(dim=1), (theta - theta_hat).norm(dim=1), omega, alpha, mu, lam)
    return a[:, None] * theta + b[:, None] * theta_hat


@dataclass
class _Layer:
    """One prunable layer seen as nodes: its tensors, the layer feeding it, and the input columns per source node."""

    name: str
    source: str | None
    repeat: int

    @property
    def weight(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias(self) -> str:
        return f"{self.name}.bias"


class AGSCL(Method):
    name = "agscl"
    Config = AGSCLConfig

    def __init__(self, arch: Arch, config: AGSCLConfig | None = None):
        super().__init__(arch, config)
        _check_arch(arch)
        self.layers = [_Layer(n, src, rep) for n, (src, rep) in unit_sources(arch).items()]
        self.init_gen = torch.Generator().manual_seed(self.config.seed)
        self.trunk: Params = init_params(arch, generator=self.init_gen)
        shapes = param_shapes(arch)
        self.omega = {layer.name: torch.zeros(shapes[layer.weight][0]) for layer in self.layers}
        # cut[L][j, i]: the connection from source node i into node j of L is fixed at zero for good ((I.1)).
        self.cut = {layer.name: torch.zeros(shapes[layer.weight][0], shapes[layer.source + ".weight"][0],
                                            dtype=torch.bool) for layer in self.layers if layer.source}
        self.heads: list[Params] = []
        self.infos: list[TaskInfo] = []
        self.alive: list[dict[str, np.ndarray]] = []  # per task: nodes important for tasks ≤ t
        self.stats: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- training
    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        if t != len(self.heads):
            raise UsageError(f"agscl: tasks must be learned in order; expected task {len(self.heads)}, got {t}")
        _check_task(self.arch, t, task)
        device = ctx.device
        trunk = {k: v.to(device).detach().requires_grad_(True) for k, v in self.trunk.items()}
        head = {k: v.to(device).requires_grad_(True) for k, v in init_head(self.arch, task.n_classes,
                                                                             self.init_gen).items()}
        params = {**trunk, **head}
        anchor = {k: v.detach().clone() for k, v in trunk.items()}  # θ̂^(t−1)
        omega = {k: v.to(device) for k, v in self.omega.items()}
        keep = {k: (~v).to(device) for k, v in self.cut.items() if bool(v.any())}
        opt = adam(list(params.values()), self.config.lr)
        per_step = self.config.prox_every == "step"

        def after_step() -> None:
            self._apply_cut(trunk, keep)
            if per_step:
                self._prox(trunk, anchor, omega, opt.param_groups[0]["lr"])

        def end_of_epoch(_: int) -> None:
            if not per_step:
                self._prox(trunk, anchor, omega, opt.param_groups[0]["lr"])

        with ctx.bar(self.config.epochs, f"agscl task {t}") as bar:
            run_epochs(task, opt, lambda x, y: F.cross_entropy(forward(self.arch, params, x, train=True), y),
                       epochs=self.config.epochs, batch_size=self.config.batch_size,
                       generator=task_generator(self.config, t), bar=bar, device=device, after_step=after_step,
                       end_of_epoch=end_of_epoch)
        frozen = self._count_frozen(trunk, anchor, omega)
        self.trunk = {k: v.detach().cpu() for k, v in trunk.items()}
        head = {k: v.detach().cpu() for k, v in head.items()}
        self.update_omega(task, device)
        alive = {k: (v > 0) for k, v in self.omega.items()}
        zeroed = self._zero_from_dead(alive, head)
        reinit = self._reinit(alive)
        self.heads.append(head)
        self.infos.append(TaskInfo(task.name, task.n_classes))
        self.alive.append({k: v.numpy().copy() for k, v in alive.items()})
        self.stats.append({"frozen": frozen, "exact_zero_nodes": zeroed, "reinit_nodes": reinit})

    def _groups(self, trunk: Params, layer: _Layer) -> torch.Tensor:
        """The layer's nodes as rows: GEMM row of the weight with the bias appended."""
        w = trunk[layer.weight].detach()
        rows = [w.reshape(w.shape[0], -1)]
        if layer.bias in trunk:
            rows.append(trunk[layer.bias].detach()[:, None])
        return torch.cat(rows, dim=1)

    def _prox(self, trunk: Params, anchor: Params, omega: dict[str, torch.Tensor], lr: float) -> None:
        """Apply (7) to every node in place, on the weight rows and biases directly (no group copies)."""
        with torch.no_grad():
            for layer in self.layers:
                parts = [(trunk[k].view(trunk[k].shape[0], -1), anchor[k].view(anchor[k].shape[0], -1))
                         for k in (layer.weight, layer.bias) if k in trunk]
                norm = _row_norm([p for p, _ in parts])
                drift = _row_norm([p - q for p, q in parts]) if bool((omega[layer.name] > 0).any()) else norm
                a, b = prox_coefficients(norm, drift, omega[layer.name], lr, self.config.mu, self.config.lam)
                for p, q in parts:
                    p.mul_(a[:, None]).addcmul_(b[:, None], q)

    def _apply_cut(self, trunk: Params, keep: dict[str, torch.Tensor]) -> None:
        """Keep the (I.1) connections at zero after each optimiser step (as the reference code does)."""
        with torch.no_grad():
            for name, k in keep.items():
                w = trunk[f"{name}.weight"]
                w.view(w.shape[0], k.shape[1], -1).mul_(k[:, :, None])

    def _count_frozen(self, trunk: Params, anchor: Params, omega: dict[str, torch.Tensor]) -> list[int]:
        """[exactly frozen, important] nodes over the trunk: how many important groups equal θ̂ bit for bit."""
        frozen = important = 0
        for layer in self.layers:
            imp = omega[layer.name] > 0
            same = (self._groups(trunk, layer) == self._groups(anchor, layer)).all(dim=1)
            frozen += int((same & imp).sum())
            important += int(imp.sum())
        return [frozen, important]

    def update_omega(self, task: TaskData, device: str = "cpu") -> None:
        """(8): Ω ← ηΩ + mean ReLU activation of each node over the task's training data (spatial mean for convs)."""
        total = {layer.name: torch.zeros_like(self.omega[layer.name], device=device) for layer in self.layers}

        def hook(name: str, h: torch.Tensor) -> torch.Tensor:
            if name in total:
                a = F.relu(h)
                total[name] += (a.flatten(2).mean(2) if a.dim() > 2 else a).sum(0)
            return h

        params = {k: v.to(device) for k, v in self.trunk.items()}
        with torch.no_grad():
            for x, _ in batches(task, 512, torch.Generator().manual_seed(0), device):  # order is irrelevant
                forward(self.arch, params, x, hook=hook, head=False)
        n = len(task.x_train)
        for name in self.omega:
            self.omega[name] = self.config.eta * self.omega[name] + total[name].cpu() / n

    def _zero_from_dead(self, alive: dict[str, torch.Tensor], head: Params) -> int:
        """(I.1): zero every connection out of a dead node; fix it at zero for good where it feeds a live node;
        the new head stops reading dead last-layer nodes. Returns how many unimportant nodes were exactly zero."""
        zero = sum(int(((self._groups(self.trunk, layer) == 0).all(dim=1) & ~alive[layer.name]).sum())
                   for layer in self.layers)
        with torch.no_grad():
            for layer in self.layers:
                if layer.source is None:
                    continue
                dead_src = ~alive[layer.source]
                w = self.trunk[layer.weight]
                w.view(w.shape[0], dead_src.numel(), -1)[:, dead_src] = 0
                self.cut[layer.name] |= alive[layer.name][:, None] & dead_src[None, :]
            head["head.weight"][:, ~alive[last_layer(self.arch)]] = 0
        return zero

    def _reinit(self, alive: dict[str, torch.Tensor]) -> int:
        """(I.2): fresh initial incoming weights (and zero bias) for a random ρ share of each layer's dead nodes."""
        fresh = init_params(self.arch, generator=self.init_gen)
        count = 0
        with torch.no_grad():
            for layer in self.layers:
                dead = torch.nonzero(~alive[layer.name]).flatten()
                pick = dead[torch.randperm(len(dead), generator=self.init_gen)[:round(self.config.rho * len(dead))]]
                for key in (layer.weight, layer.bias):
                    if key in self.trunk:
                        self.trunk[key][pick] = fresh[key][pick]
                count += len(pick)
        return count

    # ---------------------------------------------------------------- deployment
    def pack(self) -> PackedModel:
        params: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            params[layer.weight] = {"kind": "node", "rows": layer.name, "cols": layer.source,
                                    "repeat": layer.repeat}
            if layer.bias in self.trunk:
                params[layer.bias] = {"kind": "node", "rows": layer.name}
        params.update({"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}})
        task_tensors = []
        for head, alive in zip(self.heads, self.alive):
            tensors = to_numpy(head)
            tensors.update({f"nodes:{name}": mask.copy() for name, mask in alive.items()})
            task_tensors.append(tensors)
        return PackedModel(self.arch, self.name, self.config.to_json(), params, to_numpy(self.trunk),
                           list(self.infos), task_tensors, self._extra())

    def _extra(self) -> dict[str, Any]:
        """Used capacity and sparsity per task, parameters each task's sub-network touches, node-mask bits."""
        trunk_params = dense_params(self.arch)
        n_nodes = sum(len(v) for v in self.omega.values())
        used, sparsity, live = [], [], []
        for t, alive in enumerate(self.alive):
            used.append({k: float(v.mean()) for k, v in alive.items()})
            sparsity.append(1.0 - sum(int(v.sum()) for v in alive.values()) / n_nodes)
            live.append(live_parameters(self.arch, alive, self.infos[t].n_classes))
        return {"used_capacity": used, "sparsity": sparsity, "live_params": live,
                "dense_params": [dense_params(self.arch, i.n_classes) for i in self.infos],
                "mask_bits_per_param": n_nodes / trunk_params, "node_mask_bytes_per_task": math.ceil(n_nodes / 8),
                "frozen_important": [s["frozen"] for s in self.stats],
                "exact_zero_unimportant": [s["exact_zero_nodes"] for s in self.stats],
                "reinit_nodes": [s["reinit_nodes"] for s in self.stats],
                "omega": {k: [float(x) for x in v] for k, v in self.omega.items()}}

    def resume(self, packed: PackedModel, state: dict | None = None) -> None:
        """Continue from a deployed AGS-CL model: trunk, heads and node masks from the artifact, Ω from its extra;
        the permanent (I.1) cuts are rebuilt from the masks (node j alive and source i dead at some task)."""
        check_resumable(packed, self.name, self.arch)
        if "omega" not in packed.extra:
            raise UsageError("agscl: the artifact's extra has no 'omega' (node importances); cannot resume")
        self.trunk = from_numpy(packed.base)
        self.omega = {k: torch.tensor(v, dtype=torch.float32) for k, v in packed.extra["omega"].items()}
        self.infos = list(packed.tasks)
        self.heads, self.alive, self.stats = [], [], []
        for t, tt in enumerate(packed.task_tensors):
            self.heads.append(from_numpy({k: tt[k] for k in ("head.weight", "head.bias")}))
            alive = {layer.name: np.asarray(tt[f"nodes:{layer.name}"], dtype=bool) for layer in self.layers}
            self.alive.append(alive)
            for layer in self.layers:
                if layer.source:
                    rows, src = torch.from_numpy(alive[layer.name]), torch.from_numpy(alive[layer.source])
                    self.cut[layer.name] |= rows[:, None] & ~src[None, :]
            self.stats.append({"frozen": [0, 0], "exact_zero_nodes": 0, "reinit_nodes": 0})


def live_parameters(arch: Arch, alive: dict[str, np.ndarray], n_classes: int) -> int:
    """Parameters task t's sub-network touches: rows of live nodes × columns of live source nodes (× repeat and
    kernel), their biases, and the head's columns for live last-layer nodes."""
    shapes = param_shapes(arch)
    total = 0
    for name, (src, repeat) in unit_sources(arch).items():
        shape = shapes[f"{name}.weight"]
        rows = int(alive[name].sum())
        cols = int(alive[src].sum()) * repeat if src else shape[1]
        total += rows * cols * math.prod(shape[2:]) + (rows if f"{name}.bias" in shapes else 0)
    return total + (int(alive[last_layer(arch)].sum()) + 1) * n_classes


def _row_norm(parts: list[torch.Tensor]) -> torch.Tensor:
    """ℓ2 norm of each row across several (N × d_i) blocks: a node's weight row and its bias together."""
    if len(parts) == 1:
        return torch.linalg.vector_norm(parts[0], dim=1)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p, dim=1) for p in parts], 1), dim=1)


def _check_arch(arch: Arch) -> None:
    if not is_sequential(arch):
        raise UsageError(f"agscl: architecture {arch.get('name')!r} has residual blocks; AGS-CL's node masks need a "
                         "sequential architecture (presets 'mlp' or 'lenet')")
    ops = {node["op"] for node in arch["nodes"]}
    if ops & {"bn", "gap"}:
        raise UsageError(f"agscl: architecture {arch.get('name')!r} uses {sorted(ops & {'bn', 'gap'})}; AGS-CL "
                         "supports linear/conv/relu/maxpool/flatten trunks")
    if not prunable(arch):
        raise UsageError(f"agscl: architecture {arch.get('name')!r} has no linear or conv layer to group into nodes")


def _check_task(arch: Arch, t: int, task: TaskData) -> None:
    want = math.prod(arch["input_shape"])
    got = math.prod(task.x_train.shape[1:])
    if got != want or math.prod(task.x_test.shape[1:]) != want:
        raise UsageError(f"agscl: task {t} ({task.name}): inputs of shape {task.x_train.shape[1:]} do not fit the "
                         f"architecture's input {tuple(arch['input_shape'])}")
