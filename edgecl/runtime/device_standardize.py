"""Weight-standardised convs (NF-ResNet, BiT) standardised on the device path when a switch writes them, as the host
path does (`edgecl.runtime.switch_standardize`): the session's graph then holds plain convs, where before it
recomputed every filter's mean and variance on every call (nf_resnet26 on the CPU: 4.5× a call, tools/bench_std_conv.py).

`SwitchStandardized` decides which convs and does the arithmetic (`graph.standardize.standardized` with the backend's
``xp``: numpy on the CPU twin, CuPy on a GPU); this module gives it a device slot's tensors after
`DeviceProgram.fill`, in place in the slot — a CUDA graph's addresses stay fixed — and its gains where they live:
the slot (switched or copied per task), the program's static or per-task arrays, or, for a gain that is a constant of
the session (shared, factored), a device copy made here. What this adds on the device is charged before it is
allocated: those gains, and the float64 temporaries of the largest chunk (`graph.standardize.scratch_bytes`) —
once: slots filled at the same time (the slot cache fills outside its lock) take turns here."""
from __future__ import annotations

import threading
from typing import Any, Callable

from edgecl.graph.standardize import scratch_bytes
from edgecl.runtime.plan import TensorPlan
from edgecl.runtime.switch_standardize import SwitchStandardized


class DeviceStandardized:
    """The written standardised convs of `std` (`std.written`), standardised in a device slot after each fill."""

    def __init__(self, std: SwitchStandardized, plans: list[TensorPlan], arrays: Any,
                 reserve: Callable[[str, int], None]):
        self.std, self.arrays = std, arrays
        by_name = {p.name: p for p in plans}
        const = [by_name[f"{name}.gain"] for name in std.written
                 if f"{name}.gain" in std.gains and by_name[f"{name}.gain"].constant]
        scratch = scratch_bytes([by_name[f"{name}.weight"].shape for name in std.written])
        if const:
            reserve("device standardised-conv gains", sum(p.base.nbytes for p in const))
        if scratch:
            reserve("device standardisation scratch", scratch)
        self._const = {p.name: arrays.upload(p.base) for p in const}
        self._lock = threading.Lock()  # one standardisation's scratch at a time, as charged

    @property
    def active(self) -> bool:
        """Whether a fill writes any standardised conv."""
        return bool(self.std.written)

    def after_fill(self, tensors: dict[str, Any]) -> None:
        """Standardise the written convs among a filled slot's `tensors` (`DeviceProgram.tensors`) in place; returns
        once written, its temporaries freed before another slot's standardisation starts."""
        with self._lock:
            self.std.after_fill(tensors, lambda gain: tensors[gain] if gain in tensors else self._const[gain],
                                self.arrays.xp)
            self.arrays.synchronize()

    def bound(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """`tensors` without those the graph no longer reads (the gains standardised here)."""
        return {name: a for name, a in tensors.items() if name not in self.std.unread}
