"""Memory budget audit of an artifact: does it fit a device, and where do the bytes go?

Static part (disk): bytes per component and per task, bits per parameter, the same tasks as N separate dense fp32
models, and a projection of size against task count. Resident part (RAM while running): base weights, task masks,
cached tasks, session + workspace, activations at a batch — predicted from the runtime's budget ledger (the same
numbers the runtime enforces) and measured as the process RSS increase while the runtime is built and runs one batch.

ONNX Runtime's Python API exposes no allocator statistics for the CPU arena, so the measured side is RSS. On
``device="cuda"`` device bytes are a second section: the device ledger's prediction (base weights, task deltas, cache
slots, the session's constants, activations) next to the increase of the GPU's used memory (CuPy's memGetInfo, so
ONNX Runtime's CUDA arena and cuBLAS/cuDNN workspaces count too), judged against ``device_budget`` apart from host
RAM. The device numbers are unverified until `tools/gpu_check.py` has run on a GPU (README, "What runs where").
"""
from __future__ import annotations

import gc
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.arch.spec import dense_params as arch_dense_params
from edgecl.checks import MAX_BATCH, check_int, check_path, refuse_overwrite
from edgecl.artifact import inspect as inspect_artifact  # imported before any RSS is measured: code, not model
from edgecl.errors import BudgetError, UsageError
from edgecl.plotting import new_figure, save_png
from edgecl.runtime.budget import format_bytes, parse_budget, refuse_device_budget_off_gpu
from edgecl.runtime.costs import ENVIRONMENT, SLOT_OVERHEAD, activation_bytes
from edgecl.runtime.device_arrays import backend_for
from edgecl.runtime.process_memory import process_rss, return_free_heap
from edgecl.runtime.providers import resolve_providers
from edgecl.runtime.task_runtime import STRATEGIES, TaskRuntime, auto_strategy
from edgecl.source import IN_MEMORY, ModelSource, open_model


def dense_params(src: ModelSource, t: int) -> int:
    """Parameters of task t as one dense model (trunk + its head)."""
    return arch_dense_params(src.arch, src.tasks[t].n_classes)


def static_audit(source: Any) -> dict[str, Any]:
    """Bytes per component (shared tensors) and per task (decoded in memory: `task_bytes`), and what one more task
    adds where it is stored: on disk for a file (each task's stored blobs, `task_stored_bytes`, from `inspect`),
    else in memory. Reads one task at a time."""
    src = open_model(source)
    shared = {name: int(src.read_base(name).nbytes) for name in src.base_names()}
    per_task = [int(sum(a.nbytes for a in src.read_task(t).values())) for t in range(src.n_tasks)]
    disk = inspected = None
    stored = per_task
    if src.origin != IN_MEMORY:
        disk = Path(src.origin).stat().st_size
        inspected = inspect_artifact(src.origin)
        stored = [int(task["bytes"]) for task in inspected["tasks"]]
    total = disk if disk is not None else sum(shared.values()) + sum(per_task)
    dense = [dense_params(src, t) for t in range(src.n_tasks)]
    n = src.n_tasks
    marginal = _marginal_task_bytes(stored)
    return {
        "tasks": n, "file_bytes": disk, "total_bytes": total, "shared_bytes": shared, "task_bytes": per_task,
        "task_stored_bytes": stored if disk is not None else None, "inspect": inspected,
        "params_one_model": dense[0], "bits_per_param": 8 * total / dense[0],
        "bits_per_param_per_task": 8 * total / sum(dense), "separate_dense_bytes": 4 * sum(dense),
        "one_dense_bytes": 4 * dense[0], "bytes_per_added_task": marginal, "fixed_bytes": total - marginal * n,
    }


def _marginal_task_bytes(per_task: list[int]) -> float:
    """Bytes one more task adds: the mean of the later tasks' own bytes (task 0 often also carries shared state).
    A shared part that grows with tasks (LPS's base fills in as tasks own weights) is not in it: `edgecl compare`,
    which sees the file after the first task too, adds that growth."""
    later = per_task[1:] or per_task
    return float(sum(later) / len(later)) if later else 0.0


