"""One command that checks the torch-free runtime's device path on a GPU (issue 19) and writes one JSON.

    pip install -e '.[gpu]'                  # onnxruntime-gpu (CUDA 13 build) + CuPy (cupy-cuda13x); no torch needed
    python tools/gpu_check.py                # → tools/results/gpu_check_<gpu>.json (planned to finish in < 5 min)
    python tools/gpu_check.py --self-test    # no GPU: the same script on the device path's numpy twin (CI runs it)

Sections of the JSON, each with its goal and whether it was met:

1. ``parity`` — every delta kind (LPS element / row / column masks, node masks with segments and repeats, low rank on
   linear and conv layers, permutations, shared and per-task tensors) on the mlp / lenet / resnet presets and a graph
   with a residual add, a concatenation, a depthwise conv and an SE gate: `--switches` random switches with random
   batches on the device runtime against the CPU runtime, logits within 1e-4; after a switch to every task, each
   tensor the session reads equals `materialize` bit for bit (low rank: its max |Δ| is reported, cuBLAS rounds
   differently from the host BLAS; a weight-standardised conv's weight, standardised on the switch: within
   `STD_TOL` of numpy's standardisation of `materialize`).
2. ``switch`` — LPS on the 4.35 M-parameter MLP and on torchvision resnet18 (when torchvision imports; 3×32×32): a
   cache miss (one kernel launch over every masked tensor) against one device-to-device copy of the task's dense
   weights (goal ≤ 2×), the kernel's launch overhead (8 elements), and against creating a new CUDA session of the
   task from bytes (goal ≥ 100× faster).
3. ``inference`` — right after a switch (a miss), batch 1 and 64, input and output on the device, against a dense CUDA
   session of that task bound the same way, in the same switched order (goal ≤ 1.05×); without and with CUDA graphs.
4. ``memory`` — per model (the MLP, resnet18), the audit's predicted device bytes (the resident part of `edgecl
   audit --device cuda`, in a fresh process) against the GPU's measured increase in used memory (goal within 15 %),
   and the CUDA EP's fixed cost per session (a one-layer model) measured against `costs.CUDA_SESSION_FIXED`.

Times are medians of `--repeats`, each synchronised (a switch returns once its kernels have finished). In
``--self-test`` every section runs on the CPU with numpy standing in for the GPU and tiny sizes: it checks the script
and the device path's logic, and its timings are labelled as not GPU figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecl.arch import preset, validate  # noqa: E402
from edgecl.artifact import save  # noqa: E402
from edgecl.deltas import materialize  # noqa: E402
from edgecl.graph.builder import INPUT, OUTPUT, build_onnx  # noqa: E402
from edgecl.runtime import TaskRuntime  # noqa: E402
from edgecl.runtime import costs  # noqa: E402
from edgecl.runtime.device_arrays import backend_for  # noqa: E402
from edgecl.runtime.providers import resolve_providers, session_providers  # noqa: E402
from edgecl.synthetic import random_packed  # noqa: E402
from tools.gpu_parity import TOL, check_parity, parity_models  # noqa: E402

GOALS = {"parity_max_abs": TOL, "switch_vs_copy": 2.0, "new_session_vs_switch": 100.0, "infer_vs_dense": 1.05,
         "memory_relative_error": 0.15}
def median_ms(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of `fn` (synchronised after each call), after one untimed call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class DenseSession:
    """A dense per-task session on the device path's provider, input and output bound where the runtime's are."""

    def __init__(self, packed: Any, t: int, providers: list, arrays: Any, cuda_graph: bool):
        model = build_onnx(packed.arch, materialize(packed, t)).SerializeToString()
        self.session = ort.InferenceSession(model, providers=session_providers(providers, cuda_graph))
        self.arrays, self.n_classes, self.bound = arrays, packed.tasks[t].n_classes, {}
        self.cuda_graph = cuda_graph

    def run(self, x: Any) -> Any:
        n = x.shape[0]
        if n not in self.bound:  # fixed buffers per batch (what a CUDA graph needs)
            io, gx, out = self.session.io_binding(), self.arrays.empty(x.shape), self.arrays.empty((n, self.n_classes))
            for name, a in ((INPUT, gx), (OUTPUT, out)):
                bind = io.bind_input if name == INPUT else io.bind_output
                bind(name, self.arrays.device_type, self.arrays.device_id, np.float32, list(a.shape),
                     self.arrays.pointer(a))
            options = ort.RunOptions()
            if self.cuda_graph:
                options.add_run_config_entry("gpu_graph_id", str(len(self.bound) + 1))
            self.bound[n] = (io, gx, out, options)
        io, gx, out, options = self.bound[n]
        if self.cuda_graph:  # a replay reads the captured input buffer
            self.arrays.copy_into(gx, x)
            self.arrays.synchronize()
        else:  # bound where it lives, as the runtime binds a device batch (the 2026-11-30 H200 runs copied it)
            io.bind_input(INPUT, self.arrays.device_type, self.arrays.device_id, np.float32, list(x.shape),
                          self.arrays.pointer(x))
        self.session.run_with_iobinding(io, options)
        return out


def bench_model(label: str, packed: Any, kw: dict, providers: list, repeats: int) -> dict:
    """Switch, new-session and inference timings of one LPS model (3 tasks)."""
    arrays = backend_for(kw.get("device", "cpu"))
    sync = arrays.synchronize
    dense = materialize(packed, 0)
    n_dense = sum(a.size for a in dense.values())
    src, dst = arrays.zeros(n_dense), arrays.zeros(n_dense)
    copy_ms = median_ms(lambda: arrays.xp.copyto(dst, src), repeats, sync)
    tiny = (arrays.upload(np.ones(8, np.float32)), arrays.upload(np.full(1, 255, np.uint8)), arrays.zeros(8))
    launch_ms = median_ms(lambda: arrays.masked_select(*tiny), repeats, sync)
    model_bytes = build_onnx(packed.arch, dense).SerializeToString()
    new_session_ms = median_ms(lambda: ort.InferenceSession(model_bytes, providers=session_providers(providers)),
                               max(3, repeats // 10), sync)
    runtime = TaskRuntime(packed, cache_tasks=1, **kw)
    order = iter(range(10 ** 9))
    switch_ms = median_ms(lambda: runtime.switch(next(order) % packed.n_tasks), repeats, sync)  # every call a miss
    runtime.close()
    out = {"model": label, "dense_params": int(n_dense), "switch_ms": switch_ms,
           "copy_dense_ms": copy_ms, "kernel_launch_ms": launch_ms, "new_session_ms": new_session_ms,
           "switch_vs_copy": switch_ms / copy_ms, "new_session_vs_switch": new_session_ms / switch_ms,
           "inference": {}}
    for cuda_graph in (False, True):
        out["inference"]["cuda_graph" if cuda_graph else "plain"] = bench_inference(packed, kw, providers, arrays,
                                                                                    cuda_graph, repeats)
    return out


def bench_inference(packed: Any, kw: dict, providers: list, arrays: Any, cuda_graph: bool, repeats: int) -> dict:
    """Inference right after a switch against dense sessions of the same tasks, in the same order, at batch 1 / 64."""
    runtime = TaskRuntime(packed, cache_tasks=1, cuda_graph=cuda_graph, **kw)
    dense = [DenseSession(packed, t, providers, arrays, cuda_graph) for t in range(packed.n_tasks)]
    out = {}
    for batch in (1, 64):
        x = arrays.upload(np.random.default_rng(batch).standard_normal(
            (batch, *packed.arch["input_shape"])).astype(np.float32))
        times: dict[str, list[float]] = {"runtime": [], "unchecked": [], "dense": []}
        for i in range(repeats + packed.n_tasks):  # the first round warms every (task, batch)
            t = i % packed.n_tasks
            runtime.switch(t)
            # "unchecked": the runtime's session run alone, without `infer`'s input and output checks (finite, shape),
            # measured after the first call: where the time over the dense session goes
            for name, run in (("runtime", lambda: runtime.infer(x, task=t, on_device=True)),
                              ("unchecked", lambda: runtime._strategy.run(t, x)),
                              ("dense", lambda: dense[t].run(x))):
                start = time.perf_counter()
                run()
                arrays.synchronize()
                if i >= packed.n_tasks:
                    times[name].append(time.perf_counter() - start)
        got, want = arrays.to_host(runtime.infer(x, task=0, on_device=True)), arrays.to_host(dense[0].run(x))
        runtime_ms, unchecked_ms, dense_ms = (1e3 * statistics.median(v) for v in times.values())
        out[f"batch {batch}"] = {"runtime_ms": runtime_ms, "dense_ms": dense_ms, "ratio": runtime_ms / dense_ms,
                                 "unchecked_ms": unchecked_ms,
                                 "max_abs_logits": float(np.abs(got - want).max())}
    runtime.close()
    return out


AUDIT = ("import json, sys\n"
         "from edgecl.runtime.audit import resident_audit\n"
         "print(json.dumps(resident_audit(sys.argv[1], batch=64, device=sys.argv[2], resident='device')['device'], "
         "default=str))")


def audit_in_fresh_process(packed: Any, device: str, folder: Path) -> dict:
    """The resident part of `edgecl audit ART --device DEVICE --batch 64` (the function the command calls), run in a
    fresh process as a user runs it: a CUDA context, cuBLAS and cuDNN loaded by that process alone, so the increase
    it measures is what a runtime costs on its own."""
    path = folder / f"model{len(list(folder.iterdir()))}.edgecl"
    save(packed, path)
    done = subprocess.run([sys.executable, "-c", AUDIT, str(path), device], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the audit process failed (exit {done.returncode}): {done.stderr.strip()[-1200:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_memory(models: list[tuple[str, Any]], kw: dict, providers: list) -> dict:
    """Per model, the audit's predicted device bytes against the GPU's measured increase (goal within 15 %), and
    the CUDA EP's fixed cost per session measured here with a one-layer model, to show how much of the prediction
    is that constant (`costs.CUDA_SESSION_FIXED`). Run first, with CuPy's pool emptied: memory cached by earlier
    sections would hide new allocations."""
    device = kw.get("device", "cpu")
    arrays = backend_for(device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, packed in models:
            report = audit_in_fresh_process(packed, device, Path(folder))
            rows.append({"model": label, "predicted": report["predicted"],
                         "predicted_total": report["predicted_total"],
                         "measured_increase": report["measured_increase"],
                         "relative_error": report["relative_error"]})
    gc.collect()
    if device == "cuda":
        arrays.cupy.get_default_memory_pool().free_all_blocks()
    tiny = random_packed(validate({"name": "tiny", "input_shape": [4], "layers": [
        {"op": "linear", "name": "l", "in": 4, "out": 4}]}), n_tasks=1, shape="finetune")
    before = arrays.used_bytes()
    session = DenseSession(tiny, 0, providers, arrays, False)
    session.run(arrays.upload(np.zeros((1, 4), np.float32)))
    after = arrays.used_bytes()
    fixed = None if before is None else after - before
    for row in rows:  # the prediction's model-dependent part against the measured increase less the fixed cost
        constant = row["predicted"].get("device CUDA EP session", 0)
        rest = None if row["measured_increase"] is None or fixed is None else row["measured_increase"] - fixed
        row["relative_error_without_fixed"] = None if not rest else (row["predicted_total"] - constant - rest) / rest
    return {"models": rows, "session_fixed_bytes": fixed, "session_fixed_predicted": costs.CUDA_SESSION_FIXED}


def resnet18() -> tuple[dict | None, str | None]:
    try:
        from edgecl.arch.factories import resolve_arch

        return resolve_arch("torchvision.models:resnet18", (3, 32, 32)), None
    except Exception as exc:  # noqa: BLE001 - torch/torchvision absent on a GPU image: reported, the rest runs
        return None, f"skipped: {type(exc).__name__}: {str(exc)[:200]}"


def environment(kw: dict) -> dict:
    env = {"python": platform.python_version(), "onnxruntime": ort.__version__,
           "providers": ort.get_available_providers(), "numpy": np.__version__, "device": kw.get("device", "cpu")}
    if kw.get("device") == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        env.update(cupy=cupy.__version__, gpu=props["name"].decode(), driver=cupy.cuda.runtime.driverGetVersion(),
                   cuda_runtime=cupy.cuda.runtime.runtimeGetVersion())
    return env


SECTIONS = ("memory", "parity", "switch")  # memory first: memory cached by the others would hide new allocations


def log(message: str) -> None:
    print(message, flush=True)


def failure(exc: BaseException) -> str:
    """The exception and the end of its traceback: a first run on a new GPU must say where it broke."""
    return f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=-4)[-1500:]}"


def isolated(label: str, run: Callable[[], dict], before: float | None) -> dict:
    """One model's check: an exception or the deadline is recorded for that model and the next one runs."""
    if before is not None and time.perf_counter() > before:
        log(f"  {label}: not run (deadline)")
        return {"model": label, "ok": False, "error": "not run: the deadline had passed"}
    started = time.perf_counter()
    try:
        row = run()
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the other models still run
        row = {"model": label, "ok": False, "error": failure(exc)}
    on_cpu = row.get("placement", {}).get("CPUExecutionProvider") if len(row.get("placement", {})) > 1 else None
    log(f"  {label}: {'ok' if row.get('ok', 'error' not in row) else 'FAILED'} ({time.perf_counter() - started:.1f} s)"
        + (f" {row['error'][:300]}" if "error" in row else "") + (f"; ops on the CPU EP: {on_cpu}" if on_cpu else ""))
    return row


