"""Issue 6 acceptance for AGS-CL, measured in one process (single thread):

1. permuted-digits (MLP preset) and split-digits: ACC and BWT of `agscl` against `stl` (and `finetune`) with the
   same epochs, learning rate, batch size and seed; goals BWT ≥ −1 point, ACC ≥ STL − 2 points.
2. per task: the node-masked model (`materialize`) against the full final weights with that task's head (max |Δ|),
   the exporter's structurally compacted ONNX graph (`edgecl.export.task_model`) against the same full model in
   ONNX Runtime (goal ≤ 1e-4), and parameters: dense, touched by live nodes, in the compact graph; node-mask bits.
3. training time per epoch of agscl against finetune on the same task (a second task, so the drift penalty and the
   (I.1) cuts are active), median of repeats, both proximal schedules; goal (issue 9) ≤ 1.5×.

    python tools/agscl_acceptance.py --out /tmp/agscl_acc [--preset digits|paper] [--tasks 10] [--config JSON]
                                     [--quick]

`--preset digits` (default) is the tuned dataclass default; `--preset paper` is `AGSCLConfig.paper()`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from edgecl.arch import preset
from edgecl.deltas import materialize
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.methods.agscl import AGSCLConfig
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext

CTX = TrainContext(progress=False)
SHARED = ("lr", "batch_size", "epochs", "seed")  # the budget every compared method gets


def run_method(name: str, stream, arch, config: dict) -> engine.RunResult:
    cfg = {k: v for k, v in config.items() if k in SHARED} if name != "agscl" else config
    return engine.run(registry.create(name, arch, cfg), stream, CTX, log=lambda *_: None)


def task_checks(packed, stream) -> list[dict]:
    """Per task: masked vs full max |Δ|, compact ONNX vs full max |Δ|, parameter counts."""
    from edgecl.export import task_model
    from edgecl.export.onnx_export import run_onnx

    full_trunk = from_numpy(packed.base)
    rows = []
    for t, task in enumerate(stream.tasks):
        head = from_numpy({k: packed.task_tensors[t][k] for k in ("head.weight", "head.bias")})
        dense = materialize(packed, t)
        x = torch.from_numpy(task.x_test)
        with torch.no_grad():
            full = forward(packed.arch, {**full_trunk, **head}, x).numpy()
            masked = forward(packed.arch, from_numpy(dense), x).numpy()
        model, info = task_model(packed.arch, dense, compact=True, verify=False, name=f"task_{t}")
        compact = run_onnx(model, task.x_test)
        rows.append({"task": t, "masked_vs_full": float(np.abs(masked - full).max()),
                     "compact_onnx_vs_full": float(np.abs(compact - full).max()),
                     "params_dense": info["params_dense"], "params_compact": info["params_compact"],
                     "params_live_nodes": packed.extra["live_params"][t],
                     "used_capacity": packed.extra["used_capacity"][t]})
    return rows


def epoch_times(variants: dict[str, tuple[str, dict]], arch, stream, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per epoch (process CPU time, which other users of a shared machine do not inflate, and wall
    time) of learning the stream's second task after the first, whole learn_task included. Variants interleave
    within each repeat so that slow phases of the machine hit all of them alike."""
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for key, (name, config) in variants.items():
            cfg = {k: v for k, v in config.items() if k in SHARED} if name != "agscl" else config
            method = registry.create(name, arch, cfg)
            method.learn_task(0, stream.tasks[0], CTX)
            c0, w0 = time.process_time(), time.perf_counter()
            method.learn_task(1, stream.tasks[1], CTX)
            cpu[key].append((time.process_time() - c0) / config["epochs"])
            wall[key].append((time.perf_counter() - w0) / config["epochs"])
    return {k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k])} for k in variants}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "agscl_acceptance"))
    p.add_argument("--tasks", type=int, default=10, help="tasks of permuted-digits (split-digits always has 5)")
    p.add_argument("--preset", choices=("digits", "paper"), default="digits")
    p.add_argument("--config", default="{}", help="JSON overrides of AGSCLConfig (shared fields go to baselines)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the timing measurement")
    p.add_argument("--timing-epochs", type=int, default=10, help="epochs per timed task")
    p.add_argument("--quick", action="store_true", help="3 tasks, 3 epochs: a smoke run of this script")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    overrides = json.loads(args.config)
    config = (AGSCLConfig(**overrides) if args.preset == "digits" else AGSCLConfig.paper(**overrides)).to_json()
    if args.quick:
        config["epochs"], args.tasks, args.repeats = 3, 3, 1
    arch = preset("mlp")
    report: dict = {"preset": args.preset, "config": config, "torch": torch.__version__, "threads": torch.get_num_threads(), "streams": {}}
    for stream_name, n in (("permuted-digits", args.tasks), ("split-digits", 3 if args.quick else 5)):
        stream = make_stream(stream_name, n, seed=config["seed"])
        runs = {m: run_method(m, stream, arch, config) for m in ("agscl", "stl", "finetune")}
        res = {m: r.to_json() for m, r in runs.items()}
        packed = runs["agscl"].packed
        entry = {m: {"acc": r["acc"], "bwt": r["bwt"], "acc_matrix": r["acc_matrix"]} for m, r in res.items()}
        entry["agscl"]["extra"] = {k: v for k, v in packed.extra.items() if k != "omega"}
        entry["tasks"] = task_checks(packed, stream)
        a, s = res["agscl"], res["stl"]
        entry["goals"] = {"bwt>=-1pt": a["bwt"] >= -0.01, "acc>=stl-2pt": a["acc"] >= s["acc"] - 0.02,
                          "compact<=1e-4": all(r["compact_onnx_vs_full"] <= 1e-4 for r in entry["tasks"]),
                          "fewer_params": all(r["params_compact"] < r["params_dense"] for r in entry["tasks"])}
        report["streams"][stream_name] = entry
        print(f"\n== {stream_name} ({n} tasks, {config['epochs']} epochs) ==")
        for m in ("agscl", "stl", "finetune"):
            print(f"  {m:9s} ACC {100 * res[m]['acc']:6.2f}  BWT {100 * res[m]['bwt']:6.2f}")
        print("  task  used-capacity          dense  live-nodes  compact  |masked-full|  |onnx-full|")
        for r in entry["tasks"]:
            used = " ".join(f"{k}={v:.2f}" for k, v in r["used_capacity"].items())
            print(f"  {r['task']:4d}  {used:22s} {r['params_dense']:6d}  {r['params_live_nodes']:10d}  "
                  f"{r['params_compact']:7d}  {r['masked_vs_full']:12.2e}  {r['compact_onnx_vs_full']:11.2e}")
        print(f"  node masks: {packed.extra['mask_bits_per_param']:.4f} bits/param per task "
              f"({packed.extra['node_mask_bytes_per_task']} bytes); goals {entry['goals']}")
    stream = make_stream("permuted-digits", 2, seed=config["seed"])
    timed = {**config, "epochs": 1 if args.quick else args.timing_epochs}
    variants = {"finetune": ("finetune", timed)}
    variants.update({f"agscl[{s}]": ("agscl", {**timed, "prox_every": s}) for s in ("epoch", "step")})
    timing = epoch_times(variants, arch, stream, args.repeats)
    base = timing["finetune"]
    report["seconds_per_epoch"] = timing
    report["train_time_ratio"] = {k: {c: v[c] / base[c] for c in v} for k, v in timing.items() if k != "finetune"}
    print(f"\n== seconds per epoch (task 2 of permuted-digits, median of {args.repeats} interleaved runs) ==")
    for k, v in timing.items():
        print(f"  {k:14s} cpu {1000 * v['cpu']:7.1f} ms ({v['cpu'] / base['cpu']:.2f}× finetune)   "
              f"wall {1000 * v['wall']:7.1f} ms ({v['wall'] / base['wall']:.2f}×)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "agscl_acceptance.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {os.path.join(args.out, 'agscl_acceptance.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
