"""Does a runtime built with budget B stay under B? (issue 17, item 10)

    python tools/bench_budget.py [--factors 0.8,1.0,1.2,1.5,2.0] [--batch 64] [--out tools/results/bench_budget.json]

For each model (synthetic, saved as artifacts: element-wise LPS on the default MLP with 10 tasks, the demo's shape;
LPS on the ResNet preset with 5 tasks) and each strategy (`inplace`, `sessions`):

1. `edgecl audit --strategy S --batch 64` in a fresh process gives "needed" (what the runtime will hold: every task
   under `sessions`, every cache slot in place, each having served a batch);
2. for each factor f, a fresh process builds `TaskRuntime(path, budget=f × needed, strategy=S, max_batch=64)`, runs
   every task at batch 64 (twice, in order), and reports either the refusal (`BudgetError`, with the RSS increase
   and peak RSS increase up to the refusal: "before allocation" means nothing model-sized was allocated) or the
   RSS increase after serving, and the peak RSS increase (VmHWM, reset after start-up imports).

The acceptance: every case is refused before the allocation that would exceed B (before any tensor is read when
the manifest already shows the budget cannot hold the model; per-task sessions, whose compacted size is known only
once built, may be refused part way, with the peak still ≤ B), or its measured RSS increase is ≤ B. Prints a table
and writes JSON with the machine and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's edgecl, whatever is installed

CHILD = """
import gc, json, sys
import numpy as np
import onnxruntime
from edgecl.errors import BudgetError
from edgecl.runtime import TaskRuntime
from edgecl.runtime.process_memory import process_rss, return_free_heap

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

path, budget, strategy, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(0)  # numpy.random loads lazily (2.6 MB): the caller's, not the runtime's
process_rss()
gc.collect()
return_free_heap()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak to the current RSS
    f.write("5")
before, before_peak = process_rss(), peak()
out = {"budget": budget}
try:
    rt = TaskRuntime(path, budget=budget, strategy=strategy, max_batch=batch)
except BudgetError as exc:
    out.update(refused=True, error=str(exc)[:300])
else:
    x = rng.random((batch, *rt.input_shape), np.float32)
    for _ in range(2):
        for t in range(rt.n_tasks):
            rt.infer(x, task=t)
    out.update(refused=False, strategy=rt.strategy, slots=rt.n_slots, ledger=dict(rt.ledger.items),
               ledger_total=rt.ledger.used)
gc.collect()
out.update(rss_increase=process_rss() - before, peak_increase=peak() - before_peak)
print(json.dumps(out))
"""


def _run(args: list[str], env: dict) -> dict:
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, cwd=tempfile.gettempdir())
    if done.returncode not in (0, 1):
        raise SystemExit(f"{args[:4]}: {done.stderr[-3000:]}")
    return json.loads(done.stdout)


def artifacts(folder: Path) -> dict[str, str]:
    from edgecl import artifact
    from edgecl.arch import preset
    from edgecl.synthetic import random_packed

    models = {"LPS MLP, 10 tasks": (preset("mlp"), 10), "LPS ResNet, 5 tasks": (preset("resnet"), 5)}
    paths = {}
    for name, (arch, n) in models.items():
        path = folder / (name.split(",")[0].replace(" ", "_").lower() + ".edgecl")
        artifact.save(random_packed(arch, n, "lps"), path)
        paths[name] = str(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", default="0.8,1.0,1.2,1.5,2.0")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--strategies", default="inplace,sessions")
    parser.add_argument("--tree", default=str(ROOT), help="the code to measure (another checkout, e.g. the code "
                                                          "before a change: `git archive REV | tar -x -C DIR`)")
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                        help="also measure this artifact (e.g. the demo's trained model)")
    parser.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_budget.json"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": args.tree, "OMP_NUM_THREADS": "1"}
    factors = [float(f) for f in args.factors.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {**artifacts(Path(tmp)), **dict(a.split("=", 1) for a in args.artifact)}
        for model, path in models.items():
            for strategy in args.strategies.split(","):
                choice = [] if strategy == "inplace" else ["--strategy", strategy]  # older trees audit in place only
                report = _run([sys.executable, "-m", "edgecl.cli", "audit", path, "--budget", "8GiB", "--batch",
                               str(args.batch), *choice, "--json"], env)
                needed = report["needed"]
                for f in factors:
                    budget = int(f * needed)
                    got = _run([sys.executable, "-c", CHILD, path, str(budget), strategy, str(args.batch)], env)
                    ok = got["peak_increase"] <= budget if got["refused"] else got["rss_increase"] <= budget
                    got["before_reading"] = got["refused"] and "before reading any tensor" in got["error"]
                    rows.append({"model": model, "strategy": strategy, "needed": needed, "factor": f, **got, "ok": ok})
                    print(_line(rows[-1]), flush=True)
    from edgecl.machine import machine_info

    result = {"machine": machine_info(), "python": platform.python_version(), "versions": _versions(),
              "tree": args.tree, "batch": args.batch, "rows": rows, "all_ok": all(r["ok"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"all cases refused before allocation or within budget: {result['all_ok']}; wrote {args.out}")
    return 0 if result["all_ok"] else 1


def _line(r: dict) -> str:
    mb = 1e6
    outcome = ("refused before reading" if r["before_reading"] else "refused") if r["refused"] else \
        f"RSS +{r['rss_increase'] / mb:.2f} MB ({r['rss_increase'] / r['budget']:.0%} of B)"
    return (f"{r['model']:<20} {r['strategy']:<8} {r['factor']:.1f}× needed = {r['budget'] / mb:6.2f} MB: {outcome}, "
            f"peak +{r['peak_increase'] / mb:.2f} MB ({r['peak_increase'] / r['budget']:.0%}) "
            f"{'ok' if r['ok'] else 'OVER'}")


def _versions() -> dict:
    import numpy
    import onnxruntime

    return {"numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    sys.exit(main())
