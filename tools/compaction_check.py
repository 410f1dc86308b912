"""Compaction on a trained artifact, measured where it is deployed: per task, the compacted ONNX graph's parameters
and its speed against the dense graph at batch 1 and 64 (`edgecl export --latency`), and the logits of the
compacted and the dense (folded) graph against the torch-free runtime on the task's test split.

    python tools/compaction_check.py RUN_FOLDER --stream split-digits --input-shape 3,32,32 \
        --out tools/results/compaction_resnet18_lps_filter.json

RUN_FOLDER is what `edgecl train` wrote (model.edgecl, results.json); the stream must be the one it trained on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecl.machine import machine_info  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--stream", default="split-digits")
    p.add_argument("--input-shape", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from edgecl.train.data import make_stream, parse_input_shape
    from own_network_acceptance import runtime_and_onnx

    results = json.load(open(os.path.join(args.run, "results.json")))
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    stream = make_stream(args.stream, len(results["acc_matrix"]), args.seed, shape)
    with tempfile.TemporaryDirectory() as folder:
        logits, diffs, entries = runtime_and_onnx(os.path.join(args.run, "model.edgecl"), stream, folder, latency=True)
    rows = [{"task": t, "runtime_acc": float(np.mean(y.argmax(1) == task.y_test)),
             "results_acc": results["acc_matrix"][-1][t], "compacted_vs_runtime_max_abs": diffs["compacted"][t],
             "dense_vs_runtime_max_abs": diffs["folded"][t], "params_dense": entry["params_dense"],
             "params_compact": entry["params_compact"], "latency_ms": entry.get("latency_ms"),
             "layers": entry["compaction"].get("layers")}
            for t, (y, task, entry) in enumerate(zip(logits, stream.tasks, entries))]
    report = {"machine": machine_info(), "args": vars(args), "method": results.get("method"),
              "config": results.get("config"), "acc": results["acc"], "bwt": results["bwt"], "tasks": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    json.dump(report, open(args.out, "w"), indent=1, default=str)
    for row in rows:
        speed = row["latency_ms"]["speedup"] if row.get("latency_ms") else {}
        print(f"task {row['task']}: params {row['params_dense']:,} → {row['params_compact']:,} "
              f"({row['params_dense'] / row['params_compact']:.2f}×), faster b1 {speed.get('1', float('nan')):.2f}× "
              f"b64 {speed.get('64', float('nan')):.2f}×, compacted vs runtime "
              f"{row['compacted_vs_runtime_max_abs']:.1e}, runtime acc = results {row['runtime_acc'] == row['results_acc']}")


if __name__ == "__main__":
    main()
