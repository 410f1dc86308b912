"""How a switch writes the convolutions `edgecl.runtime.blocked_convs` accepted: straight into ONNX Runtime's blocked
layout, with the task's BatchNorm folded in, so the switch stays about a copy.

- masked (LPS, node masks on unfactored convs): the base and each task's keep bits are reordered into blocked order
  once at load (padding: keep 0), so the compiled masked fill writes the blocked buffer directly. A BatchNorm scale
  that is the same for every task is folded into that base; a per-task one multiplies the buffer after the fill,
  in the same compiled pass (`maskfill.masked_scale`: the output channel of a blocked element is known from its
  index), so a switch still reads and writes the weight once.
- permute, generic (low rank): written as today into a scratch logical tensor, then gathered into blocked order
  through an index made once at load, then scaled.
- the fused bias (b − mean)·scale + β, padded, is computed once per task at load: an ``own`` plan, bound per task.
The BatchNorm's own tensors and the conv's bias are then no longer read: their plans are dropped.
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgecl.runtime.blocked_convs import Blocked, BlockedConv, pad_to, reorder, reorder_index
from edgecl.runtime.fold_bn import scaled_rows
from edgecl.runtime.maskfill import masked_scale
from edgecl.runtime.plan import TensorPlan, in_ranges


@dataclass
class BlockedPlan(TensorPlan):
    """A switched convolution weight kept in blocked order (see the module docstring)."""

    logical: TensorPlan | None = None  # permute/generic: the plan that writes the logical weight
    index: np.ndarray | None = None  # blocked element → logical element (the logical size: a padding zero)
    scales: list | None = None  # per task, (O_pad,) float32: the BatchNorm scale to apply after the fill
    block: int = 0
    conv: str = ""

    def task_arrays(self) -> Iterator[np.ndarray]:
        yield from super().task_arrays()
        if self.index is not None:
            yield self.index
        seen = set()
        for s in self.scales or ():
            if id(s) not in seen:
                seen.add(id(s))
                yield s

    def fill(self, t: int, out: np.ndarray, pool: Executor | None = None, workers: int = 1) -> None:
        if self.logical is None and self.scales is not None:  # masked and scaled in one compiled pass
            base, bits, scale, flat = self.base.reshape(-1), self.per_task[t], self.scales[t], out.reshape(-1)
            in_ranges(lambda lo, hi: masked_scale(base, bits, scale, flat, self.block, lo, hi), base.size,
                      pool if self.splits else None, workers)
            return
        if self.logical is None:
            super().fill(t, out, pool, workers)
            return
        scratch = np.empty(int(np.prod(self.logical.shape)) + 1, np.float32)
        scratch[-1] = 0
        self.logical.fill(t, scratch[:-1].reshape(self.logical.shape))
        np.take(scratch, self.index, out=out.reshape(-1))
        if self.scales is not None:
            o = self.shape[0]
            view = out.reshape(o // self.block, -1, self.block)
            view *= self.scales[t].reshape(o // self.block, 1, self.block)


def _same(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`arrays`, with every one equal to the first replaced by the first (held once)."""
    return [a if not np.array_equal(a, arrays[0]) else arrays[0] for a in arrays]


def _reordered_bits(bits: np.ndarray, shape: tuple[int, ...], block: int, layout: str) -> np.ndarray:
    keep = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape)
    return np.packbits(reorder(keep, block, layout).reshape(-1))


def _conv_plans(bc: BlockedConv, by_name: dict[str, TensorPlan], n_tasks: int) -> list[TensorPlan]:
    """The blocked weight plan and the fused-bias plan of one accepted convolution."""
    c, weight = bc.cand, by_name[bc.cand.weight]
    vectors = [c.vectors({n: by_name[n].value(t) for n in c.tensors if n != c.weight}, bc.fold)
               for t in range(n_tasks)]
    biases = [b for b, _ in vectors]
    scales = _same([pad_to(s, bc.shape[0]) for _, s in vectors])
    varies = any(s is not scales[0] for s in scales)
    plans: list[TensorPlan] = []
    common = dict(block=bc.block, conv=c.conv)
    if weight.plan == "masked":
        base = weight.base if varies or not bc.fold else scaled_rows(weight.base, scales[0][:weight.shape[0]])
        bits = [_reordered_bits(b, weight.shape, bc.block, bc.layout) for b in weight.per_task]
        plans.append(BlockedPlan(bc.w_input, "masked", bc.shape, reorder(base, bc.block, bc.layout), bits,
                                 scales=scales if varies else None, **common))
    else:
        plans.append(BlockedPlan(bc.w_input, weight.plan, bc.shape, weight.base, weight.per_task, logical=weight,
                                 index=reorder_index(weight.shape, bc.block, bc.layout),
                                 scales=scales if bc.fold else None, **common))
    if bc.b_input is not None:
        padded = _same([pad_to(b, bc.shape[0]) for b in biases])
        plans.append(TensorPlan(bc.b_input, "own", (bc.shape[0],), None, padded))
    return plans


def blocked_plans(blocked: Blocked, plans: list[TensorPlan], n_tasks: int,
                  keep: frozenset[str] | set[str] = frozenset()) -> list[TensorPlan]:
    """`plans` for the blocked graph: accepted convolutions' weights blocked, their fused biases per task, the
    tensors folded into them dropped, and the constants those of the derived graph (ONNX Runtime's reordered
    copies of shared weights replace the originals: held once) — except `keep`, constants the graph does not read
    but a switch does (a standardised conv's shared gain, `switch_standardize`)."""
    by_name = {p.name: p for p in plans}
    folded = {n for bc in blocked.convs.values() for n in bc.cand.tensors}
    out = [p for p in plans if p.name not in folded and (not p.constant or p.name in keep)]
    out += [TensorPlan(name, "const", a.shape, a) for name, a in blocked.constants.items()]
    for bc in blocked.convs.values():
        out += _conv_plans(bc, by_name, n_tasks)
    return out