def resident_audit(source: Any, batch: int = 8, device: str = "cpu", strategy: str = "inplace",
                   cache_tasks: int = 1, resident: str | None = None, task_tensors: str = "auto",
                   budget: int | None = None) -> dict[str, Any]:
    """Predicted and measured resident bytes of a runtime serving `source` at `batch`.

    `budget` (host path): the runtime is built under it first, as a deployment with that budget builds it — which
    changes what it holds where the budget leaves no room for deriving the blocked layout (it then starts
    unblocked, at a fraction of that peak); only where it is refused is it built again without one, to report what
    it needs (unblocked: the least budget that runs it). Without this a resnet18 RGO artifact that runs in 128 MiB
    was audited as needing 300 MiB.

    The measurement is the RSS increase from before loading to after every cache slot has served one batch; it is
    meaningful in a fresh process (the CLI's case). A model from a file is loaded by the runtime itself, so the
    increase is what the runtime holds; an in-memory model is already resident, so its tensors are excluded from the
    comparison."""
    src = open_model(source)
    in_memory = src.origin == IN_MEMORY
    paid = ENVIRONMENT.charged  # this process already holds ONNX Runtime's one-off cost
    resolve_providers("auto", device)  # what a GPU audit lacks, named before anything is measured
    on_device = device == "cuda" or resident == "device"
    probe = backend_for(device) if on_device else None  # on a GPU: the CUDA context exists before "before"
    gc.collect()
    before, device_before = process_rss(), probe.used_bytes() if probe else None
    def serve(limit: int | None, blocked: bool = True) -> TaskRuntime:
        runtime = TaskRuntime(src if in_memory else src.origin, device=device, budget=limit, strategy=strategy,
                              cache_tasks=cache_tasks, max_batch=batch, charge_environment=True, resident=resident,
                              task_tensors=task_tensors, blocked_convs=blocked)
        x = np.zeros((batch, *runtime.input_shape), np.float32)
        # what the runtime holds in service: every cache slot filled in place; every task's session (and so each
        # session's arena) used under `sessions`
        served = runtime.n_tasks if runtime.strategy == "sessions" else max(1, min(runtime.n_slots, runtime.n_tasks))
        for t in range(served):
            runtime.infer(x, task=t)
        return runtime

    try:
        runtime = serve(None if on_device else budget)
    except BudgetError:
        if budget is None or on_device:
            raise
        # over the budget: measured without one, unblocked (what any budget below the blocked layout's start-up
        # peak gets), to say the least it needs; from what the refused attempts left (heap not yet returned, ONNX
        # Runtime's environment if they made it), else their leftovers read as this runtime's need (+38%)
        gc.collect()
        return_free_heap()
        before, paid = process_rss(), ENVIRONMENT.charged
        runtime = serve(None, blocked=False)
    gc.collect()
    after = process_rss()
    device_report = _device_section(runtime, probe, device_before)
    predicted = dict(runtime.ledger.items)
    skip = {"model tensors"} if in_memory else set()
    skip |= {"onnxruntime environment"} if paid else set()
    compared = sum(v for k, v in predicted.items() if k not in skip)
    measured = None if before is None or after is None else after - before
    return {
        "strategy": runtime.strategy, "providers": runtime.providers, "batch": batch, "predicted": predicted,
        "task_tensors": runtime.memory_report(measure=False)["task_tensors"],
        "predicted_total": sum(predicted.values()), "predicted_peak": runtime.ledger.peak,
        "predicted_compared": compared, "measured_rss_increase": measured,
        "relative_error": (compared - measured) / measured if measured and measured > 0 else None,
        "slot_bytes": runtime.slot_bytes, "resident_bytes_per_task": runtime.task_bytes / runtime.n_tasks,
        "activation_bytes": activation_bytes(runtime.arch, batch, max(i.n_classes for i in src.tasks)),
        "device": device_report,
    }


