"""The device-resident switch: the model's switched base tensors and every task's compact delta live in device memory
once, and a switch writes a task's weights into a slot's buffer *on the device* — never a copy from the host.

One program per tensor, written against the array namespace of `edgecl.runtime.device_arrays` (CuPy on a GPU,
numpy on the CPU, where CI checks it bit for bit against `deltas.materialize`):

==========  =====================================  ================================================================
plan        resident on the device                  a switch (task t)
==========  =====================================  ================================================================
masked      every masked base in one flat buffer;   one launch of the masked-select kernel over all of them
            per task one flat buffer of keep bits   (`device_kernel`): where(bit, base, +0.0) on the bit patterns;
            (and of BatchNorm scales, `fold_bn`)    weights a BatchNorm is folded into: one launch of the scaled
                                                    select over all of those, base · scale of the row
permute     base; per task its int64 permutation    ``take(base, perm, axis=0, out=slot view)`` (none: a copy)
generic     base; per task r, s, U, V as stored     ``deltas.lowrank_weight(..., xp=)``: the same operations
            (both: a folded BatchNorm's scales)     then each row times its scale, in place
static      the shared tensor                       nothing: bound once
own         per task its array (heads, vectors of   nothing: rebound (with ``own_in_slot``, for CUDA graphs whose
            factored layers)                        addresses must not change: copied into the slot)
==========  =====================================  ================================================================

A slot is one buffer; every tensor in it starts on a 256-byte boundary (`ALIGN`), so masked tensors, padded with
zero bits, form one contiguous range the kernel covers in a single launch (ResNet-18 has 21 masked tensors: 21
launches from Python would cost more than writing its 44 MB on an H200). Constants of factored layers are not here:
they are initializers of the session (`edgecl.runtime.inplace`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgecl.deltas import lowrank_weight
from edgecl.errors import UsageError
from edgecl.runtime.plan import TensorPlan

ALIGN = 64  # elements: 256 bytes, the alignment cuBLAS/cuDNN prefer, and a whole byte of keep bits
LOWRANK_PARTS = ("r", "s", "u", "v")


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Segment:
    """One tensor's place in a slot: 32-bit words [offset, offset + size); `shapes[t]` its shape for task t, of
    `dtype` (an int64 permutation takes two words per index)."""

    name: str
    offset: int
    size: int
    shapes: list[tuple[int, ...]]
    dtype: Any = np.float32

    @property
    def per_task_shape(self) -> bool:
        """True when the shape changes with the task (heads copied into the slot): bound anew on a task change."""
        return len(set(self.shapes)) > 1


class DeviceProgram:
    """Uploads what switching `plans` needs through `arrays`, reserving it first with ``reserve(item, nbytes)`` (a
    ledger's: refused before anything is allocated), and writes task t's weights into a slot with `fill`."""

    def __init__(self, plans: list[TensorPlan], arrays: Any, reserve: Callable[[str, int], None], n_tasks: int,
                 *, own_in_slot: bool = False):
        self.arrays, self.n_tasks, self.own_in_slot = arrays, n_tasks, own_in_slot
        unknown = [p.name for p in plans if p.plan not in ("masked", "permute", "generic", "static", "own", "const")]
        if unknown:
            raise UsageError(f"no device program for tensors {unknown}")
        # plain masked tensors, then those a BatchNorm is folded into: two kernel ranges
        masked = sorted((p for p in plans if p.plan == "masked"), key=lambda p: p.row_scale is not None)
        scaled = [p for p in masked if p.row_scale is not None]
        other = [p for p in plans if p.plan in ("permute", "generic")]
        own = [p for p in plans if p.plan == "own"]
        static = [p for p in plans if p.plan == "static"]
        pieces = {p.name: [_lowrank_pieces(p, t) for t in range(n_tasks)] for p in other if p.plan == "generic"}
        # the layout: masked tensors first (one kernel range), then the others, then own tensors copied per task
        self.segments: list[Segment] = []
        offset = 0
        for p in masked + other + (own if own_in_slot else []):
            shapes = [tuple(p.per_task[t].shape) for t in range(n_tasks)] if p.plan == "own" else [p.shape] * n_tasks
            dtype = p.per_task[0].dtype if p.plan == "own" else np.dtype(np.float32)
            size = max(int(np.prod(s)) for s in shapes) * dtype.itemsize // 4
            self.segments.append(Segment(p.name, offset, size, shapes, dtype))
            offset += aligned(size)
        self.masked_elements = sum(aligned(int(np.prod(p.shape))) for p in masked)
        self.plain_elements = self.masked_elements - sum(aligned(int(np.prod(p.shape))) for p in scaled)
        self.slot_elements = offset
        # the scaled kernel's table (first element, rows, row length, first scale) and each task's scales
        firsts = np.cumsum([0] + [p.shape[0] for p in scaled])
        self._table = np.array([[seg.offset, p.shape[0], seg.size // p.shape[0], first] for seg, p, first
                                in zip(self.segments[len(masked) - len(scaled):], scaled, firsts)], np.uint64)
        if len(scaled) > 65_535:  # the kernel's grid has one row of blocks per tensor
            raise UsageError(f"{len(scaled)} convolutions with a folded BatchNorm: at most 65535")
        row_scaled = [p for p in masked + other if p.row_scale is not None]
        # what stays on the device, reserved before a byte is uploaded
        shared = 4 * self.masked_elements + sum(p.base.nbytes for p in other + static) + self._table.nbytes
        per_task = [self.masked_elements // 8 + sum(p.per_task[t].nbytes for p in own)
                    + sum(p.per_task[t].nbytes for p in other if p.plan == "permute" and p.per_task[t] is not None)
                    + sum(a.nbytes for per in pieces.values() for a in per[t].values())
                    + sum(p.row_scale[t].nbytes for p in row_scaled)
                    for t in range(n_tasks)]
        reserve("device base weights", shared)
        reserve("device task deltas", sum(per_task))
        self.shared_bytes, self.task_bytes = shared, sum(per_task)
        self._upload(masked, other, own, static, pieces)
        self._upload_scales(scaled)

    # ----------------------------------------------------------------- upload
    def _upload(self, masked: list[TensorPlan], other: list[TensorPlan], own: list[TensorPlan],
                static: list[TensorPlan], pieces: dict[str, list[dict[str, np.ndarray]]]) -> None:
        up = self.arrays.upload
        self._masked_base = self._bits = None
        if masked:
            flat = np.zeros(self.masked_elements, np.float32)  # padding: base +0.0 and bits 0, so the kernel writes 0
            for seg, p in zip(self.segments, masked):
                flat[seg.offset:seg.offset + seg.size] = p.base.reshape(-1)
            self._masked_base = up(flat)
            del flat
            self._bits = []
            for t in range(self.n_tasks):
                bits = np.zeros(self.masked_elements // 8, np.uint8)
                for seg, p in zip(self.segments, masked):
                    bits[seg.offset // 8:seg.offset // 8 + p.per_task[t].size] = p.per_task[t]
                self._bits.append(up(bits))
        self._writers: list[tuple[Segment, Callable[[int, Any], None]]] = []
        for seg, p in zip(self.segments[len(masked):], other):
            base = up(p.base)
            if p.plan == "permute":
                perms = [None if perm is None else up(np.ascontiguousarray(perm, np.int64)) for perm in p.per_task]
                write = self._permute(base, perms)
            else:
                parts = [{k: up(a) for k, a in task.items()} for task in pieces[p.name]]
                write = self._lowrank(base, parts)
            if p.row_scale is not None:
                write = self._scaled(write, [up(a) for a in p.row_scale])
            self._writers.append((seg, write))
        self._static = {p.name: up(p.base) for p in static}
        self._own = [{p.name: up(p.per_task[t]) for p in own} for t in range(self.n_tasks)]
        if self.own_in_slot:
            for seg in self.segments[len(masked) + len(other):]:
                self._writers.append((seg, self._copy_own(seg.name)))

    def _permute(self, base: Any, perms: list[Any]) -> Callable[[int, Any], None]:
        xp = self.arrays.xp

        def write(t: int, out: Any) -> None:
            xp.copyto(out, base) if perms[t] is None else xp.take(base, perms[t], axis=0, out=out)
        return write

    def _lowrank(self, base: Any, parts: list[dict[str, Any]]) -> Callable[[int, Any], None]:
        xp = self.arrays.xp

        def write(t: int, out: Any) -> None:
            lowrank_weight(base, *(parts[t].get(k) for k in LOWRANK_PARTS), out=out, xp=xp)
        return write

    def _upload_scales(self, scaled: list[TensorPlan]) -> None:
        """The scaled kernel's table and, per task, every scaled tensor's row scales in one buffer."""
        self._scales = self._table_on_device = None
        self._max_rows = max((p.shape[0] for p in scaled), default=0)
        if scaled:
            self._table_on_device = self.arrays.upload(self._table)
            self._scales = [self.arrays.upload(np.concatenate([p.row_scale[t] for p in scaled]).astype(np.float32))
                            for t in range(self.n_tasks)]

    @staticmethod
    def _scaled(write: Callable[[int, Any], None], scales: list[Any]) -> Callable[[int, Any], None]:
        """`write`, then each output row times task t's scale (a folded BatchNorm), in place."""
        def scaled_write(t: int, out: Any) -> None:
            write(t, out)
            rows = out.reshape(out.shape[0], -1)
            rows *= scales[t].reshape(-1, 1)
        return scaled_write

    def _copy_own(self, name: str) -> Callable[[int, Any], None]:
        xp = self.arrays.xp

        def write(t: int, out: Any) -> None:
            xp.copyto(out, self._own[t][name])
        return write

    # ----------------------------------------------------------------- switching
    def new_slot(self) -> Any:
        """A slot's buffer (zeros: padding between tensors stays +0.0)."""
        return self.arrays.zeros(max(1, self.slot_elements))

    def fill(self, t: int, slot: Any, sync: bool = True) -> None:
        """Write task t's switched tensors into `slot`, on the device; returns once they are written (`sync`
        false: once queued, for a caller that writes more into the slot and then waits)."""
        if self.plain_elements:
            plain = self.plain_elements
            self.arrays.masked_select(self._masked_base[:plain], self._bits[t][:plain // 8], slot[:plain])
        if self._scales is not None:
            self.arrays.masked_scale(self._masked_base, self._bits[t], self._scales[t], slot, self._table_on_device,
                                     self._max_rows)
        for seg, write in self._writers:
            write(t, self._view(slot, seg, t))
        if sync:
            self.arrays.synchronize()

    def _view(self, slot: Any, seg: Segment, t: int) -> Any:
        shape, itemsize = seg.shapes[t], np.dtype(seg.dtype).itemsize
        words = slot[seg.offset:seg.offset + int(np.prod(shape)) * itemsize // 4]
        return (words if itemsize == 4 and seg.dtype == np.float32 else words.view(seg.dtype)).reshape(shape)

    def slot_tensors(self, slot: Any) -> dict[str, Any]:
        """The tensors whose place and shape never change with the task: static ones and the slot's switched ones."""
        out = dict(self._static)
        for seg in self.segments:
            if not seg.per_task_shape:
                out[seg.name] = self._view(slot, seg, 0)
        return out

    def task_tensors(self, slot: Any, t: int) -> dict[str, Any]:
        """The tensors bound anew when the task changes: task t's own arrays (or, in the slot, their views shaped
        for task t)."""
        if not self.own_in_slot:
            return dict(self._own[t])
        return {seg.name: self._view(slot, seg, t) for seg in self.segments if seg.per_task_shape}

    def tensors(self, slot: Any, t: int) -> dict[str, Any]:
        """Every tensor the session reads for task t once `slot` holds it (tests compare them with `materialize`)."""
        return {**self.slot_tensors(slot), **self.task_tensors(slot, t)}


def _lowrank_pieces(p: TensorPlan, t: int) -> dict[str, np.ndarray]:
    """Task t's stored low-rank pieces of a generic plan's tensor (what `materialize_param` reads), float32."""
    view = p.per_task[t]
    kind = view.params[p.name]["kind"]
    if kind != "lowrank":
        raise UsageError(f"tensor {p.name!r}: no device program for delta kind {kind!r}")
    tt = view.task_tensors[0]
    return {k: np.ascontiguousarray(tt[f"{p.name}:{k}"], dtype=np.float32)
            for k in LOWRANK_PARTS if f"{p.name}:{k}" in tt}
