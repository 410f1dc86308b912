"""Torch-free device side: `TaskRuntime` switches tasks of one artifact in a single ONNX Runtime session under a memory
budget; `edgecl.runtime.audit` reports that budget. Imports numpy, onnx and onnxruntime only — never torch.

Modules, one job each: `task_runtime` (the `TaskRuntime` facade), `inplace` and `per_task` (the two strategies),
`slots` (the LRU slot cache with pins), `plan` (what a switch writes, per tensor), `maskfill` (the 1-bit masked
write), `costs` (the cost model the ledger and the audit share), `budget` (budgets and the ledger), `providers`
(ONNX Runtime backends and options), `inputs` (input and output checks, input files), `process_memory` (RSS),
`audit` (the memory audit), `run` (`edgecl run`: one task on a file, or timed)."""
from edgecl.runtime.budget import format_bytes, parse_budget
from edgecl.runtime.task_runtime import TaskRuntime

__all__ = ["TaskRuntime", "format_bytes", "parse_budget"]
