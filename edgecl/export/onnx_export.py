"""Per-task ONNX export: one self-contained graph per task (its weights folded in by `materialize`, its head, a
dynamic batch, opset 17), structurally compacted where masks are structured, optionally with fp16 weights; plus a
small `index.json` naming everything. (No switchable graph: `edgecl.runtime` builds its own in memory, with the
model's constants and factors, from the artifact itself.)

Every file is written atomically (temporary file, then rename), and `index.json` last, so an interrupted export
never leaves an index pointing at a half-written graph.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecl import __version__
from edgecl.arch.spec import Arch
from edgecl.checks import check_path, refuse_overwrite, same_file
from edgecl.io import write_atomic
from edgecl.errors import UsageError
from edgecl.graph.compact import CompactionReport, compact_task, count_params
from edgecl.graph.builder import INPUT, OPSET, OUTPUT, build_onnx
from edgecl.graph.standardize import fold_standardized
from edgecl.export.selection import select_tasks
from edgecl.progress import bar
from edgecl.source import IN_MEMORY, ModelSource, open_model

INDEX = "index.json"
FORMAT, FORMAT_VERSION = "edgecl-onnx-export", 1
FP16_MAX = float(np.finfo(np.float16).max)  # 65504: larger weights would be stored as inf
COMPACT_TOLERANCE = 1e-4  # max |Δ logits| allowed between compacted and dense graphs (relative to scale ≥ 1)


def task_file(t: int) -> str:
    """File name of task t's graph; indices, not task names, so a name can never become a path."""
    return f"task_{t:03d}.onnx"


def engine_file(t: int) -> str:
    """File name of task t's TensorRT engine (`edgecl.export.tensorrt`)."""
    return f"task_{t:03d}.engine"


EXPORT_FILE = re.compile(r"task_[0-9]{3,}\.(onnx|engine)")
"""The only names a re-export removes: files an export writes, never anything else a folder (or a forged
index.json) may name."""


def export_onnx(source: Any, out_dir: str | os.PathLike, tasks: str | list | None = "all", fp16: bool = False,
                compact: bool = True, *, verify: bool = True, progress: bool = True,
                latency: bool = False) -> dict[str, Any]:
    """Write one ONNX file per selected task and `index.json` into `out_dir`; return the index.

    `source`: artifact path, `Artifact` or `PackedModel`. `tasks`: 'all', '0,3', '2-5', names, or a list.
    `compact`: remove provably dead units (see `edgecl.graph.compact`); with `verify`, each compacted graph is run
    against its dense graph in ONNX Runtime on seeded inputs and replaced by the dense one if they disagree.
    `fp16`: weights stored in float16, input and output stay float32. `latency`: time each compacted graph against
    its dense one at batch 1 and 64 (`edgecl.export.latency`) and record it in the index."""
    src = open_model(source)
    indices = select_tasks(tasks, src)
    out = Path(check_path(out_dir, "--out"))
    writes = [out / INDEX] + [out / name(t) for t in indices for name in (task_file, engine_file)]
    origin = None if src.origin == IN_MEMORY else src.origin
    refuse_overwrite([(f"--out {out_dir}:", path) for path in writes], [("artifact", origin)])
    out = _prepare_dir(out)
    previous = _previous_files(out)
    entries = [_export_task(src, t, out, fp16, compact, verify, latency) for t in task_bar(indices, progress, src)]
    index: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "edgecl_version": __version__, "source": src.origin,
        "method": src.method, "arch": src.arch.get("name", "custom"), "opset": OPSET, "fp16": fp16,
        "compact": compact, "input": {"name": INPUT, "shape": ["batch", *src.arch["input_shape"]],
                                      "dtype": "float32"},
        "output": {"name": OUTPUT, "shape": ["batch", "classes"], "dtype": "float32"}, "tasks": entries}
    write_atomic(out / INDEX, (json.dumps(index, indent=1) + "\n").encode())
    remove_stale(out, previous, index, keep=origin)
    return index


