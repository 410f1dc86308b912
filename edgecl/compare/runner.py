"""The runs behind `edgecl compare`: every method on every seed (and task order), each packed into an artifact and
timed in the runtime, gathered into one report (definitions of every number: `edgecl.compare`)."""
from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Any, Callable

import numpy as np

from edgecl.checks import check_path, refuse_overwrite
from edgecl.compare.spec import CompareSpec, check_spec, method_config, split_available
from edgecl.errors import UsageError
from edgecl.metrics import aopd, mean_std, mopd, opd, pareto_front
from edgecl.progress import bar as progress_bar

ARTIFACT_DIR = "artifacts"


def task_orders(n_tasks: int, n_orders: int, seed: int = 0) -> list[list[int]]:
    """Order 0 is the stream's own; the rest are seeded random permutations, distinct while enough exist."""
    rng = np.random.default_rng(seed)
    orders = [list(range(n_tasks))]
    while len(orders) < n_orders:
        perm = rng.permutation(n_tasks).tolist()
        if perm not in orders or len(orders) >= math.factorial(n_tasks):
            orders.append(perm)
    return orders


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Spread over seeds of the scalar metrics, the mean accuracy matrix, and artifact bytes."""
    out: dict[str, Any] = {}
    for key in ("acc", "bwt", "forgetting", "train_seconds"):
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    n = len(runs[0]["acc_matrix"])
    out["acc_matrix_mean"] = [[float(np.mean([r["acc_matrix"][i][j] for r in runs])) for j in range(i + 1)]
                              for i in range(n)]
    out["artifact_bytes"] = float(np.mean([r["artifact_bytes"] for r in runs]))
    out["bytes_per_added_task"] = float(np.mean([added_task_bytes(r) for r in runs])) if n > 1 else None
    return out


def load_stream(name: str, n_tasks: int | None, seed: int, input_shape: tuple[int, ...] | None = None):
    """A built-in stream, or a stream file's first `n_tasks` tasks (`make_stream`; a file holds fixed data: there the
    seed changes only the methods' initialisation)."""
    from edgecl.train.data import make_stream

    return make_stream(name, n_tasks, seed, input_shape)


# ---------------------------------------------------------------- one run

class _FirstPackRecorder:
    """Stands in for a method inside `engine.run` and keeps the model packed after the first task, so the bytes each
    later task adds can be measured from two artifacts without a second training run."""

    def __init__(self, method):
        self.method, self.name, self.first = method, method.name, None

    def learn_task(self, t, task, ctx) -> None:
        self.method.learn_task(t, task, ctx)

    def pack(self):
        packed = self.method.pack()
        if self.first is None:
            self.first = packed
        return packed


