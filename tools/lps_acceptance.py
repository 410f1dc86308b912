"""Issue 2 acceptance, full size: LPS vs STL vs finetune on 10-task permuted-digits with the MLP preset.

Measures ACC/BWT of each method on the same stream and seed, checks that every old task's test predictions stay
bit-identical after each later LPS task and that task supports are disjoint, and times the LPS run (training plus the
engine's per-task evaluation). Run on a quiet machine:

    python tools/lps_acceptance.py --threads 2 --out /tmp/lps_acceptance.json

The model is tiny (batch 32 × 256 units), so one thread is as fast as two on a quiet machine and far faster on a busy
one: two OpenMP threads that keep losing their core to other processes stall at every barrier (measured 10× slower).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from edgecl import metrics
from edgecl.arch import preset
from edgecl.deltas import lps_owner_elements
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.methods.lps_config import DEMO_CONFIG, LPSConfig
from edgecl.train.outputs import format_matrix
from edgecl.train.protocol import TrainContext


def dense(acc_matrix: list[list[float]]) -> np.ndarray:
    n = len(acc_matrix)
    a = np.full((n, n), np.nan)
    for i, row in enumerate(acc_matrix):
        a[i, :len(row)] = row
    return a


def run_lps(stream, config: dict) -> dict:
    """LPS through the engine, recording every seen task's predictions after each task."""
    method = registry.create("lps", preset("mlp"), config)
    preds: list[list[np.ndarray]] = []
    ctx = TrainContext(progress=False)
    start, cpu = time.perf_counter(), time.process_time()
    acc = []
    for t, task in enumerate(stream.tasks):
        method.learn_task(t, task, ctx)
        packed = method.pack()
        preds.append([engine.predict(packed, j, stream.tasks[j].x_test) for j in range(t + 1)])
        acc.append([float((preds[t][j] == stream.tasks[j].y_test).mean()) for j in range(t + 1)])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    identical = all(np.array_equal(preds[i][j], preds[-1][j]) for i in range(len(preds)) for j in range(i + 1))
    owners = {n: lps_owner_elements(packed, n) for n, s in packed.params.items() if s["kind"] == "lps"}
    # one owner per element ⇒ disjoint supports; also check every task owns something in every layer
    owns_all = all(bool((o == t + 1).any()) for o in owners.values() for t in range(packed.n_tasks))
    a = dense(acc)
    return {"acc_matrix": acc, "acc": metrics.acc(a), "bwt": metrics.bwt(a), "seconds": seconds, "cpu_seconds": cpu_seconds,
            "predictions_bit_identical": identical, "every_task_owns_weights": owns_all,
            "capacity": packed.extra["capacity"], "beta": packed.extra["beta"][-1], "config": method.config.to_json()}


def run_baseline(name: str, stream, config: dict) -> dict:
    method = registry.create(name, preset("mlp"), config)
    start = time.perf_counter()
    result = engine.run(method, stream, TrainContext(progress=False), log=lambda *_: None)
    a = dense(result.acc_matrix)
    return {"acc_matrix": result.acc_matrix, "acc": metrics.acc(a), "bwt": metrics.bwt(a),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lps", default="{}", help="JSON overrides on top of DEMO_CONFIG")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stream = make_stream("permuted-digits", args.tasks, args.seed)
    config = {**DEMO_CONFIG, **json.loads(args.lps), "seed": args.seed}
    lps = run_lps(stream, config)
    cfg = LPSConfig.from_json(lps["config"])
    budget = {"epochs": sum(cfg.phases()), "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": args.seed}
    report = {"threads": args.threads, "tasks": args.tasks, "lps": lps, "baseline_config": budget}
    print(format_matrix(lps["acc_matrix"]))
    print(f"LPS  ACC {100 * lps['acc']:.2f}  BWT {100 * lps['bwt']:.2f}  {lps['seconds']:.1f}s wall, "
          f"{lps['cpu_seconds']:.1f}s CPU (train + eval, {args.threads} threads)  bit-identical {lps['predictions_bit_identical']}  "
          f"capacity {lps['capacity'][-1]:.2f}")
    if not args.skip_baselines:
        for name in ("stl", "finetune"):
            report[name] = run_baseline(name, stream, budget)
            print(f"{name:<8} ACC {100 * report[name]['acc']:.2f}  BWT {100 * report[name]['bwt']:.2f}  "
                  f"{report[name]['seconds']:.1f}s")
        report["lps_minus_stl_points"] = 100 * (lps["acc"] - report["stl"]["acc"])
        print(f"LPS − STL: {report['lps_minus_stl_points']:+.2f} points (target ≥ −1.5)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
