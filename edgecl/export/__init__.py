"""Export (numpy + onnx, no torch): per-task folded ONNX, structurally compacted graphs, and TensorRT engines where
TensorRT exists. (The runtime needs no exported graph: it builds its switchable one from the artifact.)"""
from edgecl.graph.compact import CompactionReport, compact_task, count_params
from edgecl.export.onnx_export import export_onnx, task_model, weights_to_fp16
from edgecl.export.tensorrt import build_engines, tensorrt_unavailable

__all__ = ["CompactionReport", "build_engines", "compact_task", "count_params", "export_onnx", "task_model",
           "tensorrt_unavailable", "weights_to_fp16"]
