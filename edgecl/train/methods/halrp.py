"""HALRP — Hessian-aware low-rank perturbation (Li et al.; ../shared/papers/halrp-hessian-aware-low-rank.txt).

Task 0 trains the base weights W_base, frozen from then on. Every later task t owns, per linear/conv layer, a row
scaling r (J,), a column scaling s (I,) and low-rank factors u (J,k), v (I,k), so that its weight is
``r ⊙ W_base ⊙ s + u vᵀ`` (for a convolution the residual u vᵀ is the paper's 1×1×J×I tensor, constant over kernel
positions, Eq. 7). Per task t ≥ 1 (Algorithm 1):

1. warm-up: train everything freely from the base for ``warmup_epochs`` (n_r) epochs → W_free;
2. least squares for r and s (Appendix C, Eqs. 19–20: r given s = 1, then s given r; ``ls_rounds`` > 1 keeps
   alternating), residual B = W_free − r W_base s, averaged over kernel positions for convolutions;
3. SVD of B;
4. ranks chosen jointly over all layers by Eq. 11 (`select_ranks`): singular value i of layer l scores
   G_l · c_l · σ²_{l,i} and the fewest values whose score reaches ``alpha`` of the total are kept. G_l is the
   squared-gradient statistic (`gradient_importance`): the mean over the task's training mini-batches of ‖∂L/∂W_l‖²₂
   at W_free, the empirical-Fisher stand-in for ‖H_l‖_F of Eq. 10; c_l is the number of kernel positions (1 for
   linear layers), because a residual constant over c_l positions perturbs the full weight by c_l σ² (Eq. 9);
5. u = U√Σ, v = V√Σ (Σ split between the factors, so u vᵀ = U Σ Vᵀ — "Σ folded in"), then fine-tune {r, s, u, v,
   head, per-task biases (and BatchNorm, `batchnorm="task"`)} for the remaining epochs with cross-entropy + Eq. 12
   (λ0 (‖u‖₁ + ‖v‖₁) + λ1 (‖r‖² + ‖s‖² + ‖u‖² + ‖v‖²)), in exactly the arithmetic of `deltas.lowrank_weight`;
6. prune factor entries (Section 4.4): ``absolute`` (|x| ≤ prune_abs), ``percentile`` (keep the largest entries
   within a budget of ``prune_budget`` × the dense trunk's weight count per task) or ``mixed`` (the larger threshold).

Grouped and depthwise convolutions keep the weight's own axes: the weight is (J, I/groups, kh, kw), r scales its J
filters and s its I/groups input positions (position i of every group alike: a depthwise conv has one s), and the
residual U Vᵀ is J × I/groups, constant over kernel positions like any convolution's — for a depthwise conv a
per-filter constant added to its kernel (rank ≤ 1). So `deltas.lowrank_weight`, the ONNX export and the runtime treat
every convolution alike; a per-group S (I numbers) would need a delta form of its own.

Re-pruning of earlier tasks' factors is OFF by default (``reprune=False``): a task's tensors are frozen when it ends,
so every earlier task stays bit-identical. With ``reprune=True`` the percentile threshold is taken over all tasks'
factors together (the paper's "all layers of all tasks") and applied to all of them — earlier tasks then change.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.arch import param_shapes, prunable
from edgecl.arch.spec import frozen_tensors
from edgecl.deltas import PackedModel, TaskInfo
from edgecl.errors import UsageError
from edgecl.train import distributed
from edgecl.train.batchnorm import BatchNorm, is_statistic, leaves, trainable
from edgecl.train.data import TaskData
from edgecl.train.methods.finetune import fit
from edgecl.train.methods.halrp_config import HALRPConfig
from edgecl.train.models import Params, forward, init_head, to_numpy
from edgecl.train.protocol import Method, TrainContext, adam, check_resumable, run_epochs, shards, task_generator

FACTORS = ("r", "s", "u", "v")


# ---------------------------------------------------------------- the pieces of Algorithm 1, each testable alone

def _broadcast(vec: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vec.reshape(shape)


def diag_scalings(w_free: torch.Tensor, w_base: torch.Tensor, rounds: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares diagonal scalings of Appendix C: r_j (Eq. 19) with s = 1, then s_i given r (Eq. 20); later
    rounds re-solve r given s and s given r. Sums run over the other axis and all kernel positions. Computed in
    float64; a zero denominator (an all-zero row/column of W_base) leaves the scaling at 1."""
    wf, wb = w_free.double(), w_base.double()
    nd = wb.ndim
    rows = tuple(a for a in range(nd) if a != 0)
    cols = tuple(a for a in range(nd) if a != 1)
    r = torch.ones(wb.shape[0], dtype=torch.float64, device=wb.device)
    s = torch.ones(wb.shape[1], dtype=torch.float64, device=wb.device)
    for _ in range(rounds):
        ws = wb * _broadcast(s, 1, nd)
        r = _safe_ratio((wf * ws).sum(rows), (ws * ws).sum(rows))
        rw = _broadcast(r, 0, nd) * wb
        s = _safe_ratio((wf * rw).sum(cols), (rw * rw).sum(cols))
    return r.float(), s.float()


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(num))


