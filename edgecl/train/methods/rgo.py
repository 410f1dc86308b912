"""RGO — recursive gradient optimisation with feature encoding layers (paper in shared/papers, Algorithm 1).

Per task k:
1. Train with SGD whose weight/bias gradients are replaced by ĝ = P·g·dim(P)/trace(P) (P fixed during the task).
2. A second pass over the task's data updates each P recursively (RLS, α = 1) with per-sample vectors
   sqrt(l''_yy)·v, l''_yy = a_y(1 − a_y) the softmax cross-entropy curvature at the true class (Appendix B.1) and v
   the parameter's local vector: the layer input for a weight (for a conv every input patch, ÷ sqrt(positions)),
   ∂f_y/∂b for a bias. So P ∝ (αI + Σ_old tasks Σ_samples g gᵀ)⁻¹, the inverse of the paper's H̄_l (Eq. 13).
   Choice: a weight's vector leaves out the per-unit factor ∂f_y/∂y_l of Algorithm 1 line 9 (config
   weight_vectors="backprop" puts its RMS over units back: on permuted digits the MLP gets the same ACC/BWT within
   0.1 points, LeNet forgets more, BWT -3.1 vs -1.8); P acts only on the input side, so the inputs span what an old
   task's gradients can touch.

Where P lives. A weight W (out × in, conv in GEMM form) has P over its *input* side (in × in, shared by all output
units: "feature extractors in the same layer share a projection matrix"). A bias is a vector parameter with its own
P (out × out, Appendix B.2's "vector" row). Both live in the coordinates of the shared stored parameters; with FEL,
task k's layer sees its inputs in task k's permuted order, so the curvature vectors of task k are recorded in exactly
the coordinates the parameter's gradient has during task k. Old tasks' inputs therefore appear randomly permuted
to new tasks — the decorrelation the paper uses FEL for (Section 4.1); P is never re-permuted per task.

Feature encoding layers. After each real layer a fixed permutation of its output units (channels for conv), from
`edgecl.deltas.task_permutation(seed, layer, n)`. Permuting a layer's outputs is the same as permuting its weight
rows and bias, which is how training applies it, so each task trains exactly the weights `materialize` folds.
FEL needs a sequential trunk without BatchNorm (the paper removes BatchNorm too); `fel=False` is RGO-2, which also
runs residual/BatchNorm trunks (BatchNorm learns on task 0 and is frozen after, since RGO cannot project it).
P is training state, not part of the artifact (no per-task tensors besides heads), so `resume` is not supported.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.arch import is_sequential, param_shapes, prunable
from edgecl.deltas import PackedModel, TaskInfo, task_permutation
from edgecl.errors import UsageError
from edgecl.train.data import TaskData
from edgecl.train.methods.rgo_config import RGOConfig
from edgecl.train.methods.rgo_ops import LayerTap, Projector, conv_patches
from edgecl.train.models import Params, forward, init_head, init_params, to_numpy
from edgecl.train.protocol import Method, TrainContext, batches, check_resumable, run_epochs, task_generator

# Bytes per entry of P: the float64 matrix itself plus the float32 normalised copy used during a task.
_BYTES_PER_ENTRY = 8 + 4


class RGO(Method):
    name = "rgo"
    Config = RGOConfig
    append_keeps = "heads"  # one shared trunk keeps learning (small, bounded forgetting); old heads never change

    def __init__(self, arch, config=None):
        super().__init__(arch, config)
        self._check_config()
        shapes = param_shapes(arch)
        self.layers = [w.rsplit(".", 1)[0] for w in prunable(arch)]
        self.dims = {}
        for layer in self.layers:
            self.dims[f"{layer}.weight"] = math.prod(shapes[f"{layer}.weight"][1:])
            if f"{layer}.bias" in shapes:
                self.dims[f"{layer}.bias"] = shapes[f"{layer}.bias"][0]
        self._check_memory()
        self.proj = {name: Projector(dim, self.config.alpha) for name, dim in self.dims.items()}
        gen = torch.Generator().manual_seed(self.config.seed)
        self.trunk = init_params(arch, generator=gen)
        self.heads: list[Params] = []
        self.infos: list[TaskInfo] = []
        self.curvature_seconds: list[float] = []
        self.train_seconds: list[float] = []

    # -- configuration checks -------------------------------------------------------------------------------
    def _check_config(self) -> None:
        has_bn = any(node["op"] == "bn" for node in self.arch["nodes"])
        if self.config.fel and (has_bn or not is_sequential(self.arch)):
            raise UsageError(f"rgo: feature encoding layers (fel=true) need a sequential architecture without "
                             f"BatchNorm; {self.arch.get('name')!r} has residual blocks or BatchNorm — use fel=false")

    def projection_bytes(self) -> dict[str, int]:
        """Memory of P per parameter (float64 P + float32 normalised copy), known before anything is allocated."""
        return {name: dim * dim * _BYTES_PER_ENTRY for name, dim in self.dims.items()}

    def _check_memory(self) -> None:
        sizes = self.projection_bytes()
        total = sum(sizes.values())
        if total > self.config.max_projection_bytes:
            largest = max(sizes, key=sizes.get)
            raise UsageError(f"rgo: projection matrices need {total:,} bytes (largest {largest}: "
                             f"{self.dims[largest]}² entries, {sizes[largest]:,} bytes), above "
                             f"max_projection_bytes={self.config.max_projection_bytes:,}; use a narrower "
                             f"architecture or raise the limit")

    # -- the task's virtual structure -----------------------------------------------------------------------
    def task_seed(self, t: int) -> int | None:
        return self.config.fel_seed + t if self.config.fel else None

    def permutations(self, t: int) -> dict[str, torch.Tensor]:
        """Each layer's output permutation for task t (empty without FEL)."""
        seed = self.task_seed(t)
        if seed is None:
            return {}
        shapes = param_shapes(self.arch)
        return {layer: torch.from_numpy(task_permutation(seed, layer, shapes[f"{layer}.weight"][0]))
                for layer in self.layers}

    def effective(self, perms: dict[str, torch.Tensor]) -> Params:
        """Trunk tensors as task t uses them: weight rows and biases permuted (differentiable w.r.t. the shared
        tensors), the same arithmetic `materialize` applies to the stored ones."""
        eff = dict(self.trunk)
        for layer, perm in perms.items():
            for suffix in (".weight", ".bias"):
                if layer + suffix in eff:
                    eff[layer + suffix] = eff[layer + suffix].index_select(0, perm)
        return eff

    def _tap_ids(self, eff: Params) -> dict[int, str]:
        return {id(eff[f"{layer}.weight"]): layer for layer in self.layers}

    # -- Algorithm 1 ----------------------------------------------------------------------------------------
    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        if t != len(self.heads):
            raise UsageError(f"rgo: tasks must be learned in order; expected task {len(self.heads)}, got {t}")
        dev = ctx.device
        gen = task_generator(self.config, t)
        first = t == 0  # BatchNorm (fel=false only) learns on the first task and is frozen after
        self.trunk = {k: v.detach().to(dev).requires_grad_(self._trainable(k, first)) for k, v in self.trunk.items()}
        head = {k: v.to(dev).requires_grad_(True) for k, v in init_head(self.arch, task.n_classes, gen).items()}
        perms = {k: v.to(dev) for k, v in self.permutations(t).items()}
        normalized = {name: p.normalized().to(dev) for name, p in self.proj.items()}
        trainable = [v for v in self.trunk.values() if v.requires_grad] + list(head.values())
        opt = torch.optim.SGD(trainable, lr=self.config.lr)
        start = time.perf_counter()
        weights = {layer: normalized[f"{layer}.weight"] for layer in self.layers}

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            eff = self.effective(perms)
            with LayerTap(self._tap_ids(eff), projections=weights):
                logits = forward(self.arch, {**eff, **head}, x, train=first)
            return F.cross_entropy(logits, y)

        with ctx.bar(self.config.epochs, f"rgo task {t}") as bar:
            run_epochs(task, opt, loss_fn, epochs=self.config.epochs, batch_size=self.config.batch_size,
                       generator=gen, bar=bar, device=dev, after_backward=lambda: self._project_bias_grads(normalized))
        self.train_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        self.update_projections(task, head, perms, dev)
        self.curvature_seconds.append(time.perf_counter() - start)
        self.heads.append({k: v.detach() for k, v in head.items()})
        self.infos.append(TaskInfo(task.name, task.n_classes, self.task_seed(t)))

    def _trainable(self, name: str, first: bool) -> bool:
        if "running" in name:
            return False
        return first or name.rsplit(".", 1)[0] in self.layers

    def _project_bias_grads(self, normalized: dict[str, torch.Tensor]) -> None:
        """Biases are vector parameters with their own P (gradient in the shared tensor's coordinates)."""
        for layer in self.layers:
            b = self.trunk.get(f"{layer}.bias")
            if b is not None and b.grad is not None:
                b.grad = normalized[f"{layer}.bias"] @ b.grad

    def update_projections(self, task: TaskData, head: Params, perms: dict[str, torch.Tensor],
                           dev: str = "cpu") -> None:
        """Algorithm 1 lines 8–12: one pass over the task's training data, recursive update of every P."""
        gen = task_generator(self.config, t=10_000 + len(self.heads))
        for x, y in batches(task, self.config.curvature_batch, gen, dev):
            for name, g in self.curvature_vectors(x, y, head, perms).items():
                self.proj[name].update(g.cpu())

    def curvature_vectors(self, x: torch.Tensor, y: torch.Tensor, head: Params,
                          perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Vectors (rows × dim(P)) of every parameter for the RLS update, in the shared tensors' coordinates: one row
        per sample, one per input patch for conv weights."""
        eff = self.effective(perms)
        calls: dict = {}
        with torch.enable_grad(), LayerTap(self._tap_ids(eff), record=calls):
            logits = forward(self.arch, {**eff, **head}, x, train=False)
        a_y = torch.softmax(logits.detach(), 1).gather(1, y[:, None]).squeeze(1)
        root = torch.sqrt(torch.clamp(a_y * (1 - a_y), min=0.0))  # sqrt of l''_yy (Eq. 31, diagonal at y)
        true_logit = logits.gather(1, y[:, None]).sum()
        deltas = torch.autograd.grad(true_logit, [calls[layer].out for layer in self.layers])
        out: dict[str, torch.Tensor] = {}
        for layer, delta in zip(self.layers, deltas):
            call = calls[layer]
            d = delta.flatten(2).sum(2) if delta.dim() == 4 else delta  # ∂f_y/∂b_eff per sample
            scale = root
            if self.config.weight_vectors == "backprop":
                scale = root * d.pow(2).mean(1).sqrt()
            if len(call.w_shape) == 2:
                out[f"{layer}.weight"] = scale[:, None] * call.x.reshape(len(x), -1)
            else:
                mean = self.config.conv_vectors == "mean"
                rows = conv_patches(call.x, call.w_shape, call.stride, call.padding, mean)
                out[f"{layer}.weight"] = (scale[:, None] * rows.reshape(len(x), -1)).reshape(rows.shape)
            if f"{layer}.bias" in self.proj:
                d_base = torch.empty_like(d)
                d_base[:, perms[layer] if layer in perms else slice(None)] = d  # b_eff[i] = b[perm[i]]
                out[f"{layer}.bias"] = root[:, None] * d_base
        return out

    # -- deployment -----------------------------------------------------------------------------------------
    def pack(self) -> PackedModel:
        shared_kind = {"kind": "shared"}
        params = {k: dict(shared_kind) for k in self.trunk}
        if self.config.fel:
            for layer in self.layers:
                for suffix in (".weight", ".bias"):
                    if layer + suffix in params:
                        params[layer + suffix] = {"kind": "permute", "group": layer}
        params.update({"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}})
        return PackedModel(self.arch, self.name, self.config.to_json(), params, to_numpy(self.trunk),
                           list(self.infos), [to_numpy(h) for h in self.heads], self.extra())

    def training_state(self) -> dict[str, np.ndarray]:
        """The projection matrices P (float64): without them a resumed run would forget the earlier tasks."""
        return {f"P:{name}": p.p.cpu().numpy() for name, p in self.proj.items()}

    def resume(self, packed: PackedModel, state: dict[str, np.ndarray] | None = None) -> None:
        """Continue a deployed RGO model: the shared trunk and heads from the artifact, P from the training state."""
        check_resumable(packed, self.name, self.arch)
        if packed.config.get("fel") != self.config.fel:
            raise UsageError("rgo: the artifact's feature-encoding setting (fel) differs from this config")
        missing = [f"P:{n}" for n in self.dims if not state or f"P:{n}" not in state]
        if missing:
            raise UsageError(f"rgo: resuming needs the training state saved beside the artifact (model.edgecl.state);"
                             f" missing {missing[:3]}")
        for name, dim in self.dims.items():
            p = np.asarray(state[f"P:{name}"], dtype=np.float64)
            if p.shape != (dim, dim) or not np.isfinite(p).all():
                raise UsageError(f"rgo: training state P:{name} has shape {p.shape}, expected ({dim}, {dim})")
            self.proj[name].p = torch.from_numpy(p.copy())
        self.trunk = {k: torch.from_numpy(np.array(packed.base[k], dtype=np.float32)) for k in self.trunk}
        self.heads = [{k: torch.from_numpy(np.array(tt[k])) for k in ("head.weight", "head.bias")}
                      for tt in packed.task_tensors]
        self.infos = list(packed.tasks)

    def extra(self) -> dict:
        sizes = self.projection_bytes()
        return {"fel": self.config.fel, "alpha": self.config.alpha,
                "projection_dims": dict(self.dims), "projection_bytes": sizes,
                "projection_bytes_total": sum(sizes.values()),
                "projection_storage": "float64 P + float32 normalised copy (12 bytes/entry); not in the artifact "
                                      "(saved beside it as training state, for --resume)",
                "projection_trace_scale": {k: p.scale() for k, p in self.proj.items()},
                "train_seconds": list(self.train_seconds), "curvature_seconds": list(self.curvature_seconds)}
