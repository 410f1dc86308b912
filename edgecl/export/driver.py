"""`edgecl export` as one library call: ONNX or TensorRT, a printed table of what was written, and the exit code
(1 when TensorRT is asked for where it cannot run; bad input raises UsageError/ArtifactError as everywhere)."""
from __future__ import annotations

import sys
from typing import Any

from edgecl.errors import UsageError
from edgecl.export.onnx_export import export_onnx
from edgecl.export.tensorrt import TensorRTUnavailable, build_engines


def export_artifact(artifact: Any, out: str, *, format: str = "onnx", tasks: str = "all", fp16: bool = False,
                    compact: bool = True, verify: bool = True, max_batch: int = 256, progress: bool = True,
                    latency: bool = False) -> int:
    """Export and print a summary; returns the exit code."""
    if format not in ("onnx", "tensorrt"):
        raise UsageError(f"export format must be onnx or tensorrt, got {format!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise UsageError(f"--max-batch must be ≥ 1, got {max_batch}")
    common = dict(tasks=tasks, fp16=fp16, compact=compact, progress=progress)
    if format == "tensorrt":
        try:
            index = build_engines(artifact, out, max_batch=max_batch, **common)
        except TensorRTUnavailable as exc:
            print(f"edgecl export: TensorRT export is not possible here: {exc}", file=sys.stderr)
            return 1
    else:
        index = export_onnx(artifact, out, verify=verify, latency=latency, **common)
    print(format_summary(index, out))
    return 0


def format_summary(index: dict[str, Any], out: str) -> str:
    """The table `edgecl export` prints: one row per task with its parameters before/after compaction and files."""
    lines = [f"exported {len(index['tasks'])} task(s) of {index['method']}/{index['arch']} to {out} "
             f"(opset {index['opset']}, fp16 weights: {index['fp16']}, compact: {index['compact']})",
             f"{'task':>4}  {'name':<16} {'classes':>7} {'params dense':>12} {'compact':>9} {'bytes':>10}  "
             f"{'faster b1/b64':>13}  file"]
    for e in index["tasks"]:
        files = e["file"] + (f", {e['engine']}" if "engine" in e else "")
        speed = e.get("latency_ms", {}).get("speedup")
        faster = f"{speed['1']:.2f}/{speed['64']:.2f}x" if speed else "-"
        lines.append(f"{e['index']:>4}  {e['name'][:16]:<16} {e['n_classes']:>7} {e['params_dense']:>12} "
                     f"{e['params_compact']:>9} {e['bytes']:>10}  {faster:>13}  {files}")
    lines.append("index: index.json")
    return "\n".join(lines)
