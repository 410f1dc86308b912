"""Start-up of the in-place runtime with switched convolutions blocked (`edgecl.runtime.blocked_convs`: two ONNX
Runtime optimisations of the graph, keep bits reordered) against the same runtime with them left graph inputs.

    python tools/bench_startup.py ARTIFACT [ARTIFACT ...] [--repeats 3] [--out tools/results/bench_startup.json]

`TaskRuntime(path, strategy="inplace", cache_tasks=1, blocked_convs=...)` built and closed in turns in one process;
median seconds per variant and their ratio."""
from __future__ import annotations

import argparse
import json
import statistics
import time

from edgecl.machine import machine_info
from edgecl.runtime import TaskRuntime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_startup.json")
    args = p.parse_args()
    rows = []
    for path in args.artifacts:
        times: dict[bool, list[float]] = {True: [], False: []}
        blocked = 0
        for _ in range(args.repeats):
            for on in (False, True):
                start = time.perf_counter()
                runtime = TaskRuntime(path, strategy="inplace", cache_tasks=1, blocked_convs=on)
                times[on].append(time.perf_counter() - start)
                blocked = max(blocked, len(runtime._strategy.blocked_convs))
                runtime.close()
        row = {"artifact": path, "convs_blocked": blocked, "blocked_s": statistics.median(times[True]),
               "unblocked_s": statistics.median(times[False])}
        row["ratio"] = row["blocked_s"] / row["unblocked_s"]
        print(row)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
