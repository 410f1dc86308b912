"""ONNX graphs from architecture specs, shared by the exporter and the runtime (numpy + onnx, no torch).

`builder` turns a spec (and a task's tensors, or switchable inputs) into an ONNX model; `compact` makes one task's
folded tensors physically smaller without changing its outputs. Neither knows about artifacts or training."""
from edgecl.graph.builder import INPUT, OPSET, OUTPUT, build_onnx, tensor_names
from edgecl.graph.compact import CompactionReport, compact_task, count_params

__all__ = ["INPUT", "OPSET", "OUTPUT", "CompactionReport", "build_onnx", "compact_task", "count_params",
           "tensor_names"]
