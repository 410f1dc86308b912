"""`edgecl compare`: several methods trained on the same stream and seeds, each packed into an artifact and timed in
the runtime, so a user can choose a method by accuracy against bytes and speed on *their* data.

What is measured per method (definitions, so the numbers can be checked):
- ACC, BWT, forgetting: mean ± sample std over seeds. Seed k sets both the stream (split, permutations) and the
  method's initialisation, exactly as `edgecl train --seed k`, so every method sees the same data for a seed.
- artifact bytes (mean over seeds) and bytes per added task
  = (bytes after all T tasks − bytes after task 1) / (T − 1).
- runtime: median switch time and median batch-1 inference time over repeated round trips through every task in
  `TaskRuntime` (seed 0's artifact, default budget and strategy); `switch_first_ms` / `infer_first_ms` are the
  medians of the first round (nothing cached yet); `runtime_acc` is the mean test accuracy computed through the
  runtime (should equal seed 0's training ACC).
- task-order robustness (--orders R ≥ 2, seed 0): order 0 is the stream's own order (the seed-0 run, reused),
  orders 1..R−1 are random permutations. P[r, t] is the final accuracy on task t (after all tasks) under order r;
  OPD_t = max_r P[r, t] − min_r P[r, t], MOPD = max_t OPD_t, AOPD = mean_t OPD_t (HALRP paper Eq. 14, APD protocol).
"""
from __future__ import annotations

import importlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgecl.errors import UsageError

DEFAULT_METHODS = ("lps", "agscl", "halrp", "rgo", "finetune", "stl")
ARTIFACT_DIR = "artifacts"


@dataclass
class CompareSpec:
    """Everything one comparison needs; built by the CLI, usable from Python."""

    stream: str = "permuted-digits"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    orders: int = 0
    n_tasks: int | None = None
    arch: str = "mlp"
    epochs_scale: float = 1.0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    timing_repeats: int = 5
    progress: bool = True
    verbose: bool = False


# ---------------------------------------------------------------- input parsing (all errors are UsageError → exit 2)

def parse_seeds(text: str) -> list[int]:
    """'3' → seeds 0, 1, 2; '0,4,7' → exactly those seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text))) if int(text) >= 1 else []
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds expects a count ≥ 1 or a comma-separated list of distinct seeds ≥ 0, "
                         f"got {text!r}")
    return seeds


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names; an unknown name is an error (a known one that is not built is skipped later)."""
    from edgecl.train import registry

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("--methods is empty")
    unknown = [n for n in names if n not in registry.known()]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(map(repr, unknown))} (known: {', '.join(registry.known())})")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods names a method twice: {text!r}")
    return names


def parse_config_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """`METHOD.FIELD=VALUE` items (VALUE as JSON when it parses) → {method: {field: value}}."""
    from edgecl.commands.train import parse_overrides

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise UsageError(f"--config expects METHOD.FIELD=VALUE (e.g. lps.epochs=5), got {item!r}")
        if method not in methods:
            raise UsageError(f"--config {item!r}: method {method!r} is not among --methods ({', '.join(methods)})")
        out.setdefault(method, {}).update(parse_overrides([f"{name}={value}"]))
    return out


def split_available(methods: list[str]) -> tuple[list[str], dict[str, str]]:
    """(methods present in this build, {missing method: why it is skipped})."""
    from edgecl.train import registry

    present = set(registry.available())
    skipped = {m: f"method {m!r} is not available in this build (its module is missing)" for m in methods
               if m not in present}
    return [m for m in methods if m in present], skipped


def method_config(name: str, spec: CompareSpec, seed: int) -> dict[str, Any]:
    """The method's default config with `epochs` scaled by --epochs-scale (phases the method derives from `epochs`
    follow it; other explicit epoch fields stay), then the user's overrides and the seed. Validated here, before any
    training, so a bad override fails in the first second rather than after twenty minutes."""
    from edgecl.train import registry

    cls = registry.method_class(name)
    config = cls.Config().to_json()
    if spec.epochs_scale != 1.0 and isinstance(config.get("epochs"), int):
        config["epochs"] = max(1, round(config["epochs"] * spec.epochs_scale))
    config.update(spec.overrides.get(name, {}))
    config["seed"] = seed
    try:
        cls.Config.from_json(config)
    except UsageError as exc:
        raise UsageError(f"{name} config (after --epochs-scale {spec.epochs_scale} and --config): {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name} config: bad value ({exc})") from None
    return config


