"""BatchNorm folded into the convolution before it when a switch writes that convolution's weight: the device path.

Why: a switched weight is a graph input, so ONNX Runtime cannot fold the BatchNorm after it into the weight as it
does for a constant one; the CUDA EP then runs every BatchNorm as its own kernel over the activations. On an H200
resnet18's session alone was 1.08× a dense one at batch 64 (tools/results/gpu_check_nvidia_h200.json). Since the
switch writes the weight anyway, it can write it folded: W' = W · s per output channel, s = γ / √(σ² + ε), and the
conv reads a per-task bias b' = (b − μ) · s + β (b = 0 without a bias). The graph then holds a conv with a bias where
it held conv → BatchNorm, as a folded per-task session does after ONNX Runtime's own fusion.

Which pairs: a conv whose weight a switch writes (`TensorPlan.varies`), not weight-standardised (that rewrite has its
own pass, `skip`), read by one BatchNorm only and not the network's output. Each task's s and b' are computed once
here, in float32 (`bn_fold`, from the BatchNorm's and bias's values for that task, whatever their plans);
the weight plan carries s (`TensorPlan.row_scale`) for the device program to apply as it writes, and b' becomes the
conv's bias, an ``own`` plan. The BatchNorm's four tensors are no longer read, nor kept.
"""
from __future__ import annotations

import numpy as np

from edgecl.arch.op_rules import is_standardized
from edgecl.arch.spec import BN_TENSORS, Arch, consumers, node_by_name
from edgecl.runtime.plan import TensorPlan


class FoldedBN:
    """The conv → BatchNorm pairs of `arch` folded at a switch (`pairs`: conv → BatchNorm node), the spec the graph
    is built from (`arch`), and the plans with the scales and folded biases in place (`plans`)."""

    def __init__(self, arch: Arch, plans: list[TensorPlan], n_tasks: int, skip: set[str] = frozenset()):
        by_name = {p.name: p for p in plans}
        bn_of = batchnorm_after(arch)
        self.pairs: dict[str, dict] = {}
        folded: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}  # conv → (scales, biases) per task
        for conv in arch["nodes"]:
            name, weight = conv["name"], by_name.get(f"{conv['name']}.weight")
            bn = bn_of.get(name)
            if bn is None or weight is None or not weight.varies or is_standardized(conv) or name in skip:
                continue
            values = [_task_values(by_name.get(f"{bn['name']}.{k}"), n_tasks) for k in BN_TENSORS]
            bias = _task_values(by_name.get(f"{name}.bias"), n_tasks) if conv["bias"] else [None] * n_tasks
            if any(v is None for v in values) or bias is None:
                continue
            self.pairs[name] = bn
            folded[name] = _fold(*values, bias, bn["eps"])
        self.unread = {f"{bn['name']}.{k}" for bn in self.pairs.values() for k in BN_TENSORS} | \
            {f"{name}.bias" for name in self.pairs}
        self.arch = _folded_arch(arch, self.pairs)
        self.plans = []
        for p in plans:
            if p.name in self.unread:
                continue
            layer = p.name.rpartition(".")[0]
            if p.name == f"{layer}.weight" and layer in folded:
                p = TensorPlan(p.name, p.plan, p.shape, p.base, p.per_task, p.reader, p.task_shapes,
                               row_scale=folded[layer][0])
            self.plans.append(p)
        for name, (_, biases) in folded.items():
            self.plans.append(TensorPlan(f"{name}.bias", "own", biases[0].shape, None, biases))

    def fold(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`params` (a task's `materialize`) folded as the session reads them: what `bound_tensors` is compared with
        (equal as numbers; a weight the switch does not keep is +0.0 there, ±0.0 here)."""
        out = {k: v for k, v in params.items() if k not in self.unread}
        for name, bn in self.pairs.items():
            values = [[params[f"{bn['name']}.{k}"]] for k in BN_TENSORS]
            (scale,), (bias,) = _fold(*values, [params.get(f"{name}.bias")], bn["eps"])
            out[f"{name}.weight"] = scaled_rows(params[f"{name}.weight"], scale)
            out[f"{name}.bias"] = bias
        return out


def scaled_rows(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`weight` with output channel (row) o multiplied by scale[o], in float32: what the device program and the
    blocked layout's fold write."""
    return (weight.reshape(weight.shape[0], -1) * scale.reshape(-1, 1)).reshape(weight.shape).astype(np.float32)


def batchnorm_after(arch: Arch) -> dict[str, dict]:
    """Conv name → the BatchNorm node that alone reads it (a conv that is the network's output has none): the pairs
    a switch-time fold may merge, here and in `blocked_convs`."""
    nodes, readers = node_by_name(arch), consumers(arch)
    return {node["name"]: nodes[readers[node["name"]][0]] for node in arch["nodes"]
            if node["op"] == "conv" and node["name"] != arch.get("output") and len(readers[node["name"]]) == 1
            and nodes[readers[node["name"]][0]]["op"] == "bn"}


def bn_fold(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
            bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias') of a BatchNorm folded into the convolution before it, in float32 as ONNX Runtime's
    ConvBnFusion computes them: scale = γ/√(var+ε), bias' = (b − mean)·scale + β, or β − mean·scale. The one place
    both switch-time folds (this device path's and `blocked_convs`' on the CPU) take it from."""
    f = np.float32
    scale = (gamma.astype(f) / np.sqrt(var.astype(f) + f(eps))).astype(f)
    fused = (bias.astype(f) - mean.astype(f)) * scale + beta.astype(f) if bias is not None else \
        beta.astype(f) - mean.astype(f) * scale
    return scale, fused.astype(f)


def _fold(gamma: list, beta: list, mean: list, var: list, bias: list, eps: float
          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per task: `bn_fold`'s scale and bias'."""
    folded = [bn_fold(*(np.asarray(a).reshape(-1) for a in (g, b, m, v)), eps,
                      None if cb is None else np.asarray(cb).reshape(-1))
              for g, b, m, v, cb in zip(gamma, beta, mean, var, bias)]
    return [s for s, _ in folded], [b for _, b in folded]


def _task_values(plan: TensorPlan | None, n_tasks: int) -> list[np.ndarray] | None:
    """Each task's value of a tensor, computed once here (a switched one is written into a new array)."""
    return None if plan is None else [plan.value(t) for t in range(n_tasks)]


def _folded_arch(arch: Arch, pairs: dict[str, dict]) -> Arch:
    """`arch` with each folded BatchNorm removed, its conv given a bias, and its readers reading the conv."""
    if not pairs:
        return arch
    rename = {bn["name"]: conv for conv, bn in pairs.items()}
    nodes = []
    for node in arch["nodes"]:
        if node["name"] in rename:
            continue
        node = {**node, "inputs": [rename.get(s, s) for s in node["inputs"]]}
        if node["name"] in pairs:
            node["bias"] = True
        nodes.append(node)
    return {**arch, "nodes": nodes, "output": rename.get(arch["output"], arch["output"])}
