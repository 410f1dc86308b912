"""Resident memory of the in-place runtime's model: what `TaskRuntime` keeps of an artifact once it is serving.

    python tools/bench_runtime_memory.py [--tasks 10,20,40] [--artifact demo/model.edgecl]
        [--baseline-tree /tmp/edgecl-old] [--out tools/results/bench_runtime_memory.json]

For synthetic element-wise LPS models of the default MLP (`random_packed(preset("mlp"), n, "lps")`, saved as
artifacts) and any `--artifact` given, each measured in a fresh process per code tree (this one, and with
`--baseline-tree` a checkout of another commit, e.g. `git archive 16eb0c6 | tar -x -C /tmp/edgecl-old`):

- the ledger's "model tensors" and "task masks" items (what the runtime says it keeps of the model; the memory
  audit reports the same numbers), their sum = resident model bytes;
- the numpy heap the runtime holds once built (tracemalloc, in a second fresh process: every numpy array is traced),
  minus its one cache slot — an independent count of the same bytes;
- the process's RSS increase while the runtime is built and serves one batch (includes ONNX Runtime itself), and
  the audit's error: (the whole ledger − that increase) / that increase, what `edgecl audit` reports.

Every runtime is `strategy="inplace", cache_tasks=1`, batch 8, as `edgecl audit` builds it. Prints a table and
writes JSON with the machine and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import gc, json, sys, tracemalloc
import numpy as np
import edgecl.artifact  # code, imported before anything is measured
from edgecl.runtime import TaskRuntime
from edgecl.runtime.audit import process_rss

path, traced = sys.argv[1], sys.argv[2] == "traced"
process_rss()  # imports psutil: code, not model
gc.collect()
if traced:
    tracemalloc.start()
before = process_rss()
runtime = TaskRuntime(path, strategy="inplace", cache_tasks=1, max_batch=8, charge_environment=True)
runtime.infer(np.zeros((8, *runtime.input_shape), np.float32), task=0)
gc.collect()
print(json.dumps({"ledger": runtime.ledger.items, "rss_increase": process_rss() - before,
                  "numpy_heap": tracemalloc.get_traced_memory()[0] if traced else None}))
"""


def measure(tree: Path, path: str) -> dict:
    """Both child runs (RSS without tracing, heap with it) of one artifact under one code tree."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    runs = {}
    for mode in ("rss", "traced"):
        done = subprocess.run([sys.executable, "-c", CHILD, path, mode], capture_output=True, text=True, env=env,
                              timeout=600, cwd=tempfile.gettempdir())
        if done.returncode:
            raise SystemExit(f"{tree} on {path}: {done.stderr[-2000:]}")
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    ledger = runs["rss"]["ledger"]
    model, masks = ledger.get("model tensors", 0), ledger.get("task masks", 0)
    rss = runs["rss"]["rss_increase"]
    return {"model_tensors": model, "task_masks": masks, "resident_model_bytes": model + masks,
            "numpy_heap_minus_slot": runs["traced"]["numpy_heap"] - ledger.get("cache slot 0", 0),
            "rss_increase": rss, "audit_error": (sum(ledger.values()) - rss) / rss, "ledger": ledger}


WRITER = """
import sys
from edgecl import artifact
from edgecl.arch import preset
from edgecl.synthetic import random_packed
n, path = int(sys.argv[1]), sys.argv[2]
artifact.save(random_packed(preset("mlp"), n, "lps"), path)
"""


def synthetic_artifacts(counts: list[int], folder: Path, tree: Path) -> dict[str, str]:
    """The synthetic models, written by the code in `tree` (the baseline's when there is one: today's code reads the
    older format, while the older code may not read today's)."""
    paths = {}
    for n in counts:
        path = folder / f"lps_mlp_{n}tasks.edgecl"
        subprocess.run([sys.executable, "-c", WRITER, str(n), str(path)], check=True, cwd=tree,
                       env={**os.environ, "PYTHONPATH": str(tree)})
        paths[f"synthetic LPS, {n} tasks"] = str(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="10,20,40", help="task counts of the synthetic LPS models")
    parser.add_argument("--artifact", action="append", default=[], help="also measure this artifact (repeatable)")
    parser.add_argument("--baseline-tree", help="a checkout of the code to compare with (its root folder)")
    parser.add_argument("--out", default="tools/results/bench_runtime_memory.json")
    args = parser.parse_args()
    from edgecl.machine import machine_info

    trees = {"now": ROOT, **({"baseline": Path(args.baseline_tree).resolve()} if args.baseline_tree else {})}
    with tempfile.TemporaryDirectory() as folder:
        models = synthetic_artifacts([int(n) for n in args.tasks.split(",") if n], Path(folder),
                                     trees.get("baseline", ROOT))
        models.update({f"artifact {Path(p).parent.name}/{Path(p).name}": p for p in args.artifact})
        rows = [{"model": name, "file_bytes": os.path.getsize(path),
                 **{label: measure(tree, path) for label, tree in trees.items()}} for name, path in models.items()]
    print(f"{'model':<28} {'tree':<9} {'model tensors':>13} {'task masks':>10} {'resident':>10} "
          f"{'numpy heap':>10} {'RSS incr.':>10} {'audit':>7}")
    for row in rows:
        for label in trees:
            m = row[label]
            print(f"{row['model']:<28} {label:<9} {m['model_tensors']:>13,} {m['task_masks']:>10,} "
                  f"{m['resident_model_bytes']:>10,} {m['numpy_heap_minus_slot']:>10,} {m['rss_increase']:>10,} "
                  f"{m['audit_error']:>+7.1%}")
        if "baseline" in row:
            row["baseline_over_now"] = {key: row["baseline"][key] / max(1, row["now"][key]) for key in
                                        ("model_tensors", "resident_model_bytes", "numpy_heap_minus_slot",
                                         "rss_increase")}
            print(f"{'':<28} {'ratio':<9} " + "  ".join(f"{k} {v:.2f}x" for k, v in row["baseline_over_now"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "args": vars(args), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
