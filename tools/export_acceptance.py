"""Issue 4 acceptance: export every task of an LPS artifact and check it.

For each task: `onnx.checker.check_model(full_check=True)`, ONNX Runtime logits vs the torch model (`forward` on the
materialised weights) on the task's held-out test inputs (goal max |Δ| ≤ 1e-4, fp32), fp16-weight export argmax
agreement with fp32 (goal ≥ 99.5 %), and dense vs compacted parameter counts. Runs on a given artifact (the demo's)
or trains a short demo-like LPS run first; `--pruning column` gives the column-pruned case.

    python tools/export_acceptance.py --artifact DEMO_OUT/model.edgecl
    python tools/export_acceptance.py --epochs 2 --pruning column --out /tmp/export_acceptance.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from edgecl import artifact
from edgecl.arch import preset
from edgecl.export import export_onnx
from edgecl.export.onnx_export import run_onnx
from edgecl.machine import format_machine, machine_info
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.methods.lps_config import DEMO_CONFIG
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext


def train_artifact(args, path: Path) -> None:
    config = {**DEMO_CONFIG, "epochs": args.epochs, "pruning": args.pruning}
    if args.alpha is not None:
        config["alpha"] = args.alpha
    stream = make_stream(args.stream, args.tasks, seed=args.seed)
    start = time.perf_counter()
    result = engine.run(registry.create("lps", preset(args.arch), config), stream, TrainContext(progress=False),
                        log=lambda *_: None)
    print(f"trained LPS {config} on {args.stream} ({args.tasks} tasks) in {time.perf_counter() - start:.0f}s")
    artifact.save(result.packed, path)


def check(path: Path, stream_name: str, seed: int) -> dict:
    art = artifact.load(path)
    stream = make_stream(stream_name, art.n_tasks, seed=seed)
    with tempfile.TemporaryDirectory() as d32, tempfile.TemporaryDirectory() as d16:
        index32 = export_onnx(path, d32)
        index16 = export_onnx(path, d16, fp16=True)
        rows = []
        for e32, e16 in zip(index32["tasks"], index16["tasks"]):
            t = e32["index"]
            x = stream.tasks[t].x_test
            onnx.checker.check_model(str(Path(d32) / e32["file"]), full_check=True)
            onnx.checker.check_model(str(Path(d16) / e16["file"]), full_check=True)
            y32, y16 = run_onnx(Path(d32) / e32["file"], x), run_onnx(Path(d16) / e16["file"], x)
            with torch.no_grad():
                yt = forward(art.arch, from_numpy(art.materialize(t)), torch.from_numpy(x)).numpy()
            rows.append({"task": t, "name": e32["name"], "n_test": len(x), "max_abs_diff_fp32": float(
                np.abs(y32 - yt).max()), "fp16_argmax_agreement": float((y16.argmax(1) == y32.argmax(1)).mean()),
                "params_dense": e32["params_dense"], "params_compact": e32["params_compact"],
                "bytes_fp32": e32["bytes"], "bytes_fp16": e16["bytes"], "checker": "ok"})
    return {"artifact": str(path), "method": index32["method"], "tasks": rows,
            "worst_max_abs_diff_fp32": max(r["max_abs_diff_fp32"] for r in rows),
            "worst_fp16_agreement": min(r["fp16_argmax_agreement"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", help="check this artifact instead of training one")
    parser.add_argument("--stream", default="permuted-digits")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--epochs", type=int, default=2, help="LPS warm-up epochs (ADMM 3×, final 1×)")
    parser.add_argument("--pruning", default="irregular", choices=("irregular", "column", "filter"))
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="export_acceptance.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(format_machine(info))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.artifact) if args.artifact else Path(tmp) / "model.edgecl"
        if not args.artifact:
            train_artifact(args, path)
        result = check(path, args.stream, args.seed)
    print(f"{'task':>4} {'max|Δ| fp32':>11} {'fp16 agree':>10} {'params dense':>12} {'compact':>9} "
          f"{'bytes fp32':>10} {'fp16':>8}")
    for r in result["tasks"]:
        print(f"{r['task']:>4} {r['max_abs_diff_fp32']:>11.2e} {r['fp16_argmax_agreement']:>10.4f} "
              f"{r['params_dense']:>12} {r['params_compact']:>9} {r['bytes_fp32']:>10} {r['bytes_fp16']:>8}")
    print(f"worst max|Δ| {result['worst_max_abs_diff_fp32']:.2e} (goal ≤ 1e-4), worst fp16 agreement "
          f"{result['worst_fp16_agreement']:.4f} (goal ≥ 0.995); checker passed on every file")
    result.update(machine=info, config=vars(args))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