def _previous_files(out: Path) -> set[str]:
    """The graphs and engines the index.json already in `out` names (only `EXPORT_FILE` names); none when there is
    no readable index of this format."""
    try:
        index = json.loads((out / INDEX).read_text())
        entries = index["tasks"] if index.get("format") == FORMAT else []
        names = {entry.get(key) for entry in entries for key in ("file", "engine")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()
    return _with_engines({n for n in names if isinstance(n, str) and EXPORT_FILE.fullmatch(n)})


def _with_engines(names: set[str]) -> set[str]:
    """`names` and the TensorRT engine each listed graph may have beside it (`build_engines` lists it only once
    built: a failed build must not leave an engine that no index names, nor a rebuild delete one it will replace)."""
    return names | {n[:-len(".onnx")] + ".engine" for n in names if n.endswith(".onnx")}


def remove_stale(out: Path, previous: set[str], index: dict[str, Any], keep: str | None = None) -> None:
    """Remove what the previous export in `out` wrote that the new `index` does not list (task_001..009 after a
    re-export of task 0 alone), so the folder holds exactly what its index.json says; never `keep` (the source)."""
    listed = _with_engines({entry[key] for entry in index["tasks"] for key in ("file", "engine") if key in entry})
    for name in sorted(previous - listed):
        path = out / name
        if keep is not None and same_file(path, keep):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise UsageError(f"cannot remove {path}, left by the previous export: {exc.strerror or exc}") from None


def task_model(arch: Arch, params: dict[str, np.ndarray], *, compact: bool = True, fp16: bool = False,
               verify: bool = True, name: str = "task",
               latency: bool = False) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """One task's folded (and optionally compacted / fp16) ONNX model, checked, plus what was done to it; with
    `latency`, the dense and compacted graphs' timings (`edgecl.export.latency`) when compaction removed anything.
    Weight-standardised convs are folded into plain convs first: the task's model is a plain network."""
    arch, params = fold_standardized(arch, params)
    dense_model = build_onnx(arch, params, graph_name=name)
    model, report = dense_model, None
    if compact:
        c_arch, c_params, report = compact_task(arch, params)
        if report.params_compact < report.params_dense:
            model = build_onnx(c_arch, c_params, graph_name=name)
            if verify:
                model, report = _verified(model, dense_model, arch, report)
        elif report.compacted:
            report.compacted, report.reason = False, "nothing to remove"
            report.params_compact = report.params_dense
    compacted = model is not dense_model
    if fp16:
        model = weights_to_fp16(model)
    onnx.checker.check_model(model, full_check=True)
    dense = count_params(params)
    info = {"params_dense": dense, "params_compact": report.params_compact if report else dense,
            "compaction": report.to_json() if report else None}
    if latency and compacted:  # with fp16, against the dense graph stored the same way
        from edgecl.export.latency import compare_latency

        baseline = weights_to_fp16(dense_model) if fp16 else dense_model
        info["latency_ms"] = compare_latency(baseline, model, arch["input_shape"])
    return model, info


def weights_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every weight matrix/filter in float16 and cast it back to float32 inside the graph: half the bytes,
    float32 input and output, runnable on any backend (ONNX Runtime CPU folds the casts at session start).
    Vectors (biases, BatchNorm statistics, the input selection) stay as they are: they are tiny and precision-prone."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= 2:
            weights = numpy_helper.to_array(init)
            if np.any(np.abs(weights) > FP16_MAX):  # would become inf: the graph would answer NaN
                raise UsageError(f"{graph.name or 'model'}: weight {init.name!r} holds values beyond the fp16 range "
                                 f"(largest |w| = {float(np.abs(weights).max()):.4g} > {FP16_MAX:g}); export "
                                 "without --fp16")
            half = numpy_helper.from_array(weights.astype(np.float16), f"{init.name}.fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], name=f"cast_{init.name}",
                                          to=TensorProto.FLOAT))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return out


def _export_task(src: ModelSource, t: int, out: Path, fp16: bool, compact: bool, verify: bool,
                 latency: bool = False) -> dict[str, Any]:
    info = src.tasks[t]
    params = src.materialize(t)
    model, stats = task_model(src.arch, params, compact=compact, fp16=fp16, verify=verify, name=f"task_{t}",
                              latency=latency)
    helper.set_model_props(model, task_metadata(src, t))
    data = model.SerializeToString()
    write_atomic(out / task_file(t), data)
    return {"index": t, "name": info.name, "n_classes": int(info.n_classes), "file": task_file(t),
            "bytes": len(data), **stats}


def task_metadata(src: ModelSource, t: int) -> dict[str, str]:
    """What a task's graph says about itself (ONNX `metadata_props`, read by any ONNX Runtime as
    `InferenceSession.get_modelmeta().custom_metadata_map`): a `task_007.onnx` copied away from its `index.json`
    still names its task, its classes and the model it came from."""
    info = src.tasks[t]
    return {"edgecl.task_index": str(t), "edgecl.task_name": info.name, "edgecl.n_classes": str(int(info.n_classes)),
            "edgecl.method": src.method, "edgecl.arch": src.arch.get("name", "custom"),
            "edgecl.n_tasks": str(src.n_tasks), "edgecl.version": __version__}


def _verified(model: onnx.ModelProto, dense: onnx.ModelProto, arch: Arch,
              report: CompactionReport) -> tuple[onnx.ModelProto, CompactionReport]:
    """Compare compacted and dense logits in ONNX Runtime; keep the dense graph if they differ (a safety net: the
    tests hold compaction to the same bound, this guards shapes the tests never saw)."""
    if importlib.util.find_spec("onnxruntime") is None:  # exporting without a runtime: the tests cover compaction
        return model, report
    x = np.random.default_rng(0).random((8, *arch["input_shape"]), dtype=np.float32)
    y = [run_onnx(m, x) for m in (dense, model)]
    err = float(np.abs(y[0] - y[1]).max())
    if err <= COMPACT_TOLERANCE * max(1.0, float(np.abs(y[0]).max())):
        return model, report
    report.compacted, report.reason = False, f"rejected: compacted logits differ by {err:.3g}; kept dense"
    report.params_compact = report.params_dense
    return dense, report


def run_onnx(model: onnx.ModelProto | str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """Logits of an exported graph on ONNX Runtime's CPU provider (one thread): the reference the checks use."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _prepare_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output folder {out} is not writable")
    return out


def task_bar(items: list, enabled: bool, src: ModelSource) -> Any:
    """The progress bar over an export's tasks (exports of many tasks take a while)."""
    return bar(items, desc=f"export {src.arch.get('name', 'model')}", unit="task", enabled=enabled)