def _device_section(runtime: TaskRuntime, probe: Any, before: int | None) -> dict[str, Any] | None:
    """The device ledger's prediction next to the GPU's measured increase in used memory (None on the CPU twin)."""
    if probe is None:
        return None
    report = runtime.memory_report(measure=False)["device"]
    after = probe.used_bytes()
    measured = None if before is None or after is None else after - before
    report.update(predicted_peak=runtime.device_ledger.peak, measured_increase=measured,
                  relative_error=(report["predicted_total"] - measured) / measured if measured else None)
    return report


def audit(artifact: Any, budget: int | str, batch: int = 8, device: str = "cpu",
          strategy: str = "auto", device_budget: int | str | None = None,
          resident: str | None = None, task_tensors: str = "auto", plot_to: str | None = None) -> dict[str, Any]:
    """Full audit against a budget: static + resident for `strategy` (in place with one cache slot, or a session
    per task; "auto": the one `TaskRuntime(artifact, budget=budget)` would choose; `task_tensors` as `TaskRuntime`'s), whether it fits, and how many more tasks would fit. On the device
    path the device bytes are judged against `device_budget` (when given) apart from host RAM. `plot_to`: also
    write `plot`'s PNG there (report["plot"]); refused up front when it is a folder or the artifact itself."""
    if plot_to is not None:
        check_path(plot_to, "--plot")
        if os.path.isdir(plot_to):
            raise UsageError(f"--plot {plot_to} is a folder; give a file name such as "
                             f"{os.path.join(plot_to, 'audit.png')}")
        if isinstance(artifact, (str, os.PathLike)):
            refuse_overwrite([("--plot", plot_to)], [("artifact", artifact)])
    limit = parse_budget(budget)
    device_limit = parse_budget(device_budget)
    if limit is None:
        raise UsageError("audit needs a budget, e.g. 32MiB")
    check_int(batch, "--batch", 1, MAX_BATCH)
    if strategy not in STRATEGIES:
        raise UsageError(f"audit strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    refuse_device_budget_off_gpu(device_budget, device, resident)
    src = open_model(artifact)
    if strategy == "auto":
        on_device = resident or ("device" if device == "cuda" else None)  # what TaskRuntime resolves it to
        strategy = auto_strategy(src.arch, list(src.tasks), limit, batch, True, on_device, task_tensors)
    report = _batch_over_budget(src, batch, device, limit, device_limit)
    if report is None:
        resident_report = resident_audit(src, batch, device, strategy, resident=resident, task_tensors=task_tensors,
                                         budget=limit)
        report = _judge(resident_report, static_audit(src), limit, device_limit, src.n_tasks)
    if plot_to is not None:
        report["plot"] = str(plot(report, plot_to))
    return report


def _batch_over_budget(src: ModelSource, batch: int, device: str, limit: int,
                       device_limit: int | None) -> dict[str, Any] | None:
    """The report of an audit whose batch alone exceeds a budget, judged from the architecture before anything is
    allocated (a batch of a million would otherwise be allocated only to report that it does not fit); None when the
    batch's bytes fit and the runtime must be measured."""
    input_bytes = 4 * batch * int(np.prod(src.arch["input_shape"]))
    activations = activation_bytes(src.arch, batch, max(i.n_classes for i in src.tasks))
    on_device = device == "cuda"
    host = input_bytes if on_device else activations  # the activations live where the model runs
    over = [(what, need, have) for what, need, have in (
        ("memory budget", host, limit), ("device budget", activations if on_device else 0, device_limit))
        if have is not None and need > have]
    if not over:
        return None
    what, need, have = over[0]
    held = "input" if on_device and what == "memory budget" else "input and activations"
    reason = f"the batch of {batch} alone needs {format_bytes(need)} ({held}), over the {what} {format_bytes(have)}"
    return {"budget": limit, "fits": False, "needed": need, "batch": batch, "static": static_audit(src),
            "resident": None, "over_budget": reason, "more_tasks_fit": 0, "tasks_cacheable": 0,
            **({"device_budget": device_limit, "device_fits": what != "device budget"} if on_device else {})}


def _judge(resident: dict[str, Any], static: dict[str, Any], limit: int, device_limit: int | None,
           n_tasks: int) -> dict[str, Any]:
    """Fits or not (host, and device where there is one), tasks that fit more, and tasks that can stay cached. On
    the device path the slots and the per-task bytes are the device's, so they are counted against its budget."""
    need = max(resident["predicted_peak"], resident["measured_rss_increase"] or 0)
    out = {"budget": limit, "fits": need <= limit, "needed": need, "static": static, "resident": resident}
    device = resident["device"]
    room, slot_cost = limit - need, resident["slot_bytes"] + SLOT_OVERHEAD
    if device is not None:
        device_need = max(device["predicted_peak"], device["measured_increase"] or 0)
        out.update(device_budget=device_limit, device_needed=device_need,
                   device_fits=device_limit is None or device_need <= device_limit)
        out["fits"] = out["fits"] and out["device_fits"]
        room = None if device_limit is None else device_limit - device_need
        slot_cost = resident["slot_bytes"]
    grow = resident["resident_bytes_per_task"]
    if room is None:  # no device budget: nothing bounds the task count or the slots
        more, slots = None, n_tasks
    else:
        more = math.floor(room / grow) if grow > 0 and room >= 0 else 0
        # no slot cost: per-task sessions, or every switched layer factored (no task needs a copy on a switch)
        slots = 0 if room < 0 else room // slot_cost + 1 if resident["slot_bytes"] else n_tasks
    out.update(more_tasks_fit=more, tasks_cacheable=int(min(slots, n_tasks)))
    return out


STRATEGY_WORDS = {"inplace": "in place: one session, tasks switched in its cache slots",
                  "sessions": "one session per task"}  # what a deployer reads the audited strategy as


def budget_summary(report_or_artifact: Any, budget: int | str | None = None, batch: int = 8,
                   device: str = "cpu") -> str:
    """A short human summary of an audit: pass `audit(...)`'s report, or an artifact and a budget to audit now
    (the demo's call)."""
    if isinstance(report_or_artifact, dict) and "static" in report_or_artifact:
        report = report_or_artifact
    else:
        if budget is None:
            raise UsageError("budget_summary needs a budget when given an artifact")
        report = audit(report_or_artifact, budget, batch, device)
    s, r = report["static"], report["resident"]
    if r is None:  # refused from the batch alone (`_batch_over_budget`)
        return (f"budget {format_bytes(report['budget'])}: DOES NOT FIT: {report['over_budget']}\n"
                f"  artifact {format_bytes(s['total_bytes'])} for {s['tasks']} tasks; audit a smaller --batch")
    lines = [
        f"budget {format_bytes(report['budget'])}: {'FITS' if report['fits'] else 'DOES NOT FIT'} "
        f"(needs {format_bytes(report['needed'])} resident at batch {r['batch']}, {STRATEGY_WORDS[r['strategy']]})",
        f"  artifact {format_bytes(s['total_bytes'])} for {s['tasks']} tasks = {s['bits_per_param']:.2f} bits per "
        f"parameter of one model; {s['tasks']} separate dense models: {format_bytes(s['separate_dense_bytes'])} "
        f"({s['separate_dense_bytes'] / s['total_bytes']:.1f}x larger)",
        f"  each added task: +{format_bytes(s['bytes_per_added_task'])} "
        f"{'stored (its own blobs)' if s['file_bytes'] is not None else 'in memory'}, "
        f"+{format_bytes(r['resident_bytes_per_task'])} resident; "
        + ("no device budget bounds the task count" if report["more_tasks_fit"] is None
           else f"{report['more_tasks_fit']} more tasks fit"),
        "  resident (predicted): " + ", ".join(f"{k} {format_bytes(v)}" for k, v in r["predicted"].items()),
    ]
    if r["relative_error"] is not None:
        lines.append(f"  measured RSS increase {format_bytes(r['measured_rss_increase'])} "
                     f"(prediction off by {100 * r['relative_error']:+.1f}%)")
    elif r["measured_rss_increase"] is not None:
        lines.append(f"  measured RSS increase {format_bytes(r['measured_rss_increase'])} (this process had already "
                     "paid for ONNX Runtime; measure in a fresh process, as `edgecl audit` does)")
    device = r.get("device")
    if device is not None:
        budget = "no device budget" if report.get("device_budget") is None else \
            f"device budget {format_bytes(report['device_budget'])}: " + \
            ("FITS" if report["device_fits"] else "DOES NOT FIT")
        measured = "" if device["relative_error"] is None else \
            f"; measured {format_bytes(device['measured_increase'])} " \
            f"(prediction off by {100 * device['relative_error']:+.1f}%)"
        lines.append(f"  device ({device['arrays']}): needs {format_bytes(report['device_needed'])}, {budget}; "
                     f"+{format_bytes(device['bytes_per_task'])} per task{measured}")
        lines.append("  device (predicted): " + ", ".join(f"{k} {format_bytes(v)}"
                                                         for k, v in device["predicted"].items()))
    lines.append(f"  tasks that can stay cached (no copy on switch): {report['tasks_cacheable']}")
    if r.get("task_tensors") == "cached":
        lines.append("  heads and other per-task tensors: in the cache slots, read from the file on a miss "
                     "(--task-tensors resident keeps every task's)")
    return "\n".join(lines)


def print_budget_summary(artifact: Any, budget: int | str, batch: int = 8, device: str = "cpu") -> dict[str, Any]:
    """Audit and print the summary; returns the report."""
    report = audit(artifact, budget, batch, device)
    print(budget_summary(report))
    return report


def projection(static: dict[str, Any], up_to: int) -> tuple[list[int], list[float], list[float]]:
    """Task counts 1..up_to with projected artifact bytes and N-separate-dense-models bytes."""
    counts = list(range(1, up_to + 1))
    ours = [static["fixed_bytes"] + n * static["bytes_per_added_task"] for n in counts]
    separate = [n * static["one_dense_bytes"] for n in counts]
    return counts, ours, separate


def plot(report: dict[str, Any], out: str | Path) -> Path:
    """PNG: bytes against task count (ours vs separate models, budget line) and the resident breakdown."""
    static, resident = report["static"], report["resident"]
    counts, ours, separate = projection(static, max(2 * static["tasks"], 20))
    fig, (left, right) = new_figure((11, 4.2), nrows=1, ncols=2)
    mib = 1024 ** 2
    left.plot(counts, [b / mib for b in ours], label="artifact on disk (projected)")
    left.plot(counts, [b / mib for b in separate], label="separate dense fp32 models on disk", linestyle="--")
    if resident is not None:
        resident_now, per_task = report["needed"], resident["resident_bytes_per_task"]
        left.plot(counts, [(resident_now + (n - static["tasks"]) * per_task) / mib for n in counts],
                  label=f"resident at batch {resident['batch']} (projected)", linestyle="-.")
    left.axhline(report["budget"] / mib, color="red", linewidth=1, label="memory budget")
    left.axvline(static["tasks"], color="grey", linewidth=0.8, linestyle=":")
    left.set(xlabel="tasks", ylabel="MiB", title="bytes against task count")
    left.legend(loc="center right", fontsize=8)
    if resident is None:  # the batch alone was over budget: nothing resident was measured
        right.set(title=f"batch {report['batch']}: {report['over_budget']}"[:90])
        fig.tight_layout()
        return Path(save_png(fig, out))
    names = list(resident["predicted"])
    values = [resident["predicted"][k] / mib for k in names]
    right.barh(names, values)
    if resident["measured_rss_increase"] is not None:
        right.axvline(resident["measured_rss_increase"] / mib, color="black", linestyle="--",
                      label="measured RSS increase")
        right.legend()
    right.set(xlabel="MiB resident", title=f"resident at batch {resident['batch']} ({resident['strategy']})")
    fig.tight_layout()
    return Path(save_png(fig, out))


__all__ = ["audit", "budget_summary", "print_budget_summary", "plot", "process_rss", "static_audit",
           "resident_audit", "BudgetError"]
