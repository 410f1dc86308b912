"""Export (numpy + onnx, no torch): per-task folded ONNX, structurally compacted graphs, a switchable graph for the
runtime, and TensorRT engines where TensorRT exists."""
