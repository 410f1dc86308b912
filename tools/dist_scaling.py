"""Issue 18's scaling figure: wall time per training epoch of one process against 2 ranks (gloo) on this machine,
for the largest preset (the resnet preset: BatchNorm, residual adds), measured, not asserted.

Variants, each a fresh `edgecl train` process run alternately `--repeats` times (median): one process on 1 torch
thread, one process on 2 threads, and `--nproc 2` (2 ranks × 1 thread, each computing half of every global batch).
Seconds per epoch = the run's `seconds_per_task` summed / epochs trained (evaluation is not in it). Also measured: the
latency of one small gloo all-reduce between the 2 ranks (what every training step pays for the gradient sum and,
on BatchNorm networks, 2 more per BatchNorm layer). The machine's load average is recorded before and after: on a
2-core machine that someone else also uses, the 2 ranks compete with that work, so the figure bounds what 2 ranks
buy here and says nothing about GPUs.

    python tools/dist_scaling.py --out tools/results/dist_scaling.json
    python tools/dist_scaling.py --shapes 1,8,8 --methods finetune --repeats 1 --out /tmp/scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
VARIANTS = {"1 process, 1 thread": ["--threads", "1"], "1 process, 2 threads": ["--threads", "2"],
            "2 ranks, 1 thread each": ["--threads", "1", "--nproc", "2"]}


def seconds_per_epoch(method: str, shape: str, epochs: int, tasks: int, batch: int, flags: list[str],
                      work: str) -> float:
    out = tempfile.mkdtemp(dir=work)
    argv = [sys.executable, "-m", "edgecl", "train", "--method", method, "--arch", "resnet", "--stream",
            "permuted-digits", "--input-shape", shape, "--tasks", str(tasks), "--set", f"epochs={epochs}", "--set",
            f"batch_size={batch}", "--no-progress", "--out", out, *flags]
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    trained = epochs * tasks
    if method == "lps":
        trained *= 5  # warm-up + 3× ADMM + final, as LPSConfig.phases() counts them
    return sum(results["seconds_per_task"]) / trained


def allreduce_latency() -> dict[str, float]:
    """One 2-rank launch of this script's worker: median seconds of a 1,000-float and a 200,000-float all-reduce."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        os.path.abspath(__file__), "--latency-worker", f.name], env=ENV, capture_output=True,
                       check=True)
        return json.load(f)


def latency_worker(out: str) -> None:
    import torch

    from edgecl.train import distributed

    with distributed.joined("cpu") as world:
        result = {}
        for size in (1_000, 200_000):
            x = torch.zeros(size)
            times = []
            for _ in range(300):
                start = time.perf_counter()
                distributed.all_sum(x)
                times.append(time.perf_counter() - start)
            result[f"all_reduce_{size}_floats_ms"] = 1000 * statistics.median(times[50:])
        if world.is_main:
            with open(out, "w") as f:
                json.dump(result, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="finetune")
    p.add_argument("--shapes", default="1,8,8;3,32,32", help="input shapes C,H,W separated by ';'")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="the global batch (each of 2 ranks computes half)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--latency-worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "tools", "results", "dist_scaling.json"))
    args = p.parse_args(argv)
    if args.latency_worker:
        latency_worker(args.latency_worker)
        return 0
    sys.path.insert(0, ROOT)
    from dist_equivalence import write_report  # this folder is on sys.path when the script runs
    from edgecl.machine import machine_info

    report = {"machine": machine_info(), "cpus": os.cpu_count(), "load_before": os.getloadavg(),
              "arch": "resnet", "stream": "permuted-digits", "epochs": args.epochs, "tasks": args.tasks,
              "global_batch": args.batch, "allreduce": allreduce_latency(), "runs": {}}
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods.split(","):
            for shape in args.shapes.split(";"):
                times: dict[str, list[float]] = {v: [] for v in VARIANTS}
                for _ in range(args.repeats):
                    for variant, flags in VARIANTS.items():
                        times[variant].append(seconds_per_epoch(method, shape, args.epochs, args.tasks, args.batch,
                                                                flags, work))
                medians = {v: statistics.median(t) for v, t in times.items()}
                base = medians["1 process, 1 thread"]
                report["runs"][f"{method} {shape}"] = {
                    "seconds_per_epoch": medians, "all_repeats": times,
                    "speedup_vs_1_process_1_thread": {v: base / m for v, m in medians.items()}}
                print(f"{method} {shape}: " + ", ".join(f"{v} {m:.3f} s/epoch ({base / m:.2f}×)"
                                                       for v, m in medians.items()), flush=True)
    report["load_after"] = os.getloadavg()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
