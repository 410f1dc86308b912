"""Peak memory of the in-place runtime's start-up with switched convolutions blocked (`edgecl.runtime.blocked_convs`:
ONNX Runtime optimises the graph twice; its models and placeholders live only during start-up, so the ledger and the
audit, which count what stays, do not see them) against the same runtime unblocked.

    python tools/bench_startup_peak.py ARTIFACT [ARTIFACT ...] [--repeats 2] [--baseline-tree /tmp/edgecl-old] \
        [--out tools/results/bench_startup_peak.json]

Each variant is built in a fresh process (a peak is per process): `TaskRuntime(path, strategy="inplace",
cache_tasks=1, threads=1, blocked_convs=...)`. Reported: the peak RSS increase while it is built (ru_maxrss after,
less the larger of RSS and ru_maxrss before), the RSS increase once built, and blocked ÷ unblocked of the peak,
median over repeats; per code tree (this one, and with `--baseline-tree` a checkout of another commit, e.g.
`git archive HEAD~1 | tar -x -C /tmp/edgecl-old`, its compiled fill copied in)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys
from edgecl.runtime import TaskRuntime
from edgecl.runtime.process_memory import process_rss
rss0, peak0 = process_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
r = TaskRuntime(sys.argv[1], strategy="inplace", cache_tasks=1, threads=1, blocked_convs=sys.argv[2] == "1")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_increase": peak - max(rss0, peak0), "rss_increase": process_rss() - rss0,
                  "convs_blocked": len(r._strategy.blocked_convs)}))
"""


def measure(tree: Path, path: str, blocked: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, path, "1" if blocked else "0"], env=env, cwd=tree,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--baseline-tree", help="a checkout of the code to compare with (its root folder)")
    p.add_argument("--out", default="bench_startup_peak.json")
    args = p.parse_args()
    from edgecl.machine import machine_info

    trees = {"now": ROOT, **({"baseline": Path(args.baseline_tree).resolve()} if args.baseline_tree else {})}
    rows = []
    for path in args.artifacts:
        for label, tree in trees.items():
            runs = {on: [measure(tree, str(Path(path).resolve()), on) for _ in range(args.repeats)]
                    for on in (False, True)}
            row = {"artifact": path, "tree": label, "convs_blocked": runs[True][0]["convs_blocked"]}
            for on, key in ((True, "blocked"), (False, "unblocked")):
                for k in ("peak_increase", "rss_increase"):
                    row[f"{key}_{k}_mb"] = statistics.median(r[k] for r in runs[on]) / 1e6
            row["peak_ratio"] = row["blocked_peak_increase_mb"] / row["unblocked_peak_increase_mb"]
            print(row)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