def check_spec(spec: CompareSpec) -> None:
    if not spec.seeds or min(spec.seeds) < 0:
        raise UsageError(f"seeds must be a non-empty list of integers ≥ 0, got {spec.seeds}")
    if spec.orders < 0 or spec.orders == 1:
        raise UsageError(f"--orders must be 0 (off) or ≥ 2 (task orders to compare), got {spec.orders}")
    if not (spec.epochs_scale > 0 and math.isfinite(spec.epochs_scale)):
        raise UsageError(f"--epochs-scale must be a positive number, got {spec.epochs_scale}")
    if spec.timing_repeats < 1:
        raise UsageError(f"--timing-repeats must be ≥ 1, got {spec.timing_repeats}")
    if spec.device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {spec.device!r}")
    if spec.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to torch")


# ---------------------------------------------------------------- metrics over runs

def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points that no other point dominates, by increasing cost. `points` maps a name to (cost, value),
    e.g. (artifact bytes, ACC): lower cost and higher value are better; a point is dominated when another has cost ≤
    and value ≥ with at least one strictly better. Points with a missing or NaN coordinate are left out."""
    ok = {n: (float(c), float(v)) for n, (c, v) in points.items()
          if c is not None and v is not None and not (math.isnan(c) or math.isnan(v))}
    front = [a for a, (ca, va) in ok.items()
             if not any(cb <= ca and vb >= va and (cb < ca or vb > va) for b, (cb, vb) in ok.items() if b != a)]
    return sorted(front, key=lambda n: (ok[n][0], -ok[n][1], n))


def opd(final_acc) -> np.ndarray:
    """OPD_t = max_r P[r, t] − min_r P[r, t] for P of shape (orders, tasks), P[r, t] the final accuracy on task t
    (indexed by task identity, not position) after learning all tasks in order r."""
    p = np.asarray(final_acc, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1 or np.isnan(p).any():
        raise UsageError(f"OPD needs a complete (orders × tasks) accuracy table, got shape {p.shape}")
    return p.max(axis=0) - p.min(axis=0)


def mopd(final_acc) -> float:
    """Maximum OPD over tasks."""
    return float(opd(final_acc).max())


def aopd(final_acc) -> float:
    """Average OPD over tasks."""
    return float(opd(final_acc).mean())


def task_orders(n_tasks: int, n_orders: int, seed: int = 0) -> list[list[int]]:
    """Order 0 is the stream's own; the rest are seeded random permutations, distinct while enough exist."""
    rng = np.random.default_rng(seed)
    orders = [list(range(n_tasks))]
    while len(orders) < n_orders:
        perm = rng.permutation(n_tasks).tolist()
        if perm not in orders or len(orders) >= math.factorial(n_tasks):
            orders.append(perm)
    return orders


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Spread over seeds of the scalar metrics, the mean accuracy matrix, and artifact bytes."""
    out: dict[str, Any] = {}
    for key in ("acc", "bwt", "forgetting", "train_seconds"):
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    n = len(runs[0]["acc_matrix"])
    out["acc_matrix_mean"] = [[float(np.mean([r["acc_matrix"][i][j] for r in runs])) for j in range(i + 1)]
                              for i in range(n)]
    sizes = [r["artifact_bytes"] for r in runs]
    firsts = [r["artifact_bytes_first_task"] for r in runs]
    out["artifact_bytes"] = float(np.mean(sizes))
    out["bytes_per_added_task"] = float(np.mean([(s - f) / (n - 1) for s, f in zip(sizes, firsts)])) if n > 1 else None
    return out


def load_stream(name: str, n_tasks: int | None, seed: int):
    """A built-in stream, or a stream file cut to its first `n_tasks` tasks (a file holds fixed data: there the seed
    changes only the methods' initialisation)."""
    from edgecl.train.data import Stream, make_stream

    stream = make_stream(name, n_tasks, seed)
    if n_tasks is not None and len(stream.tasks) != n_tasks:
        if len(stream.tasks) < n_tasks:
            raise UsageError(f"--tasks {n_tasks}: stream {name!r} has only {len(stream.tasks)} tasks")
        stream = Stream(stream.name, stream.input_shape, stream.tasks[:n_tasks])
    return stream


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


def optional_module(name: str) -> tuple[Any, str | None]:
    """(module, None) or (None, why) — for the pieces another part of the project provides."""
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        return None, f"{name} is not available ({exc})"


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
        run.update(artifact_bytes=os.path.getsize(artifact_path), artifact_bytes_first_task=os.path.getsize(first_path))
        os.remove(first_path)
    return run


def runtime_timing(path: str, stream, repeats: int) -> dict[str, Any]:
    """Median switch and batch-1 inference times through `TaskRuntime`, plus accuracy computed in the runtime."""
    runtime_mod, why = optional_module("edgecl.runtime")  # a training-only install has no onnxruntime
    if runtime_mod is None:
        return {"note": why}
    # A runtime failure on one method must not lose a long comparison: it is recorded, printed and shown in the table.
    try:
        rt = runtime_mod.TaskRuntime(path)
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


def run_compare(spec: CompareSpec, out_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, pack, time and compare; writes compare.json, compare.md and the PNGs into out_dir; returns the report."""
    from tqdm.auto import tqdm

    from edgecl import __version__
    from edgecl.arch import preset
    from edgecl.compare_report import write_report
    from edgecl.machine import machine_info
    from edgecl.train.engine import save_json

    check_spec(spec)
    methods, skipped = split_available(spec.methods)
    for reason in skipped.values():
        log(f"edgecl compare: skipping: {reason}")
    if not methods:
        raise UsageError(f"none of the requested methods is available: {'; '.join(skipped.values())}")
    streams = {seed: load_stream(spec.stream, spec.n_tasks, seed) for seed in spec.seeds}
    first = streams[spec.seeds[0]]
    if spec.orders and len(first.tasks) < 2:
        raise UsageError("--orders needs a stream with at least 2 tasks")
    arch = preset(spec.arch, first.input_shape)
    configs = {m: {seed: method_config(m, spec, seed) for seed in spec.seeds} for m in methods}
    os.makedirs(os.path.join(out_dir, ARTIFACT_DIR), exist_ok=True)

    report: dict[str, Any] = {
        "edgecl_version": __version__, "machine": machine_info(), "stream": first.name, "arch": spec.arch,
        "n_tasks": len(first.tasks), "task_names": [t.name for t in first.tasks], "seeds": spec.seeds,
        "orders": spec.orders, "epochs_scale": spec.epochs_scale, "overrides": spec.overrides,
        "methods": {}, "skipped": skipped}
    total = len(methods) * (len(spec.seeds) + max(spec.orders - 1, 0))
    started = time.perf_counter()
    with tqdm(total=total, desc="compare", unit="run", disable=not spec.progress, dynamic_ncols=True) as bar:
        done = [0]

        def step(line: str) -> None:
            done[0] += 1
            bar.update(1)
            (bar.write if spec.progress else log)(f"[compare {done[0]}/{total}] {line}")

        for name in methods:
            report["methods"][name] = compare_method(name, streams, arch, configs[name], spec, out_dir, step, log)
            save_json(report, os.path.join(out_dir, "compare.json"))  # partial results survive an interruption
    report["pareto_front"] = pareto_front({m: (e["artifact_bytes"], e["acc_mean"])
                                           for m, e in report["methods"].items()})
    report["wall_seconds"] = time.perf_counter() - started
    write_report(report, out_dir)
    save_json(report, os.path.join(out_dir, "compare.json"))
    return report