def train_run(name: str, stream, arch, config: dict[str, Any], spec: CompareSpec, artifact_path: str | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Train one method on one stream (one seed or order); pack it into an artifact when a path is given."""
    from edgecl import artifact
    from edgecl.train import engine, registry
    from edgecl.train.protocol import TrainContext

    recorder = _FirstPackRecorder(registry.create(name, arch, config))
    start = time.perf_counter()
    result = engine.run(recorder, stream, TrainContext(device=spec.device, progress=spec.progress),
                        log=log if spec.verbose else (lambda _line: None))
    summary = result.to_json()
    run = {"seed": config["seed"], "acc_matrix": result.acc_matrix,
           **{k: summary[k] for k in ("acc", "bwt", "forgetting", "stability")},
           "train_seconds": float(sum(result.seconds_per_task)), "wall_seconds": time.perf_counter() - start}
    if artifact_path is not None:
        artifact.save(result.packed, artifact_path)
        first_path = f"{artifact_path}.first-task"
        artifact.save(recorder.first, first_path)
        final, first = artifact.inspect(artifact_path), artifact.inspect(first_path)
        run.update(artifact_bytes=final["file_bytes"], artifact_bytes_first_task=first["file_bytes"],
                   artifact_task_bytes=[t["bytes"] for t in final["tasks"]],
                   artifact_shared_bytes=final["file_bytes"] - sum(t["bytes"] for t in final["tasks"]),
                   artifact_shared_bytes_first_task=first["file_bytes"] - sum(t["bytes"] for t in first["tasks"]))
        os.remove(first_path)
    return run


def added_task_bytes(run: dict[str, Any]) -> float:
    """Bytes one added task brings: a later task's own stored blobs (masks, factors, head; mean over tasks 1..n−1)
    plus the shared part's growth per task when it grows (LPS's W̄ fills in as tasks own weights). A shared part
    that shrinks — AGS-CL's dense base compresses better once nodes are dead — counts zero: it is not a task's
    cost, and a file difference made such methods report negative bytes per task."""
    own, n = run["artifact_task_bytes"], len(run["artifact_task_bytes"])
    growth = (run["artifact_shared_bytes"] - run["artifact_shared_bytes_first_task"]) / (n - 1)
    return float(np.mean(own[1:])) + max(0.0, growth)


def runtime_timing(path: str, stream, repeats: int) -> dict[str, Any]:
    """Median switch and batch-1 inference times through `TaskRuntime`, plus accuracy computed in the runtime."""
    if importlib.util.find_spec("onnxruntime") is None:  # a training-only install: no runtime columns
        return {"note": "onnxruntime is not installed (pip install 'edgecl[runtime]')"}
    from edgecl.runtime import TaskRuntime

    # A runtime failure on one method must not lose a long comparison: it is recorded, printed and shown in the table.
    try:
        rt = TaskRuntime(path)
        n = len(stream.tasks)
        switch, infer = [], []
        for _ in range(repeats):
            for t in range(n):
                x = stream.tasks[t].x_test[:1]
                start = time.perf_counter()
                rt.switch(t)
                mid = time.perf_counter()
                rt.infer(x)
                switch.append(mid - start)
                infer.append(time.perf_counter() - mid)
        accs = [float((np.asarray(rt.infer(task.x_test, task=t)).argmax(-1) == task.y_test).mean())
                for t, task in enumerate(stream.tasks)]
        rt.close()
    except Exception as exc:  # noqa: BLE001 - see comment above
        return {"note": f"runtime failed on {os.path.basename(path)}: {type(exc).__name__}: {exc}"}
    return {"switch_ms": 1e3 * float(np.median(switch)), "switch_first_ms": 1e3 * float(np.median(switch[:n])),
            "infer_ms": 1e3 * float(np.median(infer)), "infer_first_ms": 1e3 * float(np.median(infer[:n])),
            "runtime_acc": float(np.mean(accs)), "switches": len(switch), "strategy": rt.strategy}


def order_robustness(name: str, stream, arch, config: dict[str, Any], spec: CompareSpec, seed_run: dict[str, Any],
                     step: Callable[[str], None]) -> dict[str, Any]:
    """Train on --orders task orders (order 0 reuses `seed_run`) and compute OPD/MOPD/AOPD."""
    from edgecl.train.data import Stream

    n = len(stream.tasks)
    orders = task_orders(n, spec.orders, seed=config["seed"])
    final = np.full((len(orders), n), np.nan)
    final[0] = seed_run["acc_matrix"][-1]
    for r, order in enumerate(orders[1:], start=1):
        reordered = Stream(stream.name, stream.input_shape, [stream.tasks[i] for i in order])
        run = train_run(name, reordered, arch, config, spec, None, step)
        final[r, order] = run["acc_matrix"][-1]
        step(f"{name} order {r + 1}/{len(orders)} {order}: ACC {100 * run['acc']:.1f}% ({run['wall_seconds']:.1f}s)")
    return {"orders": orders, "final_acc": final.tolist(), "acc_per_order": final.mean(axis=1).tolist(),
            "opd": opd(final).tolist(), "mopd": mopd(final), "aopd": aopd(final)}


# ---------------------------------------------------------------- the whole comparison

def compare_method(name: str, streams: dict, arch, configs: dict[int, dict[str, Any]], spec: CompareSpec,
                   out_dir: str, step: Callable[[str], None], log: Callable[[str], None]) -> dict:
    """Every seed of one method (each packed into DIR/artifacts/), its runtime timing, and its order robustness."""
    runs = []
    for seed, stream in streams.items():
        path = os.path.join(out_dir, ARTIFACT_DIR, f"{name}-seed{seed}.edgecl")
        run = train_run(name, stream, arch, configs[seed], spec, path, step)
        run["artifact"] = os.path.relpath(path, out_dir)
        runs.append(run)
        step(f"{name} seed {seed}: ACC {100 * run['acc']:.1f}% BWT {100 * run['bwt']:+.1f} "
             f"({run['wall_seconds']:.1f}s, artifact {run['artifact_bytes'] / 1024:.1f} KiB)")
    seed0, first = spec.seeds[0], streams[spec.seeds[0]]
    entry = {"config": configs[seed0], "runs": runs, **summarize_runs(runs)}
    entry["runtime"] = runtime_timing(os.path.join(out_dir, runs[0]["artifact"]), first, spec.timing_repeats)
    if "note" in entry["runtime"]:
        log(f"edgecl compare: {name}: runtime timing skipped: {entry['runtime']['note']}")
    if spec.orders:
        entry["order_robustness"] = order_robustness(name, first, arch, configs[seed0], spec, runs[0], step)
    return entry


def check_outputs(spec: CompareSpec, out_dir: str) -> None:
    """Refuse an --out whose files (reports, charts, per-run artifacts) would replace the --stream or --arch file."""
    charts = ["acc_bwt", "bytes", "runtime", "pareto", "order_robustness", *(f"acc_matrix_{m}" for m in spec.methods)]
    writes = [os.path.join(out_dir, name) for name in ("compare.json", "compare.md", *(f"{c}.png" for c in charts))]
    writes += [os.path.join(out_dir, ARTIFACT_DIR, f"{m}-seed{s}.edgecl") for m in spec.methods for s in spec.seeds]
    refuse_overwrite([(f"--out {out_dir}:", path) for path in writes],
                     [("--stream", spec.stream), ("--arch", spec.arch), ("--arch", spec.arch.partition(":")[0])])


def run_compare(spec: CompareSpec, out_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, pack, time and compare; writes compare.json, compare.md and the PNGs into out_dir; returns the report."""
    from edgecl import __version__
    from edgecl.arch.factories import resolve_arch
    from edgecl.compare.report import write_report
    from edgecl.machine import machine_info
    from edgecl.train.compute import set_threads
    from edgecl.train.outputs import save_json

    check_spec(spec)
    check_outputs(spec, check_path(out_dir, "--out"))
    set_threads(spec.threads)
    methods, skipped = split_available(spec.methods)
    for reason in skipped.values():
        log(f"edgecl compare: skipping: {reason}")
    if not methods:
        raise UsageError(f"none of the requested methods is available: {'; '.join(skipped.values())}")
    streams = {seed: load_stream(spec.stream, spec.n_tasks, seed, spec.input_shape) for seed in spec.seeds}
    first = streams[spec.seeds[0]]
    if spec.orders and len(first.tasks) < 2:
        raise UsageError("--orders needs a stream with at least 2 tasks")
    arch = resolve_arch(spec.arch, first.input_shape, classifier=spec.classifier, factory_args=spec.factory_args)
    configs = {m: {seed: method_config(m, spec, seed) for seed in spec.seeds} for m in methods}
    os.makedirs(os.path.join(out_dir, ARTIFACT_DIR), exist_ok=True)

    report: dict[str, Any] = {
        "edgecl_version": __version__, "machine": machine_info(), "stream": first.name, "arch": spec.arch,
        **({"arch_args": spec.factory_args} if spec.factory_args else {}), "n_tasks": len(first.tasks), "task_names": [t.name for t in first.tasks], "seeds": spec.seeds,
        "orders": spec.orders, "epochs_scale": spec.epochs_scale, "overrides": spec.overrides,
        "methods": {}, "skipped": skipped}
    total = len(methods) * (len(spec.seeds) + max(spec.orders - 1, 0))
    started = time.perf_counter()
    with progress_bar(total=total, desc="compare", unit="run", enabled=spec.progress, leave=True) as bar:
        done = [0]
        # above a drawn bar, lines go through tqdm's writer so the bar is not torn
        write = getattr(bar, "write", log) if spec.progress else log

        def step(line: str) -> None:
            done[0] += 1
            bar.update(1)
            write(f"[compare {done[0]}/{total}] {line}")

        for name in methods:
            report["methods"][name] = compare_method(name, streams, arch, configs[name], spec, out_dir, step, log)
            save_json(report, os.path.join(out_dir, "compare.json"))  # partial results survive an interruption
    report["pareto_front"] = pareto_front({m: (e["artifact_bytes"], e["acc_mean"])
                                           for m, e in report["methods"].items()})
    report["wall_seconds"] = time.perf_counter() - started
    write_report(report, out_dir)
    save_json(report, os.path.join(out_dir, "compare.json"))
    return report
