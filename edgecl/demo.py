"""The whole product on the embedded default, as one call (`edgecl demo`): LPS learns permuted-digit tasks, the model
is packed into one artifact, exported to per-task ONNX, then loaded torch-free in the runtime, which switches through
every task and must reproduce the training-side accuracy; ends with the memory budget audit in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

STREAM = "permuted-digits"


def run_demo(out_dir: str = "demo-out", n_tasks: int = 10, budget: str = "32MiB", *, progress: bool = True,
             threads: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Train, pack, export, run and audit; True when the runtime reproduced every task and the audit fits.
    `threads`: torch CPU threads for training (None leaves torch's setting; the command passes its --threads)."""
    from edgecl.artifact import inspect
    from edgecl.export import export_onnx
    from edgecl.inspect_report import format_report
    from edgecl.train.methods.lps_config import DEMO_CONFIG
    from edgecl.train.pipeline import ARTIFACT_NAME, train_and_write
    from edgecl.runtime.budget import parse_budget

    parse_budget(budget)  # a malformed budget is refused before a minute of training, not after
    start = time.perf_counter()
    log("== 1/4 train: LPS on permuted-digits (learn, prune, share) ==")
    results = train_and_write("lps", STREAM, out_dir, n_tasks=n_tasks, overrides=DEMO_CONFIG, threads=threads,
                              progress=progress, log=log)
    path = os.path.join(out_dir, ARTIFACT_NAME)
    log(f"\n== 2/4 pack: {path} ==")
    log(format_report(inspect(path)))
    log("\n== 3/4 export: per-task ONNX ==")
    index = export_onnx(path, os.path.join(out_dir, "onnx"), progress=progress)
    log(f"wrote {len(index['tasks'])} task graphs to {os.path.join(out_dir, 'onnx')}")
    log("\n== 4/4 run on the device side (edgecl.runtime, no torch) ==")
    ok = run_on_runtime(path, results, n_tasks, budget, log)
    log(f"\ndemo finished in {time.perf_counter() - start:.0f} s; results in {out_dir}/")
    return ok


def run_on_runtime(path: str, results: dict[str, Any], n_tasks: int, budget: str,
                   log: Callable[[str], None] = print) -> bool:
    """Switch through every task in the runtime and compare its test accuracy with the training side's, then audit
    the artifact in a fresh process (so resident memory is measured cleanly)."""
    from edgecl.errors import BudgetError
    from edgecl.runtime import TaskRuntime
    from edgecl.train.data import make_stream

    stream = make_stream(STREAM, n_tasks)
    final = results["acc_matrix"][-1]
    try:
        rt = TaskRuntime(path, budget=budget)
        log(f"runtime: strategy {rt.strategy!r} on {', '.join(rt.providers)} within {budget}")
    except BudgetError as exc:  # the replay still checks every task; the audit below says what would fit
        log(f"runtime: {exc}\nruntime: replaying the tasks without a budget")
        rt = TaskRuntime(path)
    ok = True
    log(f"{'task':>6} {'train-side':>10} {'runtime':>8} {'switch ms':>9}")
    for t, task in enumerate(stream.tasks):
        t0 = time.perf_counter()
        rt.switch(t)
        switch_ms = 1000 * (time.perf_counter() - t0)
        pred = rt.infer(task.x_test).argmax(1)
        acc = float(np.mean(pred == task.y_test))
        same = abs(acc - final[t]) < 1e-9
        ok &= same
        log(f"{t:>6} {100 * final[t]:>9.2f}% {100 * acc:>7.2f}% {switch_ms:>9.2f}{'' if same else '  MISMATCH'}")
    log("runtime accuracy equals training-side accuracy on every task" if ok else
        "runtime accuracy differs from training on some task")
    log(f"\n$ edgecl audit {path} --budget {budget}   (a fresh process, so resident memory is measured cleanly)")
    audit = subprocess.run([sys.executable, "-m", "edgecl.cli", "audit", path, "--budget", budget],
                           capture_output=True, text=True)
    log((audit.stdout + audit.stderr).rstrip())
    return ok and audit.returncode == 0
