"""The in-place strategy's device path (``device="cuda"``, or numpy as the device for tests): slots in device memory,
written by a `DeviceProgram` on the device, bound to ONNX Runtime's IOBinding by device pointer — one buffer per
slot, each tensor a view of it (ONNX Runtime reads the weights where CuPy wrote them: no OrtValue copies).

A weight-standardised conv's weight written by a switch is standardised in the slot right after the fill
(`device_standardize`), so the session's graph holds a plain conv and reads no gain.

Inference takes a host batch (ONNX Runtime copies it to the device) or an array already on the device (bound as
is), and leaves the logits in a device array the caller may keep there.

CUDA graphs (``cuda_graph=True``): ONNX Runtime captures a graph per ``gpu_graph_id`` once and then replays it,
which needs every bound address and shape to stay fixed. The switching design keeps them: a switch rewrites a slot
in place, and per-task tensors are copied into the slot (`DeviceProgram(own_in_slot=True)`) instead of rebound. Each
(slot, batch, per-task shapes) gets its own graph with fixed input and output buffers; replays are serialised (they
share those buffers). On the CPU twin the same bookkeeping runs without a capture.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edgecl.graph.builder import INPUT, OUTPUT
from edgecl.runtime.budget import Ledger
from edgecl.runtime.device_arrays import backend_for
from edgecl.runtime.device_fill import DeviceProgram
from edgecl.runtime.device_standardize import DeviceStandardized
from edgecl.runtime.plan import TensorPlan
from edgecl.runtime.switch_standardize import SwitchStandardized


@dataclass
class _Graph:
    """One captured CUDA graph: its binding, fixed input/output buffers and run options."""

    io: ort.IOBinding
    x: Any
    out: Any
    options: ort.RunOptions


class DeviceStore:
    """Task deltas and slots in device memory (reserved in `device_ledger` before they are allocated)."""

    def __init__(self, plans: list[TensorPlan], device: str, device_ledger: Ledger, n_tasks: int,
                 cuda_graph: bool, activation_bytes: Any, std: SwitchStandardized):
        self.arrays = backend_for(device)
        self.ledger, self.cuda_graph = device_ledger, cuda_graph
        self.program = DeviceProgram(plans, self.arrays, device_ledger.reserve, n_tasks, own_in_slot=cuda_graph)
        self._std = DeviceStandardized(std, plans, self.arrays, device_ledger.reserve)
        self.slot_bytes = 4 * self.program.slot_elements
        self.task_bytes = self.program.task_bytes
        self._activation_bytes = activation_bytes  # batch → bytes of a run's activations (a graph keeps its own)
        self._graphs: dict[tuple, _Graph] = {}
        self._graph_of: dict[tuple[int, int, int], _Graph] = {}  # (slot, batch, task) → its graph, found once
        self._graph_lock = threading.Lock()

    def new_slot(self, index: int) -> Any:
        self.ledger.reserve(f"device cache slot {index}", self.slot_bytes)
        return self.program.new_slot()

    def fill(self, buffers: Any, t: int) -> None:
        """Write task t's tensors into a slot, standardised convs standardised there; returns once written."""
        self.program.fill(t, buffers, sync=not self._std.active)
        if self._std.active:
            self._std.after_fill(self.program.tensors(buffers, t))  # waits for the slot

    def tensors(self, buffers: Any, t: int) -> dict[str, Any]:
        """Every tensor the session reads for task t once `buffers` holds it."""
        return self._std.bound(self.program.tensors(buffers, t))

    def bind(self, io: ort.IOBinding, tensors: dict[str, Any]) -> None:
        """Bind each array where it lives (device pointer, dtype, shape): no copy."""
        for name, a in tensors.items():
            io.bind_input(name, self.arrays.device_type, self.arrays.device_id, a.dtype.type, list(a.shape),
                          self.arrays.pointer(a))

    def bind_slot(self, io: ort.IOBinding, buffers: Any) -> None:
        self.bind(io, self._std.bound(self.program.slot_tensors(buffers)))

    def bind_task(self, io: ort.IOBinding, buffers: Any, t: int) -> None:
        self.bind(io, self._std.bound(self.program.task_tensors(buffers, t)))

    def run(self, session: ort.InferenceSession, binding: Any, x: Any, n_classes: int) -> Any:
        """Logits of `x` (a checked host batch or a device array) as a device array; `binding` is the calling
        thread's binding of the slot (`inplace._Binding`)."""
        io = binding.io
        self._bind_input(io, x)
        out = self.arrays.empty((x.shape[0], n_classes))
        io.bind_output(OUTPUT, self.arrays.device_type, self.arrays.device_id, np.float32, list(out.shape),
                       self.arrays.pointer(out))
        session.run_with_iobinding(io)
        return out

    def _bind_input(self, io: ort.IOBinding, x: Any) -> None:
        if isinstance(x, np.ndarray):
            io.bind_cpu_input(INPUT, x)  # ONNX Runtime copies a host batch to the device
        else:
            self.bind(io, {INPUT: x})

    def run_graph(self, session: ort.InferenceSession, buffers: Any, slot_index: int, t: int, x: Any,
                  n_classes: int) -> Any:
        """`run` through the CUDA graph of (slot, batch, task t's per-task shapes), captured on first use."""
        with self._graph_lock:
            graph = self._graph_of.get((slot_index, x.shape[0], t))  # the per-call path: no dicts built
            if graph is None:
                task = self._std.bound(self.program.task_tensors(buffers, t))
                key = (slot_index, x.shape[0], tuple((name, a.shape) for name, a in sorted(task.items())))
                graph = self._graphs.get(key)
                if graph is None:
                    graph = self._graphs[key] = self._new_graph(session, buffers, task, x, n_classes)
                self._graph_of[(slot_index, x.shape[0], t)] = graph
            self.arrays.copy_into(graph.x, x)
            self.arrays.synchronize()  # the replay runs on ONNX Runtime's stream
            session.run_with_iobinding(graph.io, graph.options)
            return self.arrays.xp.array(graph.out, copy=True)  # the buffer is the next replay's

    def _new_graph(self, session: ort.InferenceSession, buffers: Any, task: dict[str, Any], x: Any,
                   n_classes: int) -> _Graph:
        n = x.shape[0]
        gx, out = self.arrays.empty(x.shape), self.arrays.empty((n, n_classes))
        # a captured graph keeps its own activations, input and output
        self.ledger.reserve(f"device CUDA graph {len(self._graphs) + 1}",
                            self._activation_bytes(n) + 4 * (gx.size + out.size))
        io = session.io_binding()
        self.bind(io, {**self._std.bound(self.program.slot_tensors(buffers)), **task, INPUT: gx})
        io.bind_output(OUTPUT, self.arrays.device_type, self.arrays.device_id, np.float32, list(out.shape),
                       self.arrays.pointer(out))
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(len(self._graphs) + 1))  # 0 is reserved by ONNX Runtime
        return _Graph(io, gx, out, options)

    def graph_count(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        self._graphs, self._graph_of = {}, {}