def run_section(name: str, quick: bool, kw: dict, providers: list, switches: int, repeats: int,
                deadline: float | None) -> Any:
    width = 1 if quick else 8  # width 8: the 4.35 M-parameter MLP of tools/bench_switch.py
    if name == "memory":
        models = [(f"MLP width {width} (lps)", preset("mlp", width=width))]
        arch = None if quick else resnet18()[0]
        models += [("torchvision resnet18 3x32x32 (lps)", arch)] if arch else []
        return check_memory([(label, random_packed(a, n_tasks=3, shape="lps")) for label, a in models], kw,
                            providers)
    if name == "parity":  # stops starting models at 60 % of the deadline: the timings still get their turn
        cutoff = None if deadline is None else time.perf_counter() + 0.6 * (deadline - time.perf_counter())
        return [isolated(label, lambda: check_parity(label, packed, kw, switches, seed), cutoff)
                for seed, (label, packed) in enumerate(parity_models(quick))]
    bench = [(f"MLP width {width} (lps)", preset("mlp", width=width))]
    arch, why = (None, "skipped in the self-test") if quick else resnet18()
    bench += [("torchvision resnet18 3x32x32 (lps)", arch)] if arch else [("torchvision resnet18 3x32x32 (lps)", why)]
    return [isolated(label, lambda: bench_model(label, random_packed(a, n_tasks=3, shape="lps"), kw, providers,
                                                repeats), deadline)
            if isinstance(a, dict) else {"model": label, "skipped": a} for label, a in bench]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--self-test", action="store_true", help="on the CPU with the numpy twin, tiny sizes (CI)")
    p.add_argument("--switches", type=int, default=None, help="random switches per parity model (300; self-test 40)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (50; self-test 3)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, comma-separated ({','.join(SECTIONS)})")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no new model is started (GPU: 240, so the check ends inside 5 min; "
                        "self-test: none)")
    p.add_argument("--out", default=None, help="JSON path (default tools/results/gpu_check_<gpu>.json); written "
                                               "after every section, so a run cut short keeps what it measured")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        p.error(f"--only: unknown section(s) {unknown or sections} (known: {', '.join(SECTIONS)})")
    quick = args.self_test
    kw = {"device": "cpu", "resident": "device"} if quick else {"device": "cuda"}
    switches, repeats = args.switches or (40 if quick else 300), args.repeats or (3 if quick else 50)
    started = time.perf_counter()
    seconds = args.deadline if args.deadline is not None else None if quick else 240.0
    deadline = None if seconds is None else started + seconds
    result: dict[str, Any] = {"self_test": quick, "goals": GOALS, "sections": sections,
                              "note": "CPU twin (numpy as the device): checks the logic; timings are not GPU figures"
                              if quick else "measured on the GPU by this script"}
    try:
        providers = resolve_providers("auto", kw["device"])
        result["environment"] = environment(kw)
        log(f"environment: {json.dumps(result['environment'])}")
    except Exception as exc:  # noqa: BLE001 - the JSON says what is missing; exit 2
        result["error"] = f"{type(exc).__name__}: {exc}"
    gpu = result.get("environment", {}).get("gpu", "cpu_selftest" if quick else "unknown")
    out = Path(args.out) if args.out else \
        ROOT / "tools" / "results" / f"gpu_check_{re.sub(r'[^a-z0-9]+', '_', gpu.lower())}.json"
    for name in sections if "error" not in result else ():
        if deadline is not None and time.perf_counter() > deadline:
            result.setdefault("errors", {})[name] = "not run: the deadline had passed"
            continue
        log(f"{name} ...")
        try:
            result[name] = run_section(name, quick, kw, providers, switches, repeats, deadline)
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            result.setdefault("errors", {})[name] = failure(exc)
            log(f"  {name} FAILED: {result['errors'][name][:500]}")
        write(out, result, started)
    write(out, result, started)
    print(json.dumps(result["verdict"], indent=2))
    print(f"written {out} in {result['seconds']:.0f} s")
    failed = "error" in result or result.get("errors") or any(
        "error" in row for name in ("parity", "switch") for row in result.get(name, []))
    return 2 if failed else 0 if all(v is not False for v in result["verdict"].values()) else 1


