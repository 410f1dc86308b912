"""Training cost of each method against `finetune` on the same model and data: seconds per epoch, median of repeats,
all in one process (ratios, because these machines are noisy). Issue 9's goals: ≤ 1.5× finetune for LPS, AGS-CL
and HALRP, ≤ 2× for RGO.

How an epoch is counted. Methods split a task into phases differently, so: seconds per epoch = total `learn_task`
time over tasks 1..T−1 / total epochs of those tasks, where a task's epochs are `sum(config.phases())` when the
config defines phases (LPS: warm-up + ADMM + final) and `config.epochs` otherwise (HALRP's `epochs` already counts
its warm-up; RGO's curvature pass after training and AGS-CL's importance pass count as time, not as epochs). Task 0
is left out so that sharing, projection and low-rank overheads show. `pack()` runs after each task, as in the
engine, but is timed separately.

Methods may default to different batch sizes (RGO: 10, finetune: 64), which changes the number of steps per
epoch. So two ratios are printed: against finetune's default config, and against finetune run with the method's own
batch size ("same batch", the method's overhead per step of training). The goal is judged on the same-batch ratio.

    python tools/bench_train.py                      # all available methods, 3 tasks, 5 repeats, 1 thread
    python tools/bench_train.py --methods lps,rgo --repeats 5 --out /tmp/bench_train.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

GOALS = {"lps": 1.5, "agscl": 1.5, "halrp": 1.5, "rgo": 2.0}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_train.json")


def epochs_per_task(config) -> int:
    """Epochs a method trains one task for, as the method counts them (see the module docstring)."""
    return int(sum(config.phases())) if hasattr(config, "phases") else int(config.epochs)


def time_once(name: str, config: dict, arch, stream) -> dict:
    """One fresh method over every task of the stream; learn_task timed per task."""
    from edgecl.train import registry
    from edgecl.train.protocol import TrainContext

    method = registry.create(name, arch, config)
    ctx = TrainContext(progress=False)
    tasks = []
    for t, task in enumerate(stream.tasks):
        start = time.perf_counter()
        method.learn_task(t, task, ctx)
        learned = time.perf_counter()
        method.pack()
        tasks.append({"seconds": learned - start, "pack_seconds": time.perf_counter() - learned,
                      "epochs": epochs_per_task(method.config)})
    later = tasks[1:]
    return {"seconds_per_epoch": sum(x["seconds"] for x in later) / max(1, sum(x["epochs"] for x in later)),
            "tasks": tasks}


def variants(methods: list[str], spec) -> dict[str, tuple[str, dict]]:
    """label → (method, config): each method at its defaults, plus finetune at every batch size in use."""
    from edgecl.compare import method_config

    out = {m: (m, method_config(m, spec, 0)) for m in methods}
    base = method_config("finetune", spec, 0)
    out["finetune"] = ("finetune", base)
    for m in methods:
        batch = out[m][1]["batch_size"]
        if batch != base["batch_size"]:
            out[f"finetune@b{batch}"] = ("finetune", {**base, "batch_size": batch})
    return out


def same_batch_label(config: dict, finetune_batch: int) -> str:
    return "finetune" if config["batch_size"] == finetune_batch else f"finetune@b{config['batch_size']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="lps,agscl,halrp,rgo,stl", help="methods to compare with finetune")
    p.add_argument("--stream", default="permuted-digits")
    p.add_argument("--tasks", type=int, default=3, help="tasks per run (task 0 is not counted; need ≥ 2)")
    p.add_argument("--arch", default="mlp")
    p.add_argument("--repeats", type=int, default=5, help="runs per method; the median is reported")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="scale every method's default `epochs`")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    args = p.parse_args(argv)

    import torch

    from edgecl.arch import preset
    from edgecl.compare import CompareSpec, parse_methods, split_available
    from edgecl.errors import UsageError
    from edgecl.machine import format_machine, machine_info
    from edgecl.train.data import make_stream

    torch.set_num_threads(args.threads)
    try:
        if args.tasks < 2 or args.repeats < 1:
            raise UsageError("--tasks must be ≥ 2 and --repeats ≥ 1")
        methods, skipped = split_available([m for m in parse_methods(args.methods) if m != "finetune"])
        spec = CompareSpec(epochs_scale=args.epochs_scale)
        runs = variants(methods, spec)
        stream = make_stream(args.stream, args.tasks, 0)
    except UsageError as exc:
        print(f"bench_train: error: {exc}", file=sys.stderr)
        return 2
    arch = preset(args.arch, stream.input_shape)
    info = machine_info()
    print(format_machine(info))
    for why in skipped.values():
        print(f"skipping: {why}")
    print(f"stream {stream.name}, {len(stream.tasks)} tasks, arch {args.arch}, {args.repeats} repeats, "
          f"{args.threads} thread(s)")

    samples: dict[str, list[dict]] = {label: [] for label in runs}
    for r in range(args.repeats):  # interleaved, so slow drifts of the machine hit every method alike
        for label, (name, config) in runs.items():
            samples[label].append(time_once(name, config, arch, stream))
            print(f"  repeat {r + 1}/{args.repeats} {label}: "
                  f"{1e3 * samples[label][-1]['seconds_per_epoch']:.1f} ms/epoch", flush=True)

    median = {label: statistics.median(s["seconds_per_epoch"] for s in runs_) for label, runs_ in samples.items()}
    ft_batch = runs["finetune"][1]["batch_size"]
    rows = []
    for label, (name, config) in runs.items():
        same = same_batch_label(config, ft_batch)
        ratio_same = median[label] / median[same]
        goal = GOALS.get(name) if label == name else None
        rows.append({"label": label, "method": name, "batch_size": config["batch_size"],
                     "epochs_per_task": samples[label][0]["tasks"][-1]["epochs"],
                     "seconds_per_epoch": median[label], "ratio_vs_finetune": median[label] / median["finetune"],
                     "ratio_vs_finetune_same_batch": ratio_same, "goal": goal,
                     "goal_met": None if goal is None else ratio_same <= goal,
                     "samples": [s["seconds_per_epoch"] for s in samples[label]],
                     "pack_seconds": statistics.median(x["pack_seconds"] for s in samples[label] for x in s["tasks"])})

    print(f"\n{'method':<16}{'batch':>6}{'ep/task':>8}{'ms/epoch':>10}{'× ft':>7}{'× ft same batch':>17}{'goal':>7}")
    for row in rows:
        goal = "" if row["goal"] is None else f"≤{row['goal']:g} {'ok' if row['goal_met'] else 'MISSED'}"
        print(f"{row['label']:<16}{row['batch_size']:>6}{row['epochs_per_task']:>8}"
              f"{1e3 * row['seconds_per_epoch']:>10.1f}{row['ratio_vs_finetune']:>7.2f}"
              f"{row['ratio_vs_finetune_same_batch']:>17.2f}  {goal}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "bench_train", "machine": info, "stream": stream.name, "tasks": len(stream.tasks),
                   "arch": args.arch, "repeats": args.repeats, "threads": args.threads,
                   "epochs_scale": args.epochs_scale, "skipped": skipped, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
