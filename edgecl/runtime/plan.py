"""How each tensor of the switchable graph gets a task's values, chosen from its delta kind so a switch touches as few
bytes as possible. `edgecl.deltas` stays the one place the arithmetic is defined: the plans call its helpers once
per task at load (to get keep masks and permutations) and reproduce `materialize` bit for bit (tested).

=========  ==========================================  ==================================================
plan       kinds                                       at a switch
=========  ==========================================  ==================================================
static     shared                                      nothing: bound once to the base tensor
own        task (heads, STL trunks, per-task biases)   nothing copied: the task's own array is bound
masked     lps, node                                   where(keep_t, base, 0), keep_t stored at 1 bit/weight
permute    permute                                     np.take of the base rows into the buffer
generic    lowrank (and anything else)                 `materialize_param`, then one copy into the buffer
=========  ==========================================  ==================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgecl.arch import param_shapes
from edgecl.deltas import PackedModel, lps_keep, materialize_param, node_factor, task_permutation
from edgecl.export.onnx_graph import tensor_names

CHUNK = 1 << 18  # elements per masked chunk: the unpacked mask stays in L2 while base and buffer stream through


@dataclass
class TensorPlan:
    name: str
    plan: str
    shape: tuple[int, ...]
    base: np.ndarray | None = None
    per_task: list = field(default_factory=list)  # own: arrays; masked: packed bits; permute: indices or None

    @property
    def varies(self) -> bool:
        """True when a task switch must write this tensor into a buffer."""
        return self.plan in ("masked", "permute", "generic")

    @property
    def nbytes_per_task(self) -> int:
        return sum(a.nbytes for a in self.per_task if a is not None)

    def fill(self, packed: PackedModel, t: int, out: np.ndarray) -> None:
        """Write task t's values of this tensor into `out` (a float32 buffer of `shape`)."""
        if self.plan == "masked":
            _masked_copy(self.base.reshape(-1), self.per_task[t], out.reshape(-1))
        elif self.plan == "permute":
            perm = self.per_task[t]
            np.copyto(out, self.base) if perm is None else np.take(self.base, perm, axis=0, out=out)
        else:
            np.copyto(out, materialize_param(packed, t, self.name))


def _masked_copy(base: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
    """out = where(unpack(bits), base, +0.0), as `deltas.materialize` defines it, bit for bit: the float's bits as an
    int32 times 0 or 1, in chunks so the unpacked mask never exists in full (a float product would give -0.0 and
    inf·0 = NaN where `materialize` gives +0.0)."""
    n = base.size
    base_bits, out_bits = base.view(np.int32), out.view(np.int32)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        keep = np.unpackbits(bits[start // 8:(stop + 7) // 8], count=stop - start)
        np.multiply(base_bits[start:stop], keep, out=out_bits[start:stop])


def _float32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def build_plans(packed: PackedModel) -> list[TensorPlan]:
    """One plan per graph tensor, in `tensor_names` order."""
    shapes = param_shapes(packed.arch, 1)
    plans = []
    for name in tensor_names(packed.arch):
        spec = packed.params[name]
        kind = spec["kind"]
        shape = tuple(packed.base[name].shape) if name in packed.base else shapes[name]
        if kind == "shared":
            plans.append(TensorPlan(name, "static", shape, _float32(packed.base[name])))
        elif kind == "task":
            own = [_float32(tt[name]) for tt in packed.task_tensors]
            plans.append(TensorPlan(name, "own", own[0].shape if own else shape, None, own))
        elif kind in ("lps", "node"):
            base = _float32(packed.base[name])
            bits = [np.packbits(_keep(packed, t, name, spec, base.shape).reshape(-1)) for t in range(packed.n_tasks)]
            plans.append(TensorPlan(name, "masked", shape, base, bits))
        elif kind == "permute":
            perms = [None if info.seed is None else task_permutation(info.seed, spec["group"], shape[0])
                     for info in packed.tasks]
            plans.append(TensorPlan(name, "permute", shape, _float32(packed.base[name]), perms))
        else:
            plans.append(TensorPlan(name, "generic", shape))
    return plans


def _keep(packed: PackedModel, t: int, name: str, spec: dict, shape: tuple[int, ...]) -> np.ndarray:
    if spec["kind"] == "lps":
        return lps_keep(packed, t, name)
    return np.broadcast_to(node_factor(packed, t, spec, shape), shape)
