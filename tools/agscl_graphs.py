"""AGS-CL on graphs and its freeze (issues 16 and 17), measured in one process (single thread):

1. ``--freeze``: the exact freeze against the paper's finite-λ one (``freeze="proximal"``, the hold of edgecl ≤ 0.2),
   per seed: important and bit-for-bit frozen nodes after each task (the method's record), and, checked here from
   the deployed weights, which old tasks changed and by how much, ACC and BWT — MLP on permuted-digits at the
   defaults, LeNet on split-digits with 3 epochs (the two runs of issue 17). Run with an older checkout first on
   PYTHONPATH (no ``freeze`` field) it measures that checkout's default: the "before" numbers.
2. ``--graphs``: ACC / BWT / per-task accuracy right after learning (the diagonal) of AGS-CL on the resnet preset,
   the custom ``ResCat`` module (residual add, concatenation, depthwise conv, SE gate, BatchNorm; from
   tests/torch_nets.py, on 3-channel 8×8 digits) and, with ``--mobilenet``, torchvision mobilenet_v2 (width 0.25)
   on 3×16×16 split-digits, for term (a) in the Euclidean metric at each μ of ``--mus`` (the pre-issue-16 default)
   and in Adam's metric at each μ of ``--mu-adams`` (the default on BatchNorm networks); plus the freeze record
   (must be exact) and the used capacity after the first task and at the end. Rows of earlier runs in ``--out``
   are kept (those labelled ``mu=…`` are the Euclidean step before issue 16's change, 2026-11-29).

    python tools/agscl_graphs.py --freeze --graphs --mobilenet --out tools/results/agscl_graphs.json
    git worktree add /tmp/edgecl-before 0d20dab && PYTHONPATH=/tmp/edgecl-before \
        python tools/agscl_graphs.py --freeze --out tools/results/agscl_freeze_before.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from edgecl import metrics
from edgecl.arch import from_torch, preset
from edgecl.deltas import materialize
from edgecl.train import engine, registry
from edgecl.train.methods.agscl_config import AGSCLConfig
from edgecl.train.data import Stream, make_stream
from edgecl.train.protocol import TrainContext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from torch_nets import ResCat  # noqa: E402  (the test suite's custom module and data, shared)

CTX = TrainContext(progress=False)
HAS_FREEZE = "freeze" in AGSCLConfig.__dataclass_fields__  # False on a checkout before issue 17 (the "before" run)


def run(arch: dict, stream: Stream, config: dict) -> dict:
    """Learn the stream task by task; ACC, BWT, the diagonal, AGS-CL's own freeze record and, checked here from the
    deployed weights, each old task's largest |Δ| between right after it was learned and the end."""
    method = registry.create("agscl", arch, config)
    n = len(stream.tasks)
    acc = np.full((n, n), np.nan)
    first, start = [], time.process_time()
    for t, task in enumerate(stream.tasks):
        method.learn_task(t, task, CTX)
        packed = method.pack()
        first.append(materialize(packed, t))
        acc[t, :t + 1] = [engine.accuracy(packed, j, stream.tasks[j]) for j in range(t + 1)]
    final = [materialize(packed, t) for t in range(n)]
    drift = [max(float(np.abs(final[t][k] - w).max(initial=0.0)) for k, w in first[t].items()) for t in range(n)]
    same = [all(final[t][k].tobytes() == w.tobytes() for k, w in first[t].items()) for t in range(n)]
    extra, scores = packed.extra, metrics.summary(acc)
    return {"acc": float(scores["acc"]), "bwt": float(scores["bwt"]), "just_learned": np.diag(acc).tolist(),
            "acc_matrix": [acc[i, :i + 1].tolist() for i in range(n)],
            "frozen_important": extra["frozen_important"], "old_task_max_abs_change": drift,
            "old_tasks_bit_identical": same, "used_capacity_after_task0": 1.0 - extra["sparsity"][0],
            "used_capacity_last": 1.0 - extra["sparsity"][-1], "cpu_seconds": time.process_time() - start}


