"""TensorRT engines, one per task, built from the exported per-task ONNX graphs.

Follows the documented TensorRT 10 Python API: `trt.Builder` → `create_network(0)` (networks are always explicit
batch in TensorRT 10) → `trt.OnnxParser(...).parse` → `create_builder_config()` with `set_memory_pool_limit(
MemoryPoolType.WORKSPACE, …)`, `BuilderFlag.FP16` on request, a timing cache (`create_timing_cache` /
`set_timing_cache`, serialized to `timing.cache` and reused by later exports), an optimisation profile over the
dynamic batch, then `build_serialized_network`. One engine per task rather than one refittable engine: refits cost
about a second for a ResNet-18 and refittable engines run slower (see DESIGN.md).

Verification status: TensorRT cannot be installed on any machine this project is tested on, so this module has been
written against the documentation and is exercised only by tests marked `tensorrt` (skipped without the package
and a GPU). What is verified everywhere: the ONNX it feeds the builder (checker, parity tests) and the clear
failure when TensorRT or a GPU is absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError, UsageError
from edgecl.io import write_atomic
from edgecl.export.onnx_export import INDEX, engine_file, export_onnx, task_bar
from edgecl.graph.builder import INPUT
from edgecl.source import open_model

TIMING_CACHE = "timing.cache"


class TensorRTUnavailable(EdgeclError):
    """The tensorrt package or a usable CUDA GPU is missing; the message says which and what to install."""


class TensorRTBuildError(EdgeclError):
    """TensorRT rejected a graph (parser or builder failure); names the task and TensorRT's own messages."""


def tensorrt_unavailable() -> str | None:
    """Why engines cannot be built here, or None when TensorRT and a GPU are usable."""
    try:
        import tensorrt as trt
    except ImportError:
        return ("the 'tensorrt' Python package is not installed; on a machine with an NVIDIA GPU install it with "
                "`pip install 'edgecl[tensorrt]'` (TensorRT ≥ 10), or export with --format onnx")
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except (RuntimeError, TypeError) as exc:
        return f"TensorRT {trt.__version__} is installed but cannot create a builder (no usable CUDA GPU?): {exc}"
    if builder is None:
        return f"TensorRT {trt.__version__} is installed but cannot create a builder (no usable CUDA GPU?)"
    return None


def build_engines(source: Any, out_dir: str | os.PathLike, tasks: str | list | None = "all", fp16: bool = False,
                  compact: bool = True, *, max_batch: int = 256, opt_batch: int = 64, workspace_bytes: int = 1 << 30,
                  timing_cache: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Export the per-task ONNX into `out_dir`, then build `task_NNN.engine` from each; return the updated index.
    The timing cache (default `out_dir/timing.cache`) is read if present and written back, so later exports on the
    same GPU and TensorRT version build faster. Raises TensorRTUnavailable, before writing anything, when TensorRT
    or a GPU is missing."""
    if max_batch < 1:
        raise UsageError(f"max_batch must be ≥ 1, got {max_batch}")
    reason = tensorrt_unavailable()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    src = open_model(source)
    index = export_onnx(src, out_dir, tasks, fp16=False, compact=compact, progress=False)
    out = Path(out_dir)
    cache_path = Path(timing_cache) if timing_cache else out / TIMING_CACHE
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    shapes = [(b, *src.arch["input_shape"]) for b in (1, min(opt_batch, max_batch), max_batch)]
    cache = None
    for task in task_bar(index["tasks"], progress, src):
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if cache is None:  # one cache shared by every task's build
            cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, False)  # False: refuse a cache from another device/version
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT, *shapes)  # min, opt, max over the dynamic batch
        config.add_optimization_profile(profile)
        engine = _build(trt, builder, logger, config, (out / task["file"]).read_bytes(), task)
        write_atomic(out / engine_file(task["index"]), engine)
        task["engine"] = engine_file(task["index"])
    if cache is not None:
        write_atomic(cache_path, bytes(cache.serialize()))
    index["tensorrt"] = {"version": trt.__version__, "fp16": fp16, "timing_cache": str(cache_path),
                         "profile": {"input": INPUT, "min": shapes[0], "opt": shapes[1], "max": shapes[2]},
                         "workspace_bytes": workspace_bytes}
    write_atomic(out / INDEX, (json.dumps(index, indent=1) + "\n").encode())
    return index


def _build(trt, builder, logger, config, onnx_bytes: bytes, task: dict[str, Any]) -> bytes:
    """Parse one task's ONNX into a fresh network and build its serialized engine."""
    network = builder.create_network(0)  # TensorRT 10: always explicit batch, no flags needed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"task {task['index']} ({task['name']}): TensorRT cannot parse {task['file']}: "
                                 f"{errors}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"task {task['index']} ({task['name']}): TensorRT failed to build an engine "
                                 "(see its log above)")
    return bytes(serialized)
