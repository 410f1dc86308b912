"""`edgecl demo`: the whole product on the embedded default — LPS learns 10 permuted-digit tasks, the model is packed
into one artifact, exported to per-task ONNX, then loaded torch-free in the runtime, which switches through every task
and must reproduce the training-side accuracy; ends with the memory budget summary."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--tasks", type=int, default=10, help="number of permuted-digit tasks (default 10)")
    p.add_argument("--budget", default="32MiB", help="memory budget for the summary (default 32MiB)")
    p.add_argument("--no-progress", action="store_true")
    from edgecl.commands.train import add_threads_argument

    add_threads_argument(p)


def main(args: argparse.Namespace) -> int:
    from edgecl.commands.train import ARTIFACT_NAME, set_threads, train_and_write
    from edgecl.train.methods.lps import DEMO_CONFIG

    set_threads(args.threads)
    start = time.perf_counter()
    print("== 1/4 train: LPS on permuted-digits (learn, prune, share) ==")
    results = train_and_write("lps", "permuted-digits", args.out, n_tasks=args.tasks, overrides=DEMO_CONFIG,
                              progress=not args.no_progress)
    path = os.path.join(args.out, ARTIFACT_NAME)
    print(f"\n== 2/4 pack: {path} ==")
    from edgecl.artifact import inspect
    from edgecl.commands.inspect import format_report

    print(format_report(inspect(path)))
    print("\n== 3/4 export: per-task ONNX ==")
    from edgecl.export import export_onnx

    index = export_onnx(path, os.path.join(args.out, "onnx"), progress=not args.no_progress)
    print(f"wrote {len(index['tasks'])} task graphs to {os.path.join(args.out, 'onnx')}")
    print("\n== 4/4 run on the device side (edgecl.runtime, no torch) ==")
    ok = run_on_runtime(path, results, args.tasks, args.budget)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; results in {args.out}/")
    return 0 if ok else 1


def run_on_runtime(path: str, results: dict, n_tasks: int, budget: str) -> bool:
    """Switch through every task in the runtime and compare its test accuracy with the training side's."""
    from edgecl.runtime import TaskRuntime
    from edgecl.train.data import make_stream

    stream = make_stream("permuted-digits", n_tasks)
    final = results["acc_matrix"][-1]
    rt = TaskRuntime(path, budget=budget)
    print(f"runtime: strategy {rt.strategy!r} on {', '.join(rt.providers)} within {budget}")
    ok = True
    print(f"{'task':>6} {'train-side':>10} {'runtime':>8} {'switch ms':>9}")
    for t, task in enumerate(stream.tasks):
        t0 = time.perf_counter()
        rt.switch(t)
        switch_ms = 1000 * (time.perf_counter() - t0)
        pred = rt.infer(task.x_test).argmax(1)
        acc = float(np.mean(pred == task.y_test))
        same = abs(acc - final[t]) < 1e-9
        ok &= same
        print(f"{t:>6} {100 * final[t]:>9.2f}% {100 * acc:>7.2f}% {switch_ms:>9.2f}{'' if same else '  MISMATCH'}")
    print("runtime accuracy equals training-side accuracy on every task" if ok else
          "runtime accuracy differs from training on some task")
    print(f"\n$ edgecl audit {path} --budget {budget}   (a fresh process, so resident memory is measured cleanly)")
    audit = subprocess.run([sys.executable, "-m", "edgecl.cli", "audit", path, "--budget", budget],
                           capture_output=True, text=True)
    print((audit.stdout + audit.stderr).rstrip())
    return ok and audit.returncode == 0
