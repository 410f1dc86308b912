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
units: "feature extractors in the same layer share a projection matrix"); a grouped or depthwise conv has one P per
conv group over that group's patches (`rgo_ops`). A bias is a vector parameter with its own P (out × out, Appendix
B.2's "vector" row). All live in the coordinates of the shared stored parameters; with FEL, task k's layer sees its
inputs in task k's permuted order, so the curvature vectors of task k are recorded in exactly the coordinates the
parameter's gradient has during task k. Old tasks' inputs therefore appear randomly permuted to new tasks — the
decorrelation the paper uses FEL for (Section 4.1); P is never re-permuted per task (a depthwise conv's per-channel
Ps follow their channels, whose rows are permuted).

Feature encoding layers. A fixed task-seeded permutation of each channel group (`rgo_fel`: on a chain, each layer's
outputs; on a graph, every layer whose outputs a residual add or gate joins, with their BatchNorm and depthwise
rows), from `edgecl.deltas.task_permutation(seed, group, n)`. Permuting a layer's outputs is the same as permuting
its weight rows and bias, which is how training applies it, so each task trains exactly the weights `materialize`
folds. `fel=False` is the paper's RGO-2 ablation.

BatchNorm (config `batchnorm`, `edgecl.train.batchnorm`). The paper removes it ("its parameters are not updated by
gradient descent"), and so does the default "identity": every BatchNorm layer is held at the identity in training
and in the stored model (a network that carries no signal without it is refused before training). A user's network
may keep it: under "task" each task learns its own affine pair and statistics, in its own channel order; under
"frozen" task 0 learns them and later tasks run them fixed (permuted with their channel group under FEL). Why the
default: `RGOConfig`.

ECA (``channel_conv``): its k weights are per task (k floats per task, each task starting from task 0's), since
they have no rows for an input-side P; the channels it reads keep one order in every task (no FEL: `rgo_fel`). A
``scalar_affine``'s weight and bias (PP-HGNetV2's learnable affine block) likewise: two floats per task.

ViT class tokens and position embeddings: per task too (each task starting from task 0's, in its own channel order):
they are added values, not weights that read an input, so no input-side P can keep an old task's function while a
shared copy moves; a permuted channel group takes their rows as each task's order says, like per-task BatchNorm.
A frozen position embedding is a constant: one copy in the shared trunk (permuted with it), never stepped.

Weight-standardised convs (NF-ResNet's ScaledStdConv2d): weight, bias and gain per task (each task starting from
task 0's, in its own channel order), since the conv's output is not linear in its weight — each filter is
standardised first — so an input-side P cannot keep an old task's outputs while a shared copy moves.

P is training state, not part of the artifact (no per-task tensors besides heads, per-task BatchNorm, layers): `edgecl
train` saves it beside the artifact, and `resume` needs it.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.arch import param_shapes, prunable
from edgecl.arch.spec import frozen_tensors, rowless_tensors, standardized_tensors, token_tensors
from edgecl.arch.channels import ChannelError
from edgecl.deltas import PackedModel, TaskInfo
from edgecl.errors import UsageError
from edgecl.train import distributed
from edgecl.train.batchnorm import BatchNorm, RuledTensors
from edgecl.train.data import TaskData
from edgecl.train.methods.rgo_config import RGOConfig
from edgecl.train.methods.rgo_fel import FELPlan, fel_plan
from edgecl.train.methods.rgo_ops import LayerTap, Projector, conv_patches
from edgecl.train.models import Params, forward, init_head, to_numpy
from edgecl.train.protocol import Method, TrainContext, batches, check_resumable, run_epochs, task_generator

# Bytes per entry of P: the float64 matrix itself plus the float32 normalised copy used during a task.
_BYTES_PER_ENTRY = 8 + 4


class RGO(Method):
    name = "rgo"
    Config = RGOConfig
    has_training_state = True  # P, saved beside the artifact
    append_keeps = "heads"  # one shared trunk keeps learning (small, bounded forgetting); old heads never change

    def __init__(self, arch, config=None, start=None):
        super().__init__(arch, config, start)
        init = self.initial_params(torch.Generator().manual_seed(self.config.seed))
        self.bn = BatchNorm(arch, self.config.batchnorm, init)
        self.tokens = token_tensors(arch)
        self.standardized = standardized_tensors(arch)
        self.fixed = frozen_tensors(arch)  # constants: in the shared trunk (permuted with it), never stepped
        self.fel = self._fel_plan()
        # per task: layers of several blocks (rgo_fel), ECA's k weights and scalar affines (no rows for P or a FEL to
        # act on), class tokens and position embeddings (added values, which no P protects)
        # and weight-standardised convs (their output is not linear in the weight: no input-side P keeps it)
        self.blocks = RuledTensors(self.fel.per_task + rowless_tensors(arch) + self.tokens + self.standardized, "task",
                                   init)
        shapes = param_shapes(arch)
        conv_groups = {n["name"]: n.get("groups", 1) for n in arch["nodes"]}
        self.layers = [w.rsplit(".", 1)[0] for w in prunable(arch) if w not in self.blocks.names]
        self.dims: dict[str, tuple[int, int]] = {}  # parameter → (conv groups, dim of each group's P)
        for layer in self.layers:
            self.dims[f"{layer}.weight"] = (conv_groups[layer], math.prod(shapes[f"{layer}.weight"][1:]))
            if f"{layer}.bias" in shapes:
                self.dims[f"{layer}.bias"] = (1, shapes[f"{layer}.bias"][0])
        self._check_memory()
        self.proj = {name: Projector(dim, self.config.alpha, groups) for name, (groups, dim) in self.dims.items()}
        self.trunk = {k: v for k, v in init.items() if k not in self.bn.names and k not in self.blocks.names}
        self.heads: list[Params] = []
        self.infos: list[TaskInfo] = []
        self.curvature_seconds: list[float] = []
        self.train_seconds: list[float] = []

    # -- configuration checks -------------------------------------------------------------------------------
    def not_learned_hint(self) -> str | None:
        """The default holds BatchNorm at the identity (the paper's rule), under which networks built with BatchNorm
        can train to chance without the signal check catching it (README, support matrix ³)."""
        if self.bn.rule == "identity" and self.bn.names:
            return ("this network has BatchNorm, which RGO holds at the identity by default (batchnorm=identity); "
                    "try --set batchnorm=task")
        return None

    def _fel_plan(self) -> FELPlan:
        if not self.config.fel:
            return FELPlan()
        # per-task BatchNorm follows each task's order by being trained in it; the identity is the same in any order
        per_task = set(self.bn.names) if self.bn.rule in ("task", "identity") else set()
        per_task.update(self.tokens + self.standardized)
        try:
            return fel_plan(self.arch, per_task)
        except ChannelError as exc:
            raise UsageError(f"rgo: feature encoding layers (fel=true) follow channel groups, and {exc}; use "
                             f"fel=false") from None

    def projection_bytes(self) -> dict[str, int]:
        """Memory of P per parameter (float64 P + float32 normalised copy), known before anything is allocated."""
        return {name: groups * dim * dim * _BYTES_PER_ENTRY for name, (groups, dim) in self.dims.items()}

    def _check_memory(self) -> None:
        sizes = self.projection_bytes()
        total = sum(sizes.values())
        if total > self.config.max_projection_bytes:
            largest = max(sizes, key=sizes.get)
            groups, dim = self.dims[largest]
            raise UsageError(f"rgo: projection matrices need {total:,} bytes (largest {largest}: "
                             f"{f'{groups} × ' if groups > 1 else ''}{dim}² entries, {sizes[largest]:,} bytes), above "
                             f"max_projection_bytes={self.config.max_projection_bytes:,}; use a narrower "
                             f"architecture or raise the limit")

    # -- the task's virtual structure -----------------------------------------------------------------------
    def task_seed(self, t: int) -> int | None:
        return self.config.fel_seed + t if self.config.fel else None

    def permutations(self, t: int) -> dict[str, torch.Tensor]:
        """Each FEL channel group's permutation for task t (empty without FEL); on a chain a group is a layer."""
        return self.fel.permutations(self.task_seed(t))

    def effective(self, perms: dict[str, torch.Tensor]) -> Params:
        """Trunk tensors as task t uses them: rows of every tensor in a permuted channel group taken in the task's
        order (differentiable w.r.t. the shared tensors), the same arithmetic `materialize` applies to the stored
        ones."""
        eff = dict(self.trunk)
        for name, order in self.fel.orders(perms).items():
            if name in eff:
                eff[name] = eff[name].index_select(0, order)
        return eff

    def _tap_ids(self, eff: Params) -> dict[int, str]:
        return {id(eff[f"{layer}.weight"]): layer for layer in self.layers}

    def _per_group_orders(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights with one P per conv group whose rows (so groups: a depthwise conv's channels) are permuted."""
        orders = self.fel.orders(perms)
        return {w: orders[w] for w, (groups, _) in self.dims.items() if groups > 1 and w in orders}

    # -- Algorithm 1 ----------------------------------------------------------------------------------------
    def learn_task(self, t: int, task: TaskData, ctx: TrainContext) -> None:
        if t != len(self.heads):
            raise UsageError(f"rgo: tasks must be learned in order; expected task {len(self.heads)}, got {t}")
        dev = ctx.device
        gen = task_generator(self.config, t)
        self.trunk = {k: v.detach().to(dev).requires_grad_(k not in self.fixed) for k, v in self.trunk.items()}
        head = {k: v.to(dev).requires_grad_(True) for k, v in init_head(self.arch, task.n_classes, gen).items()}
        perms = {k: v.to(dev) for k, v in self.permutations(t).items()}
        bn_order = self.fel.orders(perms, follows=True)  # shared or start copies are kept in the trunk's order
        bn = self.bn.start(t, dev, bn_order)
        # what task t keeps for itself (and frozen BatchNorm)
        own = {**self.blocks.start(t, dev, bn_order), **bn, **head}
        normalized = {name: p.normalized().to(dev) for name, p in self.proj.items()}
        steps = [v for v in (*self.trunk.values(), *own.values()) if v.requires_grad]
        opt = torch.optim.SGD(steps, lr=self.config.lr)
        start = time.perf_counter()
        weights = {layer: normalized[f"{layer}.weight"] for layer in self.layers}
        for w, order in self._per_group_orders(perms).items():  # P of the conv group each permuted row now reads
            weights[w.rsplit(".", 1)[0]] = weights[w.rsplit(".", 1)[0]].index_select(0, order)
        batch_stats = self.bn.batch_stats(t)
        if t == 0:
            self.bn.check_signal(self.arch, {**self.effective(perms), **own}, task, "rgo")

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            eff = self.effective(perms)
            with LayerTap(self._tap_ids(eff), projections=weights):
                logits = forward(self.arch, {**eff, **own}, x, train=batch_stats)
            return F.cross_entropy(logits, y)

        with ctx.bar(self.config.epochs, f"rgo task {t}") as bar:
            run_epochs(task, opt, loss_fn, epochs=self.config.epochs, batch_size=self.config.batch_size,
                       generator=gen, bar=bar, device=dev, after_backward=lambda: self._project_bias_grads(normalized))
        self.train_seconds.append(time.perf_counter() - start)
        final = {k: v.detach() for k, v in self.effective(perms).items()}
        self.bn.settle(t, self.arch, {**final, **own}, task, dev)
        self.bn.commit(t, bn, bn_order)
        self.blocks.commit(t, own, bn_order)
        start = time.perf_counter()
        self.update_projections(task, own, perms, dev)
        self.curvature_seconds.append(time.perf_counter() - start)
        self.heads.append({k: v.detach() for k, v in head.items()})
        self.infos.append(TaskInfo(task.name, task.n_classes, self.task_seed(t)))

    def _project_bias_grads(self, normalized: dict[str, torch.Tensor]) -> None:
        """Biases are vector parameters with their own P (gradient in the shared tensor's coordinates)."""
        for layer in self.layers:
            b = self.trunk.get(f"{layer}.bias")
            if b is not None and b.grad is not None:
                b.grad = normalized[f"{layer}.bias"] @ b.grad

    def update_projections(self, task: TaskData, own: Params, perms: dict[str, torch.Tensor],
                           dev: str = "cpu") -> None:
        """Algorithm 1 lines 8–12: one pass over the task's training data, recursive update of every P. `own`: the
        task's head, BatchNorm and per-task layers."""
        if not self.layers:  # every layer is stored per task (FEL on sliced channel groups): nothing is shared
            return
        gen = task_generator(self.config, t=10_000 + len(self.heads))
        for x, y in batches(task, self.config.curvature_batch, gen, dev):
            vectors = distributed.gather_rows(self.curvature_vectors(x, y, own, perms))  # every rank's samples
            for name, g in vectors.items():
                if not bool(torch.isfinite(g).all()):
                    raise UsageError(f"rgo: task {len(self.heads)}'s curvature vectors of {name} are not finite: "
                                     f"training diverged (lower lr={self.config.lr})")
                try:
                    self.proj[name].update(g.cpu())
                except torch.linalg.LinAlgError:  # finite but so large that float64 cannot solve the update
                    raise UsageError(f"rgo: task {len(self.heads)}'s projection update of {name} is singular "
                                     f"(curvature vectors up to {float(g.abs().max()):.3g}): training diverged "
                                     f"(lower lr={self.config.lr})") from None

    def curvature_vectors(self, x: torch.Tensor, y: torch.Tensor, own: Params,
                          perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Vectors (rows × dim(P), or conv groups × rows × dim) of every parameter for the RLS update, in the shared
        tensors' coordinates: one row per sample, one per input patch for conv weights. `own`: the task's head,
        BatchNorm (running statistics) and per-task layers, in the task's channel order."""
        eff = self.effective(perms)
        calls: dict = {}
        with torch.enable_grad(), LayerTap(self._tap_ids(eff), record=calls):
            logits = forward(self.arch, {**eff, **own}, x, train=False)
        a_y = torch.softmax(logits.detach(), 1).gather(1, y[:, None]).squeeze(1)
        root = torch.sqrt(torch.clamp(a_y * (1 - a_y), min=0.0))  # sqrt of l''_yy (Eq. 31, diagonal at y)
        true_logit = logits.gather(1, y[:, None]).sum()
        deltas = torch.autograd.grad(true_logit, [calls[layer].out for layer in self.layers])
        orders = self.fel.orders(perms)
        out: dict[str, torch.Tensor] = {}
        for layer, delta in zip(self.layers, deltas):
            call, weight = calls[layer], f"{layer}.weight"
            d = delta  # ∂f_y/∂b_eff per sample; a windowed conv's output is per window, each sample's in turn
            if delta.dim() == 4:
                d = delta.reshape(len(x), len(delta) // max(len(x), 1), *delta.shape[1:]).sum((1, 3, 4))
            scale = root
            if self.config.weight_vectors == "backprop":
                scale = root * d.pow(2).mean(1).sqrt()
            if len(call.w_shape) == 2:
                out[weight] = scale[:, None] * call.x.flatten(1)
            else:
                rows = conv_patches(call.x, call.w_shape, call.stride, call.padding,
                                    self.config.conv_vectors == "mean", call.dilation, call.groups, len(x))
                rows = rows * scale.repeat_interleave(rows.shape[1] // max(len(x), 1))[None, :, None]  # per sample
                if self.dims[weight][0] > 1 and weight in orders:  # back to the stored channels' Ps
                    rows = rows.index_select(0, torch.argsort(orders[weight]))
                out[weight] = rows
            if f"{layer}.bias" in self.proj:
                d_base = torch.empty_like(d)
                order = orders.get(f"{layer}.bias")
                d_base[:, order if order is not None else slice(None)] = d  # b_eff[i] = b[order[i]]
                out[f"{layer}.bias"] = root[:, None] * d_base
        return out

    # -- deployment -----------------------------------------------------------------------------------------
    def pack(self) -> PackedModel:
        params = {k: {"kind": "shared"} for k in self.trunk}
        params.update({k: {"kind": "permute", "group": g} for k, g in self.fel.tensor_group.items() if k in params})
        params.update(self.bn.specs(self.fel.tensor_group))
        params.update(self.blocks.specs())
        params.update({"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}})
        own = [{**to_numpy(h), **self.bn.task_tensors(t), **self.blocks.task_tensors(t)}
               for t, h in enumerate(self.heads)]
        return PackedModel(self.arch, self.name, self.config.to_json(), params,
                           {**to_numpy(self.trunk), **self.bn.base()}, list(self.infos), own, self.extra())

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
        for name, (groups, dim) in self.dims.items():
            want = (dim, dim) if groups == 1 else (groups, dim, dim)
            self.proj[name].p = torch.from_numpy(_projection(state[f"P:{name}"], name, want))
        self.bn.resume(packed)
        self.config.batchnorm = self.bn.rule
        if self._fel_plan().per_task != self.fel.per_task:  # only if an old artifact's BatchNorm rule moved them
            raise UsageError("cannot resume: the artifact's BatchNorm rule changes which layers RGO stores per task")
        self.blocks.resume(packed)
        self.trunk = {k: torch.from_numpy(np.array(packed.base[k], dtype=np.float32)) for k in self.trunk}
        self.heads = [{k: torch.from_numpy(np.array(tt[k])) for k in ("head.weight", "head.bias")}
                      for tt in packed.task_tensors]
        self.infos = list(packed.tasks)

    def extra(self) -> dict:
        sizes = self.projection_bytes()
        return {"fel": self.config.fel, "alpha": self.config.alpha, "batchnorm": self.bn.rule,
                "fel_groups": dict(self.fel.groups), "fel_skipped": dict(self.fel.skipped),
                "per_task_layers": list(self.fel.per_task),
                "projection_dims": {k: dim if groups == 1 else [groups, dim] for k, (groups, dim) in self.dims.items()},
                "projection_bytes": sizes, "projection_bytes_total": sum(sizes.values()),
                "projection_storage": "float64 P + float32 normalised copy (12 bytes/entry); not in the artifact "
                                      "(saved beside it as training state, for --resume)",
                "projection_trace_scale": {k: p.scale() for k, p in self.proj.items()},
                "train_seconds": list(self.train_seconds), "curvature_seconds": list(self.curvature_seconds)}


def _projection(stored: Any, name: str, want: tuple[int, ...]) -> np.ndarray:
    """A stored projection matrix as a float64 copy, each problem named apart: P is saved as float64 (a float32 copy
    would be a lossy state from elsewhere, an integer one no projection at all), of the layer's shape, and finite."""
    p = np.asarray(stored)
    if p.dtype != np.float64:
        raise UsageError(f"rgo: training state P:{name} has dtype {p.dtype}, expected float64 (as RGO saves it)")
    if p.shape != want:
        raise UsageError(f"rgo: training state P:{name} has shape {p.shape}, expected {want}")
    bad = int(p.size - np.count_nonzero(np.isfinite(p)))
    if bad:
        raise UsageError(f"rgo: training state P:{name} has {bad} NaN/inf values; it is damaged")
    return p.copy()