def residual_matrix(w_free: torch.Tensor, w_base: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """B = W_free − r W_base s as a J×I matrix; for a convolution averaged over the kernel positions (Sec. 4.2)."""
    nd = w_base.ndim
    b = w_free.double() - _broadcast(r.double(), 0, nd) * w_base.double() * _broadcast(s.double(), 1, nd)
    return b.mean(dim=(2, 3)) if nd == 4 else b


def select_ranks(sigmas: dict[str, np.ndarray], importance: dict[str, float], alpha: float,
                 min_rank: int = 0, max_rank: int = 0) -> dict[str, int]:
    """Eq. 11 across layers: score every singular value as importance[l] · σ², sort all scores descending, keep the
    fewest whose cumulative sum reaches alpha of the total. Within a layer scores fall with σ, so the kept set is a
    prefix k_l of each layer's spectrum. (`importance` already includes the kernel-position factor c_l.)
    min_rank/max_rank clamp afterwards (0 = none)."""
    names = list(sigmas)
    scores = np.concatenate([importance[n] * np.asarray(sigmas[n], np.float64) ** 2 for n in names])
    owner = np.concatenate([np.full(len(sigmas[n]), i) for i, n in enumerate(names)])
    ranks = {n: 0 for n in names}
    total = scores.sum()
    if total > 0:
        order = np.argsort(-scores, kind="stable")
        cum = np.cumsum(scores[order])
        n_keep = int(np.searchsorted(cum, alpha * total, side="left")) + 1
        for i in owner[order[:min(n_keep, len(order))]]:
            ranks[names[i]] += 1
    for n in names:
        k = max(ranks[n], min_rank)
        if max_rank:
            k = min(k, max_rank)
        ranks[n] = min(k, len(sigmas[n]))
    return ranks


def gradient_importance(arch, params: Params, names: list[str], task: TaskData, batch_size: int,
                        generator: torch.Generator, device: str = "cpu") -> dict[str, float]:
    """G_l = mean over the task's training mini-batches of ‖∂L_batch/∂W_l‖²₂ at the current (warm-up) weights,
    BatchNorm in inference mode (the statistics are not touched)."""
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    use = {**{k: v.detach() for k, v in params.items()}, **leaves}
    total = {n: 0.0 for n in names}
    count = 0
    for x, y, size in shards(task, batch_size, generator, device):
        loss = distributed.weighted(F.cross_entropy(forward(arch, use, x), y), len(x), size)
        grads = distributed.all_sum(torch.autograd.grad(loss, [leaves[n] for n in names]))  # the global batch's
        for n, g in zip(names, grads):
            total[n] += float((g.double() ** 2).sum())
        count += 1
    return {n: total[n] / max(count, 1) for n in names}


def lowrank_torch(base: torch.Tensor, r: torch.Tensor, s: torch.Tensor, u: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor:
    """The torch twin of `deltas.lowrank_weight`, same order of operations: (r ⊙ W) ⊙ s, then + u vᵀ broadcast over
    kernel positions."""
    nd = base.ndim
    w = _broadcast(r, 0, nd) * base
    w = w * _broadcast(s, 1, nd)
    if u.shape[-1] > 0:
        w = w + (u @ v.T).reshape(u.shape[:1] + v.shape[:1] + (1,) * (nd - 2))
    return w


def keep_largest(values: np.ndarray, n_keep: int) -> float:
    """The threshold t such that |x| > t keeps at most n_keep entries of `values` (the percentile rule)."""
    flat = np.sort(np.abs(values.ravel()))[::-1]
    if n_keep >= flat.size:
        return 0.0
    return float(flat[n_keep]) if n_keep >= 0 else float("inf")


def prune_threshold(values: np.ndarray, mode: str, abs_thr: float, n_keep: int) -> float:
    """Section 4.4: the absolute threshold, the percentile threshold holding n_keep entries, or their maximum."""
    if mode == "none" or values.size == 0:
        return -1.0
    if mode == "absolute":
        return abs_thr
    pct = keep_largest(values, n_keep)
    return pct if mode == "percentile" else max(pct, abs_thr)


# ---------------------------------------------------------------- the method

class HALRP(Method):
    name = "halrp"
    Config = HALRPConfig

    def __init__(self, arch, config=None, start=None):
        super().__init__(arch, config, start)
        self.layers = prunable(arch)
        self.shapes = param_shapes(arch)
        self.bn = BatchNorm(arch, self.config.batchnorm, self.initial_params())
        self.fixed = frozen_tensors(arch)  # constants (a frozen position embedding): in the base, stored once
        self.own_names = [n for n in self.shapes if n not in self.layers + self.fixed and n not in self.bn.names]
        self.base: dict[str, np.ndarray] = {}
        self.store: list[dict[str, np.ndarray]] = []   # per task: factors, biases, head (frozen numpy)
        self.infos: list[TaskInfo] = []
        self.ranks: list[dict[str, int]] = []
        self.importance: list[dict[str, float]] = []

    # -- task 0: the base ------------------------------------------------------------------------------------
    def _learn_base(self, task: TaskData, ctx: TrainContext) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)
        params = leaves({**self.initial_params(gen), **init_head(self.arch, task.n_classes, gen)},
                        ctx.device)
        fit(self.arch, params, trainable(params), task, self.config, ctx, 0, "halrp task 0 (base)")
        self.bn.settle(0, self.arch, params, task, ctx.device)
        arrays = to_numpy(params)
        self.base = {n: arrays[n] for n in self.layers + self.fixed}
        self.store.append({n: arrays[n] for n in self.own_names + ["head.weight", "head.bias"]})
        self.bn.commit(0, params)
        self.ranks.append({n: 0 for n in self.layers})
        self.importance.append({})

    # -- task t ≥ 1 ------------------------------------------------------------------------------------------
    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        if t != len(self.store):
            raise UsageError(f"halrp: tasks must be learned in order; expected task {len(self.store)}, got {t}")
        self.infos.append(TaskInfo(task.name, task.n_classes))
        if t == 0:
            return self._learn_base(task, ctx)
        cfg, dev = self.config, ctx.device
        # 1. warm-up from the base (task 0's trunk, a fresh head)
        start = {**{n: torch.from_numpy(a) for n, a in self.base.items()},
                 **{n: torch.from_numpy(a) for n, a in self.store[0].items() if not n.startswith("head.")},
                 **init_head(self.arch, task.n_classes, torch.Generator().manual_seed(cfg.seed * 1000 + t))}
        free = {**leaves(start, dev), **self.bn.start(t, dev)}
        warm_cfg = copy.copy(cfg)
        warm_cfg.epochs = cfg.warmup_epochs
        fit(self.arch, free, trainable(free), task, warm_cfg, ctx, t, f"halrp task {t} warm-up",
            self.bn.batch_stats(t))
        # 2–4. scalings, residual SVD, importance, global rank selection
        base = {n: torch.from_numpy(self.base[n]).to(dev) for n in self.layers + self.fixed}
        init, sigmas, svd = {}, {}, {}
        for n in self.layers:
            r, s = diag_scalings(free[n].detach(), base[n], cfg.ls_rounds)
            uu, sv, vh = torch.linalg.svd(residual_matrix(free[n].detach(), base[n], r, s), full_matrices=False)
            init[n], sigmas[n], svd[n] = (r, s), sv.cpu().numpy(), (uu, sv, vh)
        grads = gradient_importance(self.arch, free, self.layers, task, cfg.batch_size,
                                    task_generator(cfg, t), dev)
        per_entry = {n: math.prod(self.shapes[n]) if cfg.grad_stat == "mean" else 1 for n in self.layers}
        importance = {n: grads[n] / per_entry[n] * math.prod(self.shapes[n][2:]) for n in self.layers}
        ranks = select_ranks(sigmas, importance, cfg.alpha, cfg.min_rank, cfg.max_rank)
        # 5. factors from the truncated SVD, then fine-tune in the deployed parametrisation
        factors: Params = {}
        for n in self.layers:
            (r, s), (uu, sv, vh), k = init[n], svd[n], ranks[n]
            root = sv[:k].sqrt()
            factors.update({f"{n}:r": r, f"{n}:s": s, f"{n}:u": (uu[:, :k] * root).float(),
                            f"{n}:v": (vh[:k].T * root).float()})
        factors = {k: v.detach().clone().to(dev).requires_grad_(True) for k, v in factors.items()}
        own = leaves({k: free[k] for k in self.own_names + ["head.weight", "head.bias"]}, dev)
        bn = leaves({k: free[k] for k in self.bn.names}, dev, lambda name: self.bn.learns(t))
        self._finetune(t, task, ctx, base, factors, own, bn)
        final = {n: lowrank_torch(base[n], *(factors[f"{n}:{f}"] for f in FACTORS)).detach() for n in self.layers}
        self.bn.settle(t, self.arch, {**base, **own, **bn, **final}, task, dev)
        # 6. prune, freeze
        tensors = {**to_numpy(factors), **to_numpy(own)}
        self.store.append(tensors)
        self.bn.commit(t, bn)
        self.ranks.append(ranks)
        self.importance.append(importance)
        self._prune(t)

    def _finetune(self, t: int, task: TaskData, ctx: TrainContext, base: Params, factors: Params,
                  own: Params, bn: Params) -> None:
        """Adam on cross-entropy + Eq. 12; the regulariser's exact gradient is added by `add_penalty_grad` (cheaper
        than a loss graph over many small tensors)."""
        cfg = self.config
        steps = list(factors.values()) + trainable(own) + trainable(bn)
        epochs = cfg.epochs - cfg.warmup_epochs
        batch_stats = self.bn.batch_stats(t)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            params = {**base, **own, **bn, **{n: lowrank_torch(base[n], *(factors[f"{n}:{f}"] for f in FACTORS))
                                               for n in self.layers}}
            return F.cross_entropy(forward(self.arch, params, x, train=batch_stats), y)

        with ctx.bar(epochs, f"halrp task {t} low-rank fine-tune") as bar:
            run_epochs(task, adam(steps, cfg.lr), loss_fn, epochs=epochs, batch_size=cfg.batch_size,
                       generator=task_generator(cfg, t), bar=bar, device=ctx.device,
                       after_backward=lambda: self.add_penalty_grad(factors), zero_to_none=False)

    def penalty(self, factors: Params) -> torch.Tensor:
        """Eq. 12 as a value: λ0 (‖u‖₁ + ‖v‖₁) + λ1 (‖r‖² + ‖s‖² + ‖u‖² + ‖v‖²), summed over layers."""
        cfg = self.config
        l1 = sum(factors[f"{n}:{f}"].abs().sum() for n in self.layers for f in ("u", "v"))
        l2 = sum((factors[f"{n}:{f}"] ** 2).sum() for n in self.layers for f in FACTORS)
        return cfg.lambda0 * l1 + cfg.lambda1 * l2

    def add_penalty_grad(self, factors: Params) -> None:
        """Add ∂(Eq. 12)/∂factors to their .grad: 2λ1·x on r, s, u, v and λ0·sign(x) on u, v."""
        cfg = self.config
        every = [p for p in factors.values() if p.numel()]
        sparse = [factors[f"{n}:{f}"] for n in self.layers for f in ("u", "v") if factors[f"{n}:{f}"].numel()]
        for p in every:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        with torch.no_grad():  # empty lists when every rank is 0 (a task that kept no residual factor)
            if every:
                torch._foreach_add_([p.grad for p in every], every, alpha=2 * cfg.lambda1)
            if sparse:
                torch._foreach_add_([p.grad for p in sparse], torch._foreach_sign(sparse), alpha=cfg.lambda0)

    def _prune(self, t: int) -> None:
        cfg = self.config
        if cfg.prune == "none":
            return
        tasks = range(1, t + 1) if cfg.reprune else [t]
        keys = [(i, f"{n}:{f}") for i in tasks for n in self.layers for f in ("u", "v")]
        pooled = np.concatenate([self.store[i][k].ravel() for i, k in keys]) if keys else np.zeros(0)
        budget = int(cfg.prune_budget * sum(self.base[n].size for n in self.layers)) * len(tasks)
        thr = prune_threshold(pooled, cfg.prune, cfg.prune_abs, budget)
        for i, k in keys:
            a = self.store[i][k]
            self.store[i][k] = np.where(np.abs(a) > thr, a, np.float32(0)).astype(np.float32)

    def resume(self, packed: PackedModel, state: dict | None = None) -> None:
        """Continue a deployed HALRP model: base and every task's tensors come back as they were stored, so the
        tasks learned before stay bit-identical."""
        check_resumable(packed, self.name, self.arch)
        self.bn.resume(packed)
        self.config.batchnorm = self.bn.rule
        extra = packed.extra or {}
        # own writable copies: a loaded artifact's arrays are read-only views of the file
        self.base = {n: np.array(packed.base[n]) for n in self.layers + self.fixed}
        self.store = [{k: np.array(v) for k, v in tt.items() if k not in self.bn.names} for tt in packed.task_tensors]
        self.infos = list(packed.tasks)
        self.ranks = [dict(r) for r in extra.get("ranks", [])] or [
            {n: tt[f"{n}:u"].shape[1] if f"{n}:u" in tt else 0 for n in self.layers} for tt in self.store]
        self.importance = [dict(i) for i in extra.get("importance", [{} for _ in self.store])]

    # -- deployment form ---------------------------------------------------------------------------------------
    def pack(self) -> PackedModel:
        params = {n: {"kind": "lowrank"} for n in self.layers}
        params.update({n: {"kind": "shared"} for n in self.fixed})
        params.update({n: {"kind": "task"} for n in self.own_names + ["head.weight", "head.bias"]})
        params.update(self.bn.specs())
        return PackedModel(self.arch, self.name, self.config.to_json(), params, {**self.base, **self.bn.base()},
                           list(self.infos), [{**tt, **self.bn.task_tensors(t)} for t, tt in enumerate(self.store)],
                           self.growth_report())

    def task_param_count(self, t: int) -> dict[str, int]:
        """Numbers task t adds: non-zero factor entries, scalings, per-task biases/BN and head (task 0: the dense
        model). Σ is folded into u and v, so it costs nothing extra."""
        tt = self.store[t]
        own = sum(tt[n].size for n in self.own_names)
        if self.bn.rule == "task" or t == 0:  # the affine pairs; running statistics are not learned numbers
            own += sum(math.prod(self.shapes[n]) for n in self.bn.names if not is_statistic(n))
        head = tt["head.weight"].size + tt["head.bias"].size
        if t == 0:
            return {"factors": 0, "scalings": 0, "own": own, "head": head,
                    "total": own + head + sum(a.size for a in self.base.values())}
        fac = sum(int(np.count_nonzero(tt[f"{n}:{f}"])) for n in self.layers for f in ("u", "v"))
        scal = sum(tt[f"{n}:{f}"].size for n in self.layers for f in ("r", "s"))
        return {"factors": fac, "scalings": scal, "own": own, "head": head, "total": fac + scal + own + head}

    def growth_report(self) -> dict:
        """Ranks per layer per task, parameters per task, and cumulative growth relative to one dense model."""
        if not self.store:
            return {}
        counts = [self.task_param_count(t) for t in range(len(self.store))]
        dense = counts[0]["total"]
        added = np.cumsum([0] + [c["total"] for c in counts[1:]])
        trunk_added = np.cumsum([0] + [c["total"] - c["head"] for c in counts[1:]])   # heads: every method pays
        return copy.deepcopy({"ranks": self.ranks, "dense_params": dense, "task_params": counts,
                              "growth": [float(a / dense) for a in added],
                              "growth_without_heads": [float(a / dense) for a in trunk_added],
                              "reprune": self.config.reprune, "importance": self.importance})
