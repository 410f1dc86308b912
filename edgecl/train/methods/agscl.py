"""AGS-CL (Jung et al., NeurIPS 2020): adaptive group sparsity over nodes, on any graph.

A *node* is one channel of one channel group (`agscl_nodes`): on a chain, one output unit of a linear layer or one
filter of a convolution; on a graph, the same channel in every layer that writes it — the rows of every producer
of its group (conv/linear rows and biases, a depthwise conv's row, the BatchNorm channel's weight and bias) across
residual adds, gates and depthwise convolutions. Those rows together are its group θ_n. Task t minimises (2)

    L_t(θ) = CE + μ Σ_{Ω_n = 0} ‖θ_n‖₂ + λ Σ_{Ω_n > 0} Ω_n ‖θ_n − θ̂_n‖₂

by Adam on the cross-entropy followed by the proximal operator of the two group penalties (closed form (7)) with the
current learning rate as step size: unimportant groups shrink toward zero and become exactly zero, important ones
are pulled toward their previous value θ̂_n. `prox_every="step"` (default) applies it after every Adam step
(textbook proximal gradient descent), `"epoch"` once per epoch as the reference code does. On a BatchNorm, LayerNorm
or GRN network (`lasso="auto"`) term (a)'s prox runs in Adam's own metric (`adam_lasso_coefficients`): a node is zeroed when its
loss gradient is small, not when Adam's ≈ lr-sized steps lose to a fixed shrink (AGSCLConfig says why, measured).

Freezing. With `freeze="exact"` (default) every important node is held at θ̂_n bit for bit: its gradient is masked
before each Adam step and the proximal step sets it to θ̂_n (term (b) at λ → ∞). With `"proximal"` the finite λ
holds a node only while its drift after a step is within αλΩ_n, which Adam's ≈ lr-per-coordinate steps break for
weakly active nodes (Ω_n ≲ √d_n/λ): each task records its important and exactly frozen nodes and the largest change
of the previous task's deployed weights, and leaves a warning note (the CLI prints it) when that change is not zero.

Importance (8): after a task, Ω ← η·Ω + the node's mean activity over the task's training data (spatial mean for
convolutions): the mean over its group's conv/linear outputs, each read after the BatchNorm that follows it — the
value it adds to the residual stream — as its readers read it. Ω measures how much a node's value is *used*, so
that a node cut for Ω = 0 was 0 wherever it was read and the cut changes no logit: an output every reader reads
through a ReLU/ReLU6 (past adds, concatenations, pools: `agscl_nodes.relu_read_only`), every addend on the way ≤ 0
and what the layers read after the ReLU 0 where the node is dead (`agscl_nodes.read_as_zero_when_dead`: no shift
added before the ReLU or after it), counts by its mean ReLU
activation — the paper's measure, unchanged on ReLU networks (resnet preset, LeNet, MLP); one a GELU, SiLU, …
alone reads by |GELU(a)|; any other (read by a LayerNorm, attention, a plain conv or linear — a linear bottleneck —,
a sigmoid gate, the head) by its mean |value|, since a value always ≤ 0 there is used (ReLU's measure called it 0
and the cut moved the logits: `tests/test_agscl_deployed.py`). On a stream written by several layers a channel is
used when any of them writes into it. Nodes with Ω = 0 are the unimportant
set G₀ (channels no layer writes, an EdgeNeXt grid's, are always important, as the input: `NodeMap.unwritten`); a
node once important stays important (the node masks only grow).
Then (I.1) the connections from unimportant nodes are zeroed in every layer and head that reads them — for good
where the reading node is important — and (I.2) a fraction ρ of the unimportant nodes of each group get freshly
initialised rows (BatchNorm weight 1, bias 0).

BatchNorm: its weight and bias are rows of the node's group (shrunk, frozen and masked with the node); its running
statistics are per task (delta kind ``task``): each task trains with batch statistics and deploys the running
statistics of its own training, so no later task can move an earlier task's normalisation.

ECA (``channel_conv``): its k weights belong to no node; each task trains them from the previous task's values and keeps
its own copy (delta kind ``task``), so no later task moves an earlier task's gate. A ``scalar_affine``'s weight and bias
alike. A zeroed node is not 0 past an affine (it is the bias there), and (I.1) cuts its readers' columns after the
task: so while a task trains, the affine's b reaches only live nodes' channels (`agscl_affine`, which says why and
where), and the deployed network computes what was trained (TinyHGNet, width 16, permuted digits: 36.1 % trained,
31.3 % deployed before; equal since).

Deployed form: one shared set of weights, per task a node bit vector per group (delta kind ``node``), the task's
BatchNorm statistics, ECA weights, scalar affines and head; because of (I.1) task t's function reads only the nodes
important up to t, and `materialize(t)` reproduces it exactly. Grouped (non-depthwise) convolutions are handled: a row
reads its own conv group's input channels. A layer that adds to the raw input's channels is refused (they are no node).
Each task checks it (`agscl_faithful`): trained against deployed logits on a sample of its data, `deploy_gap` per task,
nodes whose cut moves them kept important (`faithful="keep"`), a warning note where a gap remains.

Differences from the reference code, on purpose: the learning rate stays constant (no validation split, so no
plateau decay and no restore of the best epoch); a cut connection stays zero for all later tasks, as the paper
states; (I.2) re-draws exactly round(ρ·|G₀|) nodes per group, with edgecl's initialiser (zero biases).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.arch import Arch, dense_params, node_by_name
from edgecl.arch.op_rules import is_standardized
from edgecl.deltas import PackedModel, TaskInfo, materialize
from edgecl.errors import UsageError
from edgecl.graph.standardize import cut_columns_keeping_standardized
from edgecl.train.batchnorm import recalibrate
from edgecl.train.data import TaskData
from edgecl.train.methods import agscl_faithful as faithful
from edgecl.train.methods.agscl_affine import BiasMasks, fold_into_head, nonzero_nodes
from edgecl.train.methods.agscl_config import AGSCLConfig
from edgecl.train.methods.agscl_importance import node_activity
from edgecl.train.methods.agscl_nodes import NodeMap, live_parameters, node_map
from edgecl.train.methods.agscl_prox import adam_lasso_coefficients, prox_coefficients
from edgecl.train.models import Params, forward, from_numpy, init_head, to_numpy
from edgecl.train.protocol import Method, TrainContext, adam, check_resumable, run_epochs, task_generator

NEVER = np.iinfo(np.int64).max  # birth of a node never important
HEAD = ("head.weight", "head.bias")
# per task (agscl_faithful): the largest |trained − deployed| logit, the same before nodes were kept for it, how many
FAITHFUL_STATS = {"deploy_gap": 0.0, "deploy_gap_before_keep": 0.0, "kept_for_gap": 0}


class AGSCL(Method):
    name = "agscl"
    redraws_trunk = True  # re-initialised nodes take fresh rows
    Config = AGSCLConfig

    def __init__(self, arch: Arch, config: AGSCLConfig | None = None, start=None):
        super().__init__(arch, config, start)
        self.nodes: NodeMap = node_map(arch)
        self.init_gen = torch.Generator().manual_seed(self.config.seed)
        self.trunk: Params = self.initial_params(self.init_gen)
        self.omega = torch.zeros(self.nodes.n)  # Ω per node, groups in `self.nodes.groups` order
        self.birth = np.full(self.nodes.n, NEVER)  # the first task each node was important after
        self.heads: list[Params] = []
        self.infos: list[TaskInfo] = []
        self.alive: list[np.ndarray] = []  # per task: nodes important for tasks ≤ t (flat, only grows)
        self.task_stats: list[dict[str, torch.Tensor]] = []  # per task: its statistics and rowless tensors (nodes.own)
        self.stats: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- training
    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        if t != len(self.heads):
            raise UsageError(f"agscl: tasks must be learned in order; expected task {len(self.heads)}, got {t}")
        _check_task(self.arch, t, task)
        device, nodes, cfg = ctx.device, self.nodes, self.config
        learn = {k: v.to(device).detach().requires_grad_(True) for k, v in self.trunk.items() if k not in nodes.stats}
        running = {k: self.trunk[k].to(device).clone() for k in nodes.stats}  # this task's own statistics
        head = {k: v.to(device).requires_grad_(True) for k, v in init_head(self.arch, task.n_classes,
                                                                             self.init_gen).items()}
        params = {**learn, **running, **head}
        anchor = {k: v.detach().clone() for k, v in learn.items()}  # θ̂^(t−1)
        before = self.alive[-1] if self.alive else np.zeros(nodes.n, bool)
        important = torch.from_numpy(before).to(device)
        rows = {k: torch.from_numpy(idx).to(device) for k, idx in nodes.trainable.items()}
        held = {k: important[idx][:, None] for k, idx in rows.items()}
        cut = self._cuts(device)
        bias = BiasMasks(self.arch, nodes, device)  # an affine's b reaches live nodes only (agscl_affine)
        bias.update(learn, important)
        omega = self.omega.to(device)
        opt = adam(list(learn.values()) + list(head.values()), cfg.lr)
        exact, per_step = cfg.freeze == "exact", cfg.prox_every == "step"
        adam_metric = cfg.uses_adam_metric(self.arch)

        def after_backward() -> None:  # exact freeze: Adam never sees a gradient on an important row
            if exact:
                for k, mask in held.items():
                    grad = learn[k].grad
                    if grad is not None:
                        grad.view(grad.shape[0], -1).masked_fill_(mask, 0)

        def prox() -> None:
            self._prox(learn, anchor, rows, omega, important if exact else None, opt.param_groups[0]["lr"],
                       opt if adam_metric else None)

        def after_step() -> None:
            with torch.no_grad():
                for k, mask in cut.items():
                    w = learn[k]
                    w.view(w.shape[0], w.shape[1], -1).masked_fill_(mask, 0)
            if per_step:
                prox()
            bias.update(learn, important)

        def end_of_epoch(_) -> None:
            prox()
            bias.update(learn, important)

        with ctx.bar(cfg.epochs, f"agscl task {t}") as bar:
            run_epochs(task, opt, lambda x, y: F.cross_entropy(forward(self.arch, bias.apply(params), x, train=True),
                                                                y),
                       epochs=cfg.epochs, batch_size=cfg.batch_size, generator=task_generator(cfg, t), bar=bar,
                       device=device, after_backward=after_backward, after_step=after_step,
                       end_of_epoch=None if per_step else end_of_epoch)
        freeze = self._freeze_report(learn, anchor, before)
        # "precise BatchNorm": the moving averages of training trail weights the proximal step keeps changing (on
        # the resnet preset a dead channel kept a running mean of 0.13 and the deployed accuracy fell to chance while
        # batch statistics gave 100 %). No noise silencing: γ is a node tensor shared with earlier tasks.
        recalibrate(self.arch, bias.apply(params), task, device, batch_size=512, silence=False)
        x = faithful.sample(task, cfg.seed, t, device)  # the trained logits, before the cut (agscl_faithful)
        with torch.no_grad():
            trained = forward(self.arch, bias.apply(params), x)
        self.trunk = {**{k: v.detach().cpu() for k, v in learn.items()}, **{k: v.cpu() for k, v in running.items()}}
        head = {k: v.detach().cpu() for k, v in head.items()}
        exact_zero = self._exact_zero()
        carrying = bias.carrying_b(exact_zero)  # b reached them in training: cut now if unimportant (agscl_affine)
        # Ω's pass reads the network the task trained (`bias` rebuilt from the same rows and `before`, bit for bit),
        # so it also sums the head's features for the fold: one pass over the task's data, not two
        features = self.update_omega(task, device, before,
                                     features=bool(np.append(carrying & ~before, False)[nodes.head].any()))
        alive = before | (self.omega > 0).numpy() | nodes.unwritten
        info = TaskInfo(task.name, task.n_classes)
        tol = faithful.tolerance(trained)
        cut = faithful.cut_keeping_logits(self, info, head, alive, features, carrying, x, trained, tol)
        self.trunk, head, alive = cut.trunk, cut.head, cut.alive
        self.birth[alive & (self.birth == NEVER)] = t
        zeroed = int((exact_zero & ~alive).sum())
        reinit = self._reinit(alive)
        self.heads.append(head)
        self.infos.append(info)
        self.alive.append(alive)
        self.task_stats.append({k: self.trunk[k].clone() for k in nodes.own})
        with torch.no_grad():  # what `materialize(pack(), t)` deploys, measured (the cuts tried were its parts)
            deployed = forward(self.arch, from_numpy(self.deployed(t), device), x)
        gap = faithful.gap(trained, deployed)
        self.stats.append({**freeze, "exact_zero_nodes": zeroed, "reinit_nodes": reinit, "deploy_gap": gap,
                           "deploy_gap_before_keep": cut.gap, "kept_for_gap": int(cut.kept.sum())})
        warnings = [faithful.warning(t, gap, tol, len(x), nodes, cut, cfg, self.arch)] if gap > tol else []
        if freeze["frozen"][0] < freeze["frozen"][1] or freeze["old_task_max_drift"] > 0:
            (kept, important), drift = freeze["frozen"], freeze["old_task_max_drift"]
            warnings.append(f"agscl task {t}: only {kept} of {important} important nodes stayed exactly frozen; earlier "
                            f"tasks' weights moved by up to {drift:.3g} (freeze={cfg.freeze!r}; freeze='exact' keeps "
                            "them bit-identical)")
        if not np.append(alive, True)[nodes.head].any():  # the group lasso won: the logits are the head's bias
            name = "mu_adam" if cfg.uses_adam_metric(self.arch) else "mu"
            warnings.append(f"agscl task {t}: no feature the head reads is in use after this task (the group lasso "
                            f"zeroed every node feeding it), so its predictions do not depend on the input; lower "
                            f"{name} ({getattr(cfg, name):g} now: --set {name}=…)")
        if warnings:
            ctx.notes.setdefault(t, {})["warning"] = "; ".join(warnings)

    def _cuts(self, device: str) -> dict[str, torch.Tensor]:
        """(I.1) connections fixed at zero for good, per reader weight (GEMM rows × columns × 1): node j reading
        source i is cut when j became important before i did (i was unimportant then: Ω only grows)."""
        born = np.append(self.birth, -1)  # the network input (index −1) is never cut
        out = {}
        for weight, cols in self.nodes.cols.items():
            cut = born[self.nodes.rows[weight]][:, None] < born[cols]
            if cut.any():
                out[weight] = torch.from_numpy(np.ascontiguousarray(cut)[:, :, None]).to(device)
        return out

    def cuts(self) -> dict[str, np.ndarray]:
        """The permanent (I.1) cuts as bool (rows × columns) per reader weight (for inspection and tests)."""
        return {k: v[:, :, 0].cpu().numpy() for k, v in self._cuts("cpu").items()}

    def _node_sums(self, tensors: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ over each node's rows of a per-row quantity (one row of each tensor per entry of `rows`)."""
        total = None
        for k, value in tensors.items():
            total = torch.zeros(self.nodes.n, device=value.device) if total is None else total
            total.index_add_(0, rows[k], value)
        return total

    def _prox(self, learn: Params, anchor: Params, rows: dict[str, torch.Tensor], omega: torch.Tensor,
              hold: torch.Tensor | None, lr: float, opt: torch.optim.Adam | None = None) -> None:
        """Apply (7) to every node in place, over all its rows; `hold` (exact freeze): important nodes are set to
        θ̂ exactly whatever their drift. A row a BatchNorm normalises is scale-free: term (a) measures and shrinks
        the node by its other rows (the BatchNorm weight and bias carry its scale) and zeroes it with them.
        With `opt` (lasso="adam"), term (a) is the prox in Adam's metric (`_adam_lasso`)."""
        cfg, scale_free = self.config, self.nodes.scale_free
        with torch.no_grad():
            flat = {k: (learn[k].view(learn[k].shape[0], -1), anchor[k].view(anchor[k].shape[0], -1)) for k in rows}
            norm = self._node_sums({k: p.square().sum(1) for k, (p, _) in flat.items() if k not in scale_free},
                                   rows).sqrt()
            drift = torch.zeros_like(norm) if hold is not None or not bool((omega > 0).any()) else \
                self._node_sums({k: (p - q).square().sum(1) for k, (p, q) in flat.items()}, rows).sqrt()
            a, b = prox_coefficients(norm, drift, omega, lr, cfg.mu, cfg.lam)
            scaled = None
            if opt is not None:
                a, scaled = self._adam_lasso(learn, flat, rows, omega, norm, a, lr, opt)
            if hold is not None:
                a, b = torch.where(hold, 0.0, a), torch.where(hold, 1.0, b)
            kept = torch.where((omega > 0) | (a == 0), a, torch.ones_like(a))  # scale-free rows: all or nothing
            for k, (p, q) in flat.items():  # held rows (a, b) = (0, 1) with p = q bit for bit stay so: p·0 + q = q
                p.mul_((kept if k in scale_free else a)[rows[k]][:, None])
                if scaled is not None and k in scaled:
                    p.mul_(scaled[k])
                p.addcmul_(b[rows[k]][:, None], q)

    def _adam_lasso(self, learn: Params, flat: dict, rows: dict[str, torch.Tensor], omega: torch.Tensor,
                    norm: torch.Tensor, a: torch.Tensor, lr: float, opt: torch.optim.Adam
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`adam_lasso_coefficients` on every unimportant node, measured over the same rows as the Euclidean term
        (a) with h from Adam's second moments: the per-node factor (0 for a zeroed node, 1 for a shrunk one,
        important nodes unchanged) and, per measured row tensor, the per-coordinate factor h/(h + step)."""
        scale_free, mu = self.nodes.scale_free, self.config.mu_adam
        beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
        h, sq = {}, {}
        for k, (p, _) in flat.items():
            state = opt.state.get(learn[k])
            if k in scale_free or not state:
                continue
            h[k] = (state["exp_avg_sq"].view(p.shape[0], -1) / (1 - beta2 ** float(state["step"]))).sqrt_().add_(eps)
            sq[k] = (h[k] * p).square().sum(1)
        if not h:
            return a, {}
        free = omega <= 0
        dead, step = adam_lasso_coefficients(self._node_sums(sq, rows).sqrt(), norm, lr, mu)
        a = torch.where(free, (~dead).to(a.dtype), a)
        return a, {k: torch.where(free[rows[k]][:, None], hk / (hk + step[rows[k]][:, None]), torch.ones_like(hk))
                   for k, hk in h.items()}

    def _freeze_report(self, learn: Params, anchor: Params, important: np.ndarray) -> dict[str, Any]:
        """How exactly the previous tasks were kept: [bit-identical important nodes, important nodes] and the
        largest |Δ| over the weights the previous task deploys (its node masks contain every earlier task's)."""
        changed = np.zeros(self.nodes.n, bool)
        worst = 0.0
        for k, idx in self.nodes.trainable.items():
            p, q = learn[k].detach().cpu(), anchor[k].cpu()
            differ = (p.view(torch.int32) != q.view(torch.int32)).reshape(p.shape[0], -1).any(1).numpy()
            np.logical_or.at(changed, idx, differ)
            kept = np.broadcast_to(self.nodes.kept(important, k), (p.shape[0], p.shape[1] if k in self.nodes.cols
                                                                      else 1))
            delta = np.abs(p.numpy() - q.numpy()).reshape(kept.shape + (-1,))
            worst = max(worst, float(np.where(kept[..., None], delta, 0).max(initial=0.0)))
        return {"frozen": [int((important & ~changed).sum()), int(important.sum())], "old_task_max_drift": worst}

    def update_omega(self, task: TaskData, device: str = "cpu", important: np.ndarray | None = None,
                     features: bool = False) -> torch.Tensor | None:
        """(8): Ω ← ηΩ + each node's activity on the task's training data (`agscl_importance.node_activity`), on
        the network the task trained; with `features`, the mean of the head's input features from the same pass."""
        activity, mean_features = node_activity(self.arch, self.nodes, self.trunk, task, device, important, features)
        self.omega = self.config.eta * self.omega + activity
        return mean_features

    def _exact_zero(self) -> np.ndarray:
        """Nodes whose every row is exactly zero."""
        rows = {k: torch.from_numpy(idx) for k, idx in self.nodes.trainable.items()}
        return ~nonzero_nodes(self.trunk, rows, self.nodes.n).numpy()

    def _cut(self, head: Params, alive: np.ndarray, features: torch.Tensor | None, carrying: np.ndarray
             ) -> tuple[Params, Params]:
        """The trunk and head after the cut for node mask `alive` (`fold_into_head`, `_zero_from_dead`) as new
        tensors where they change, `self.trunk` and `head` untouched: the faithfulness check tries several."""
        trunk = {k: v.clone() if k in self.nodes.cols else v for k, v in self.trunk.items()}
        head = {k: v.clone() for k, v in head.items()}
        fold_into_head(head, features, np.append(carrying & ~alive, False)[self.nodes.head])
        self._zero_from_dead(alive, head, trunk)
        return trunk, head

    def _zero_from_dead(self, alive: np.ndarray, head: Params, trunk: Params) -> None:
        """(I.1): zero every connection out of an unimportant node, in every reader and the new head (for good where
        the reader is important: `_cuts`); a weight-standardised reader's kept entries move with the cut."""
        live = np.append(alive, True)
        nodes = node_by_name(self.arch)
        with torch.no_grad():
            for weight, cols in self.nodes.cols.items():
                w = trunk[weight]
                dead = torch.from_numpy(np.ascontiguousarray(~live[cols]))[:, :, None]
                layer = nodes[weight.rsplit(".", 1)[0]]
                if is_standardized(layer):  # the kept entries keep their standardised values
                    w.copy_(torch.from_numpy(cut_columns_keeping_standardized(w.numpy(), dead.numpy(),
                                                                              layer["standardize"])))
                    continue
                w.view(w.shape[0], w.shape[1], -1).masked_fill_(dead, 0)
            head["head.weight"].masked_fill_(torch.from_numpy(~live[self.nodes.head])[None, :], 0)

    def _reinit(self, alive: np.ndarray) -> int:
        """(I.2): fresh initial rows (zero bias, BatchNorm weight 1 and bias 0; with starting weights, their rows)
        for a random ρ share of each group's unimportant nodes."""
        fresh = self.initial_params(self.init_gen)
        picked = np.zeros(self.nodes.n, bool)
        start = 0
        for size in self.nodes.groups.values():
            dead = torch.nonzero(torch.from_numpy(~alive[start:start + size])).flatten()
            pick = dead[torch.randperm(len(dead), generator=self.init_gen)[:round(self.config.rho * len(dead))]]
            picked[start + pick.numpy()] = True
            start += size
        with torch.no_grad():
            for k, idx in self.nodes.trainable.items():
                sel = torch.from_numpy(picked[idx])
                self.trunk[k][sel] = fresh[k][sel]
        return int(picked.sum())

    # ---------------------------------------------------------------- deployment
    def pack(self) -> PackedModel:
        return self._packed(self.trunk, list(zip(self.infos, self.heads, self.alive, self.task_stats)), self._extra())

    def deployed(self, t: int) -> dict[str, np.ndarray]:
        """Task t's deployed tensors, `materialize(pack(), t)` without packing every task."""
        return self._deployed(self.trunk, self.infos[t], self.heads[t], self.alive[t], self.task_stats[t])

    def _deployed(self, trunk: Params, info: TaskInfo, head: Params, alive: np.ndarray,
                  running: Params | None = None) -> dict[str, np.ndarray]:
        """The tensors one task with this trunk, head and node mask deploys (its statistics: `running`, else the
        trunk's), by the artifact's own arithmetic (`materialize` of a one-task pack)."""
        running = {k: trunk[k] for k in self.nodes.own} if running is None else running
        return materialize(self._packed(trunk, [(info, head, alive, running)], {}), 0)

    def _packed(self, trunk: Params, tasks: list[tuple[TaskInfo, Params, np.ndarray, Params]],
                extra: dict[str, Any]) -> PackedModel:
        """The deployed form of `tasks` (info, head, node mask, own tensors each) over one shared trunk."""
        nodes = self.nodes
        params = {**nodes.specs, **{k: {"kind": "task"} for k in HEAD}}
        task_tensors = []
        for _, head, alive, running in tasks:
            tensors = {**to_numpy(head), **to_numpy(running)}
            tensors.update({f"nodes:{g}": mask.copy() for g, mask in nodes.split(alive).items()})
            task_tensors.append(tensors)
        base = to_numpy({k: v for k, v in trunk.items() if k not in nodes.own})
        return PackedModel(self.arch, self.name, self.config.to_json(), params, base, [i for i, *_ in tasks],
                           task_tensors, extra)

    def _extra(self) -> dict[str, Any]:
        """Used capacity and sparsity per task, parameters each task's sub-network touches, node-mask bits, the
        freeze record per task, and Ω (what `resume` continues from)."""
        nodes = self.nodes
        used, sparsity, live = [], [], []
        for t, alive in enumerate(self.alive):
            by_group = nodes.split(alive)
            used.append({k: float(v.mean()) for k, v in by_group.items()})
            sparsity.append(1.0 - int(alive.sum()) / nodes.n)
            live.append(live_parameters(self.arch, by_group, self.infos[t].n_classes, nodes))
        return {"used_capacity": used, "sparsity": sparsity, "live_params": live,
                "dense_params": [dense_params(self.arch, i.n_classes) for i in self.infos],
                "mask_bits_per_param": nodes.n / dense_params(self.arch),
                "node_mask_bytes_per_task": math.ceil(nodes.n / 8),  # one bit-packed blob a task (format 3)
                "frozen_important": [s["frozen"] for s in self.stats],
                "old_task_max_drift": [s["old_task_max_drift"] for s in self.stats],
                "exact_zero_unimportant": [s["exact_zero_nodes"] for s in self.stats],
                "reinit_nodes": [s["reinit_nodes"] for s in self.stats],
                **{k: [s[k] for s in self.stats] for k in FAITHFUL_STATS},
                "omega": {k: [float(x) for x in v] for k, v in nodes.split(self.omega).items()}}

    def resume(self, packed: PackedModel, state: dict | None = None) -> None:
        """Continue from a deployed AGS-CL model: trunk, heads, node masks and BatchNorm statistics from the
        artifact, Ω and the freeze record from its extra; the permanent (I.1) cuts follow from when each node first
        became important."""
        check_resumable(packed, self.name, self.arch)
        if "omega" not in packed.extra:
            raise UsageError("agscl: the artifact's extra has no 'omega' (node importances); cannot resume")
        nodes = self.nodes
        self.omega = torch.from_numpy(nodes.join(packed.extra["omega"], "omega").astype(np.float32))
        self.infos = list(packed.tasks)
        self.heads, self.alive, self.task_stats = [], [], []
        for t, tt in enumerate(packed.task_tensors):
            self.heads.append(from_numpy({k: tt[k] for k in HEAD}))
            alive = nodes.join({g: tt.get(f"nodes:{g}") for g in nodes.groups}, "node mask").astype(bool)
            self.birth[alive & (self.birth == NEVER)] = t
            self.alive.append(alive)
            self.task_stats.append(from_numpy({k: tt[k] for k in nodes.own}))
        self.trunk = {**from_numpy(packed.base), **{k: v.clone() for k, v in self.task_stats[-1].items()}}
        extra = packed.extra
        n = packed.n_tasks
        self.stats = [{"frozen": _listed(extra, "frozen_important", t, [0, 0]),
                       "old_task_max_drift": _listed(extra, "old_task_max_drift", t, 0.0),
                       "exact_zero_nodes": _listed(extra, "exact_zero_unimportant", t, 0),
                       "reinit_nodes": _listed(extra, "reinit_nodes", t, 0),
                       **{k: _listed(extra, k, t, default) for k, default in FAITHFUL_STATS.items()}} for t in range(n)]


def _listed(extra: dict[str, Any], key: str, t: int, default: Any) -> Any:
    values = extra.get(key)
    return values[t] if isinstance(values, list) and t < len(values) else default


def _check_task(arch: Arch, t: int, task: TaskData) -> None:
    want = math.prod(arch["input_shape"])
    got = math.prod(task.x_train.shape[1:])
    if got != want or math.prod(task.x_test.shape[1:]) != want:
        raise UsageError(f"agscl: task {t} ({task.name}): inputs of shape {task.x_train.shape[1:]} do not fit the "
                         f"architecture's input {tuple(arch['input_shape'])}")