def freeze_runs(seeds: list[int]) -> dict:
    cases = {"mlp permuted-digits 10 tasks (defaults)": ("mlp", "permuted-digits", 10, {}),
             "lenet split-digits 5 tasks (epochs=3)": ("lenet", "split-digits", 5, {"epochs": 3})}
    out = {}
    for label, (arch_name, stream_name, n, cfg) in cases.items():
        stream = make_stream(stream_name, n, seed=0)
        for seed in seeds:
            for freeze in ("proximal", "exact") if HAS_FREEZE else ("before (this checkout's default)",):
                r = run(preset(arch_name, stream.input_shape), stream,
                        {**cfg, "seed": seed, **({"freeze": freeze} if HAS_FREEZE else {})})
                out.setdefault(label, {}).setdefault(freeze, {})[str(seed)] = r
                drifted = [t for t, same in enumerate(r["old_tasks_bit_identical"]) if not same]
                print(f"  {label:40s} seed {seed} {freeze[:8]:8s} ACC {100 * r['acc']:6.2f} BWT {100 * r['bwt']:6.2f}"
                      f"  changed old tasks {drifted}  frozen {r['frozen_important'][1:]}")
    return out


def graph_runs(settings: dict[str, dict], tasks: int, mobilenet: bool, split_only: bool = False) -> dict:
    cases = []
    for stream_name, n in (("split-digits", 5),) + ((("permuted-digits", tasks),) if not split_only else ()):
        stream = make_stream(stream_name, n, seed=0)
        cases += [("resnet preset", preset("resnet"), stream),
                  ("ResCat", from_torch(ResCat(), (3, 8, 8)), make_stream(stream_name, n, 0, (3, 8, 8)))]
    if mobilenet:
        from edgecl.arch.factories import ensure_torchvision_imports

        ensure_torchvision_imports()
        import torchvision

        cases.append(("torchvision mobilenet_v2 width 0.25",
                      from_torch(torchvision.models.mobilenet_v2(num_classes=2, width_mult=0.25), (3, 16, 16)),
                      make_stream("split-digits", 5, 0, (3, 16, 16))))
    out: dict = {}
    for name, arch, stream in cases:
        for label, config in settings.items():
            r = run(arch, stream, config)
            out.setdefault(name, {}).setdefault(stream.name, {})[label] = r
            exact = all(r["old_tasks_bit_identical"])
            print(f"  {name:36s} {stream.name:18s} {label:22s} ACC {100 * r['acc']:6.2f} BWT {100 * r['bwt']:6.2f} "
                  f"diag {[round(100 * a, 1) for a in r['just_learned']]} used {r['used_capacity_after_task0']:.2f}"
                  f"→{r['used_capacity_last']:.2f} exact {exact} ({r['cpu_seconds']:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tools/results/agscl_graphs.json")
    p.add_argument("--freeze", action="store_true", help="exact vs finite-λ freeze (issue 17)")
    p.add_argument("--graphs", action="store_true", help="ACC/BWT on the resnet preset and ResCat (issue 16)")
    p.add_argument("--mobilenet", action="store_true", help="also torchvision mobilenet_v2 (width 0.25)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--mus", default="1,2", help="group-lasso strengths μ, Euclidean metric, for the graph runs")
    p.add_argument("--mu-adams", default="0.003,0.01,0.03", help="strengths μ in Adam's metric for the graph runs")
    p.add_argument("--split-only", action="store_true", help="graph runs on split-digits only (no permuted-digits)")
    p.add_argument("--tasks", type=int, default=5, help="tasks of permuted-digits in the graph runs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    report: dict = {}
    if os.path.exists(args.out):  # keep the sections not rerun this time (each records when it was started)
        with open(args.out) as f:
            report = json.load(f)
    started = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1,
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report.update(started)
    if args.freeze:
        print("== exact vs finite-λ freeze ==")
        report["freeze"] = freeze_runs([int(s) for s in args.seeds.split(",")])
        report["freeze_started"] = started["started"]
    if args.graphs:
        print("== AGS-CL on graphs ==")
        settings = {**{f"euclidean mu={m}": {"lasso": "euclidean", "mu": float(m)} for m in args.mus.split(",") if m},
                    **{f"adam mu_adam={m}": {"lasso": "adam", "mu_adam": float(m)}
                       for m in args.mu_adams.split(",") if m}}
        fresh = graph_runs(settings, args.tasks, args.mobilenet, args.split_only)
        for name, streams in fresh.items():  # earlier settings of the same case and stream are kept
            for stream_name, rows in streams.items():
                report.setdefault("graphs", {}).setdefault(name, {}).setdefault(stream_name, {}).update(rows)
        report["graphs_started"] = started["started"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
