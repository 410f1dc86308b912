"""Torch-free device side: `TaskRuntime` switches tasks of one artifact in a single ONNX Runtime session under a memory
budget; `edgecl.runtime.audit` reports that budget. Imports numpy, onnx and onnxruntime only — never torch."""
from edgecl.runtime.budget import format_bytes, parse_budget
from edgecl.runtime.session import TaskRuntime

__all__ = ["TaskRuntime", "format_bytes", "parse_budget"]
