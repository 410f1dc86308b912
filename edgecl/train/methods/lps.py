"""LPS — learn, prune, share (Wang, Jian et al., "Learn-Prune-Share for Lifelong Learning", ICDM 2020).

Each prunable trunk weight (linear/conv, in GEMM view (out, in/groups·kh·kw)) is split into disjoint task partitions.
Task t solves problem (5): its own weights W come only from the free pool (units no earlier task owns) and a sharing
mask M selects which of the earlier weights W̄^{t-1} it reuses; it runs on ``W + M ⊙ W̄^{t-1}``. Because later tasks
only write into the free pool, biases freeze after task 1 and BatchNorm is either per task or frozen after task 1
(config `batchnorm`), every earlier task's weights — and so its predictions — stay bit-identical: no forgetting by
construction. Weights are pruned one by one, so a graph changes nothing: residual adds and concatenations only
connect layers, and a 3×3 depthwise conv's units are its channels × 9 elements, its 9 kernel positions (columns) or
its channels (rows).

Per task, three phases (paper Section V-A "LPS Implementation"):

1. warm-up: train W densely on the free pool, M = 1 (fixed);
2. ADMM (Appendix A): W and the real-valued relaxation of M are trained with Adam on
   ``loss + ρ/2‖W − Z + U‖² + τ/2‖M − Y + K‖²``; once per ``admm_every`` epochs Z ← Π_S(W + U), Y ← Π_S'(M + K) and
   the scaled duals U += W − Z, K += M − Y. ρ = τ start at ``rho`` and grow ×10 at equal intervals
   (``rho_levels`` values); the scaled duals are divided by 10 at each increase so the unscaled multipliers ρU, τK
   carry over (Boyd et al. §3.4.1);
3. final: project W onto its sparsity set (top-α units of the free pool) and M onto binary top-β over the earlier
   support, then retrain only W's kept entries (and the head) with M fixed.

α is the fraction of a layer's units (elements, GEMM columns or rows) a task may own (at least one), capped by what is
still free; β the fraction of the earlier support a task shares. Heads are per task and unconstrained. The last task
is pruned like every other (the paper allows skipping it), so a packed model can always be resumed with new tasks;
once the pool runs dry a task owns nothing and runs on shared weights and its head alone.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.arch import param_shapes, prunable
from edgecl.deltas import PackedModel, TaskInfo
from edgecl.errors import UsageError
from edgecl.train.batchnorm import BatchNorm, leaves, trainable
from edgecl.train.data import TaskData
from edgecl.train.methods.lps_config import PRUNING_UNIT, LPSConfig
from edgecl.train.models import Params, forward, init_head, to_numpy
from edgecl.train.projections import expand_units, n_units, project_binary, project_sparse, sparse_support
from edgecl.train.protocol import Method, TrainContext, adam, check_resumable, run_epochs, task_generator


class _Layer:
    """Training state of one prunable weight for the current task."""

    def __init__(self, name: str, wbar: torch.Tensor, owner: torch.Tensor, unit: str, cfg: LPSConfig,
                 init: torch.Tensor):
        self.name, self.unit, self.shape = name, unit, tuple(wbar.shape)
        self.wbar = wbar
        self.free_units = owner == 0
        self.free = expand_units(self.free_units, self.shape, unit).to(wbar.dtype)
        self.earlier = expand_units(owner > 0, self.shape, unit)
        # at least one unit while any is free: a small layer (an SE squeeze of 4 filters) would otherwise round to
        # nothing and stay all zero for every task
        self.k_alpha = min(max(1, round(cfg.alpha * n_units(self.shape, unit))), int(self.free_units.sum()))
        self.k_beta = round(cfg.beta * int(self.earlier.sum()))
        # "zero" lets earlier weights carry the signal (the authors' code); with nothing learned yet (task 1) the
        # free pool must start random or no gradient flows.
        random_start = cfg.init_free == "random" or not bool(self.earlier.any())
        start = init if random_start else torch.zeros_like(init)
        self.w = (start * self.free).requires_grad_(True)
        self.shares = bool(self.earlier.any())  # task 1 has nothing to share
        self.m = self.earlier.to(wbar.dtype)  # M = 1 on the earlier support; trained from the ADMM phase on
        self.keep = self.free  # which W entries count; the final projection narrows it to the owned units

    def effective(self) -> torch.Tensor:
        return self.w * self.keep + self.m * self.wbar

    def project_w(self, w: torch.Tensor) -> torch.Tensor:
        return project_sparse(w, self.k_alpha, self.unit, self.free_units)

    def project_m(self, m: torch.Tensor) -> torch.Tensor:
        return project_binary(m, self.k_beta, self.earlier)


class LPS(Method):
    name = "lps"
    redraws_trunk = True  # each task's free weights start from a fresh draw
    Config = LPSConfig

    def __init__(self, arch, config=None, start=None):
        super().__init__(arch, config, start)
        self.unit = PRUNING_UNIT[self.config.pruning]
        self.names = prunable(arch)
        init = self.initial_params()
        self.wbar = {n: torch.zeros_like(init[n]) for n in self.names}
        self.owner = {n: torch.zeros(n_units(tuple(init[n].shape), self.unit), dtype=torch.int64)
                      for n in self.names}
        self.bn = BatchNorm(arch, self.config.batchnorm, init)
        self.shared: Params = {k: v for k, v in init.items() if k not in self.wbar and k not in self.bn.names}
        self.heads: list[Params] = []
        self.shares: list[dict[str, np.ndarray]] = []
        self.infos: list[TaskInfo] = []
        self.capacity: list[float] = []
        self.alpha_achieved: list[dict[str, float]] = []
        self.beta_achieved: list[dict[str, float | None]] = []
        # diagnostics of the latest ADMM phase: per-epoch ρ and primal residuals, and the final Z, Y (tests use them)
        self.admm_trace: dict[str, list[float]] = {}
        self.admm_state: dict[str, Any] = {}

    # ---------------------------------------------------------------- training
    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        if t != len(self.infos):
            raise UsageError(f"LPS learns tasks in order: expected task {len(self.infos)}, got {t}")
        cfg, dev = self.config, ctx.device
        gen = task_generator(cfg, t)
        fresh = self.initial_params(gen)
        self._shuffle = gen  # one shuffling stream through all three phases
        layers = [_Layer(n, self.wbar[n].to(dev), self.owner[n].to(dev), self.unit, cfg, fresh[n].to(dev))
                  for n in self.names]
        head = {k: v.to(dev).requires_grad_(True) for k, v in init_head(self.arch, task.n_classes, gen).items()}
        shared = leaves(self.shared, dev, lambda name: t == 0)  # biases: learned on task 1, frozen after (Sec. V-A)
        bn = self.bn.start(t, dev)
        base = list(head.values()) + trainable(shared) + trainable(bn)
        batch_stats = self.bn.batch_stats(t)
        warm, admm, final = cfg.phases()

        def loss_fn(x, y):
            params = {**shared, **bn, **head, **{lay.name: lay.effective() for lay in layers}}
            return F.cross_entropy(forward(self.arch, params, x, train=batch_stats), y)

        with ctx.bar(warm + admm + final, f"lps task {t}") as bar:
            self._fit(task, warm, base + [lay.w for lay in layers], [], loss_fn, None, bar, dev)
            self._admm(task, admm, layers, base, loss_fn, bar, dev)
            for lay in layers:  # final projection of weights and masks, then retrain the kept entries only
                with torch.no_grad():
                    lay.keep = expand_units(sparse_support(lay.w, lay.k_alpha, lay.unit, lay.free_units),
                                            lay.shape, lay.unit).to(lay.w.dtype)
                    lay.w.mul_(lay.keep)
                lay.m = lay.project_m(lay.m.detach())
            self._fit(task, final, base + [lay.w for lay in layers], [], loss_fn, None, bar, dev)
        final_weights = {lay.name: lay.effective().detach() for lay in layers}
        self.bn.settle(t, self.arch, {**shared, **bn, **head, **final_weights}, task, dev)
        self._commit(t, task, layers, shared, head)
        self.bn.commit(t, bn)
        if self.admm_trace.get("w_residual"):
            ctx.notes.setdefault(t, {})["lps_admm_residual"] = {"w": self.admm_trace["w_residual"][-1],
                                                                 "m": self.admm_trace["m_residual"][-1]}

    def _fit(self, task: TaskData, epochs: int, params: list[torch.Tensor], mask_params: list[torch.Tensor],
             loss_fn: Callable, penalty: Callable | None, bar, dev: str,
             end_of_epoch: Callable[[int], None] | None = None) -> None:
        """Adam on the loss for `epochs` epochs; `penalty` adds the ADMM proximal terms' gradients after backward.
        Mask parameters may get their own learning rate."""
        if epochs == 0:
            return
        groups = [{"params": params}]
        if mask_params:
            groups.append({"params": mask_params, "lr": self.config.mask_lr or self.config.lr})
        run_epochs(task, adam(groups, self.config.lr), loss_fn, epochs=epochs, batch_size=self.config.batch_size,
                   generator=self._shuffle, bar=bar, device=dev, after_backward=penalty, end_of_epoch=end_of_epoch)

    def _admm(self, task: TaskData, epochs: int, layers: list[_Layer], base: list[torch.Tensor],
              loss_fn: Callable, bar, dev: str) -> None:
        """The ADMM phase (Appendix A, Eq. 12–14) with ρ = τ increased ×10 at equal intervals."""
        cfg = self.config
        with torch.no_grad():
            z = [lay.project_w(lay.w) for lay in layers]
            y = [lay.project_m(lay.m) for lay in layers]
        u = [torch.zeros_like(lay.w) for lay in layers]
        k = [torch.zeros_like(lay.m) for lay in layers]
        level = [0]
        trace: dict[str, list[float]] = {"rho": [], "w_residual": [], "m_residual": []}

        def rho() -> float:
            return cfg.rho * 10.0 ** level[0]

        def penalty() -> None:
            """Gradient of Σ ρ/2‖W−Z+U‖² + τ/2‖M−Y+K‖² (Eq. 13), added in closed form: the same step as
            differentiating the quadratic through autograd, without building its graph every step."""
            with torch.no_grad():
                for lay, zi, ui, yi, ki in zip(layers, z, u, y, k):
                    lay.w.grad.add_(lay.w - zi + ui, alpha=rho())
                    if lay.shares:
                        lay.m.grad.add_(lay.m - yi + ki, alpha=rho())

        def end_of_epoch(epoch: int) -> None:
            with torch.no_grad():
                if (epoch + 1) % cfg.admm_every == 0 or epoch + 1 == epochs:
                    for i, lay in enumerate(layers):
                        z[i] = lay.project_w(lay.w + u[i])
                        u[i] += lay.w - z[i]
                        y[i] = lay.project_m(lay.m + k[i])
                        k[i] += lay.m - y[i]
                trace["rho"].append(rho())
                trace["w_residual"].append(_relative([lay.w for lay in layers], z))
                trace["m_residual"].append(_relative([lay.m for lay in layers], y))
                new_level = min((epoch + 1) * cfg.rho_levels // max(epochs, 1), cfg.rho_levels - 1)
                if new_level > level[0]:
                    scale = 10.0 ** (level[0] - new_level)
                    for ui, ki in zip(u, k):
                        ui.mul_(scale)
                        ki.mul_(scale)
                    level[0] = new_level

        masks = [lay.m.requires_grad_(True) for lay in layers if lay.shares]
        self._fit(task, epochs, base + [lay.w for lay in layers], masks, loss_fn, penalty, bar, dev, end_of_epoch)
        self.admm_trace = trace
        self.admm_state = {"z": z, "y": y, "layers": layers}

    def _commit(self, t: int, task: TaskData, layers: list[_Layer], shared: Params, head: Params) -> None:
        """Write task t into the superposed weights: W̄ takes its owned entries, the owner map its units."""
        alpha, beta, owned_total, total = {}, {}, 0, 0
        share: dict[str, np.ndarray] = {}
        for lay in layers:
            own_units = sparse_support(lay.w, lay.k_alpha, lay.unit, lay.free_units).cpu()
            own = expand_units(own_units, lay.shape, lay.unit)
            with torch.no_grad():
                self.wbar[lay.name] = torch.where(own, lay.w.detach().cpu(), self.wbar[lay.name])
            self.owner[lay.name][own_units] = t + 1
            earlier = lay.earlier.cpu()
            bits = lay.m.detach().cpu()[earlier] > 0.5
            if bits.numel():
                share[lay.name] = bits.numpy().astype(bool)
            alpha[lay.name] = float(own.sum()) / own.numel()
            beta[lay.name] = float(bits.sum()) / bits.numel() if bits.numel() else None
            owned_total += int((self.owner[lay.name] > 0).sum()) * (own.numel() // self.owner[lay.name].numel())
            total += own.numel()
        if t == 0:
            self.shared = {k: v.detach().cpu() for k, v in shared.items()}
        self.heads.append({k: v.detach().cpu() for k, v in head.items()})
        self.shares.append(share)
        self.infos.append(TaskInfo(task.name, task.n_classes))
        self.capacity.append(owned_total / total)
        self.alpha_achieved.append(alpha)
        self.beta_achieved.append(beta)

    # ---------------------------------------------------------------- the deployed form
    def pack(self) -> PackedModel:
        owner_dtype = np.uint16 if len(self.infos) > 254 else np.uint8
        params: dict[str, dict[str, Any]] = {n: {"kind": "lps", "unit": self.unit} for n in self.names}
        params.update({k: {"kind": "shared"} for k in self.shared})
        params.update(self.bn.specs())
        params.update({"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}})
        base = {**to_numpy(self.shared), **self.bn.base()}
        for n in self.names:
            base[n] = self.wbar[n].numpy().astype(np.float32).copy()
            owner = self.owner[n].numpy().astype(owner_dtype)
            base[f"{n}:owner"] = owner.reshape(self.wbar[n].shape) if self.unit == "element" else owner
        tensors = []
        for t, (head, share) in enumerate(zip(self.heads, self.shares)):
            tt = {**to_numpy(head), **self.bn.task_tensors(t)}
            tt.update({f"{n}:share": bits.copy() for n, bits in share.items()})
            tensors.append(tt)
        extra = {"pruning": self.config.pruning, "unit": self.unit, "capacity": list(self.capacity),
                 "alpha": [dict(a) for a in self.alpha_achieved], "beta": [dict(b) for b in self.beta_achieved]}
        return PackedModel(self.arch, self.name, self.config.to_json(), params, base, list(self.infos), tensors,
                           extra)

    def resume(self, packed: PackedModel, state: dict | None = None) -> None:
        """Continue from a packed LPS model: later tasks take only what is still free, so earlier tasks stay exact."""
        check_resumable(packed, self.name, self.arch)
        self.bn.resume(packed)
        self.config.batchnorm = self.bn.rule
        needed = list(self.shared) + [k for n in self.names for k in (n, f"{n}:owner")]
        missing = [k for k in needed if k not in packed.base]
        if missing:
            raise UsageError(f"cannot resume: the artifact lacks base tensors {missing}")
        shapes = param_shapes(self.arch)
        for n in self.names:
            spec = packed.params.get(n, {})
            if spec.get("kind") != "lps" or spec.get("unit", "element") != self.unit:
                raise UsageError(f"cannot resume: tensor {n!r} is {spec} in the artifact, this config prunes by "
                                 f"{self.unit!r} units")
            owner = np.asarray(packed.base[f"{n}:owner"]).astype(np.int64).reshape(-1)
            if owner.size != n_units(shapes[n], self.unit) or owner.max(initial=0) > packed.n_tasks:
                raise UsageError(f"cannot resume: {n}:owner has {owner.size} entries up to {owner.max(initial=0)}, "
                                 f"expected {n_units(shapes[n], self.unit)} up to {packed.n_tasks}")
            self.wbar[n] = torch.from_numpy(np.array(packed.base[n], dtype=np.float32)).reshape(shapes[n])
            self.owner[n] = torch.from_numpy(owner)
        self.shared = {k: torch.from_numpy(np.array(packed.base[k], dtype=np.float32)) for k in self.shared}
        self.infos = list(packed.tasks)
        self.heads = [{k: torch.from_numpy(np.array(tt[k])) for k in ("head.weight", "head.bias")}
                      for tt in packed.task_tensors]
        self.shares = [{n: np.asarray(tt[f"{n}:share"], dtype=bool) for n in self.names if f"{n}:share" in tt}
                       for tt in packed.task_tensors]
        extra = packed.extra or {}
        n = packed.n_tasks
        self.capacity = list(extra.get("capacity", [math.nan] * n))
        self.alpha_achieved = list(extra.get("alpha", [{}] * n))
        self.beta_achieved = list(extra.get("beta", [{}] * n))


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖a − b‖ / max(‖a‖, tiny) over all layers together: the ADMM primal residual, scale-free."""
    num = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float((x ** 2).sum()) for x in a))
    return num / max(den, 1e-12)