def write(out: Path, result: dict, started: float) -> None:
    result["seconds"] = time.perf_counter() - started
    result["verdict"] = verdict(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(result, indent=2, default=str))
    partial.replace(out)


def verdict(result: dict) -> dict:
    """Each goal: met (True), missed or broken (False), or not measured (None: a section not run, or the
    self-test's CPU timings, which are no GPU's)."""
    if "error" in result:
        return {"error": False}
    parity = None if "parity" not in result else all(r["ok"] for r in result["parity"])
    if result["self_test"]:
        return {"parity": parity, "switch_vs_copy": None, "new_session_vs_switch": None, "infer_vs_dense": None,
                "memory": None}
    rows = [s for s in result.get("switch", []) if "skipped" not in s]
    measured = [s for s in rows if "error" not in s]

    def goal(holds: Callable[[dict], bool]) -> bool | None:
        return None if not rows else len(measured) == len(rows) and all(holds(s) for s in measured)

    errors = [row["relative_error"] for row in result["memory"]["models"]] if "memory" in result else []
    return {"parity": parity,
            "switch_vs_copy": goal(lambda s: s["switch_vs_copy"] <= GOALS["switch_vs_copy"]),
            "new_session_vs_switch": goal(lambda s: s["new_session_vs_switch"] >= GOALS["new_session_vs_switch"]),
            "infer_vs_dense": goal(lambda s: all(b["ratio"] <= GOALS["infer_vs_dense"]
                                                 for mode in s["inference"].values() for b in mode.values())),
            "memory": None if not errors else all(e is not None and abs(e) <= GOALS["memory_relative_error"]
                                                  for e in errors)}


if __name__ == "__main__":
    sys.exit(main())
