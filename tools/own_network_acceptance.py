"""Your own network, end to end: every method on a torchvision (or timm, or your own) network, trained on a real
stream, then checked where it is deployed — the torch-free runtime's accuracy per task must equal results.json's,
and the exported ONNX graphs (folded and compacted) must give the runtime's logits within 1e-4 relative to the largest
logit (float32 rounding grows with the logits' size: max abs difference ÷ max(1, |largest logit|), as
tools/methods_on_graphs.py and tests/test_from_torch.py judge it).

    python tools/own_network_acceptance.py --arch torchvision.models:resnet18 \
        [--methods lps,agscl,halrp,rgo,finetune,stl] [--stream split-digits] [--tasks 5] [--input-shape 3,32,32] \
        [--set lps.epochs=5 ...] [--threads 1] [--out tools/results/own_network_resnet18.json]

Per method it records ACC, BWT, the accuracy matrix, the artifact's bytes against one dense fp32 model, the wall
time, the runtime-vs-results check and the ONNX-vs-runtime maximum difference, and it judges the issue's criteria:
BWT exactly 0 for lps, halrp and stl; agscl BWT ≥ −1 point; rgo BWT ≥ −3 points; ACC ≥ STL − 3 points for every
continual method; finetune forgets. Results are written after every method, so a long run can be stopped and read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecl.machine import machine_info  # noqa: E402

CONTINUAL = ("lps", "agscl", "halrp", "rgo")
BWT_FLOOR = {"lps": 0.0, "halrp": 0.0, "stl": 0.0, "agscl": -0.01, "rgo": -0.03}


def parse_sets(items: list[str]) -> dict[str, dict]:
    """`lps.epochs=5` → {"lps": {"epochs": 5}} (values are JSON where they parse)."""
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, field = key.partition(".")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[field] = parsed
    return out


def runtime_and_onnx(path: str, stream, folder: str, latency: bool = False) -> tuple[list, dict, list]:
    """The runtime's logits per task; per exported form ("folded", "compacted") the largest |ONNX − runtime| per
    task; the compacted export's index entries (parameters, compaction, and with `latency` its timing)."""
    import onnxruntime as ort

    from edgecl.export import export_onnx
    from edgecl.runtime import TaskRuntime

    with TaskRuntime(path) as rt:
        logits = [rt.infer(task.x_test, task=t) for t, task in enumerate(stream.tasks)]
    diffs, entries = {}, []
    for compact in (False, True):
        out = os.path.join(folder, f"onnx_{'compact' if compact else 'folded'}")
        index = export_onnx(path, out, compact=compact, progress=False, latency=latency and compact)
        diffs["compacted" if compact else "folded"] = [
            float(np.abs(ort.InferenceSession(os.path.join(out, entry["file"]), providers=["CPUExecutionProvider"])
                         .run(None, {index["input"]["name"]: task.x_test})[0] - ref).max())
            for entry, task, ref in zip(index["tasks"], stream.tasks, logits)]
        entries = index["tasks"]
    return logits, diffs, entries


def deployed_checks(path: str, results: dict, stream, folder: str) -> dict:
    """Runtime accuracy per task vs results.json, and ONNX (folded, compacted) vs runtime logits."""
    logits, per_task, entries = runtime_and_onnx(path, stream, folder)
    runtime_acc = [float(np.mean(y.argmax(1) == task.y_test)) for y, task in zip(logits, stream.tasks)]
    worst = {kind: max(values) for kind, values in per_task.items()}
    largest = max(float(np.abs(y).max()) for y in logits)
    return {"runtime_acc": runtime_acc, "runtime_equals_results": runtime_acc == results["acc_matrix"][-1],
            "onnx_vs_runtime_max_abs": worst, "largest_logit": largest,
            "onnx_vs_runtime_scaled": max(worst.values()) / max(1.0, largest),
            "params_dense": [e["params_dense"] for e in entries], "params_compact": [e["params_compact"] for e in entries]}


def judge(rows: dict[str, dict]) -> dict[str, dict]:
    """The issue's criteria, per method, from what was measured."""
    stl_acc = rows.get("stl", {}).get("acc")
    verdicts = {}
    for name, row in rows.items():
        checks = {"runtime == results.json": row["deployed"]["runtime_equals_results"],
                  "ONNX vs runtime ≤ 1e-4 (relative)": row["deployed"]["onnx_vs_runtime_scaled"] <= 1e-4}
        if name in BWT_FLOOR:
            floor = BWT_FLOOR[name]
            checks[f"BWT {'= 0' if floor == 0 else f'≥ {100 * floor:g} points'}"] = \
                row["bwt"] == 0.0 if floor == 0 else row["bwt"] >= floor
        if name in CONTINUAL and stl_acc is not None:
            checks["ACC ≥ STL − 3 points"] = row["acc"] >= stl_acc - 0.03
        if name == "finetune":
            checks["forgets (BWT < 0)"] = row["bwt"] < 0
        verdicts[name] = checks
    return verdicts


SAME_RUN = ("arch", "stream", "tasks", "input_shape", "seed")


def previous_rows(args: argparse.Namespace) -> dict[str, dict]:
    """The rows already in --out, when that file measured the same arch, stream, tasks, shape and seed (a row keeps
    its own config and `set`, so methods run with different overrides stay told apart)."""
    old = json.load(open(args.out))
    differ = [k for k in SAME_RUN if old["args"].get(k) != vars(args)[k]]
    if differ:
        sys.exit(f"--update: {args.out} measured another run ({', '.join(differ)} differ)")
    for name, row in old["methods"].items():
        row.setdefault("set", parse_sets(old["args"].get("set", [])).get(name, {}))
        deployed = row["deployed"]  # rows from before the relative criterion: the absolute figure bounds it
        deployed.setdefault("onnx_vs_runtime_scaled", max(deployed["onnx_vs_runtime_max_abs"].values()))
    return old["methods"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True)
    p.add_argument("--methods", default="lps,agscl,halrp,rgo,finetune,stl")
    p.add_argument("--stream", default="split-digits")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--input-shape", default="3,32,32")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--update", action="store_true",
                   help="keep the other methods already in --out (same arch, stream, tasks, shape and seed)")
    args = p.parse_args()

    from edgecl.arch.spec import dense_params
    from edgecl.train.data import make_stream, parse_input_shape
    from edgecl.train.pipeline import train_and_write

    shape = parse_input_shape(args.input_shape)
    sets = parse_sets(args.set)
    stream = make_stream(args.stream, args.tasks, args.seed, shape)
    report = {"machine": machine_info(), "args": vars(args), "methods": {}}
    if args.update and os.path.exists(args.out):
        report["methods"] = previous_rows(args)
    for name in [m for m in args.methods.split(",") if m]:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            results = train_and_write(name, args.stream, folder, arch_name=args.arch, n_tasks=args.tasks,
                                      seed=args.seed, overrides=sets.get(name), threads=args.threads,
                                      progress=False, input_shape=shape, log=lambda _: None)
            wall = time.perf_counter() - start
            path = results["artifact"]["path"]
            spec = json.load(open(os.path.join(folder, "spec.json")))
            dense_bytes = 4 * dense_params(spec, max(t.n_classes for t in stream.tasks))
            row = {"acc": results["acc"], "bwt": results["bwt"], "acc_matrix": results["acc_matrix"],
                   "config": results["config"], "wall_seconds": wall, "artifact_bytes": results["artifact"]["bytes"],
                   "artifact_over_dense": results["artifact"]["bytes"] / dense_bytes,
                   "method_info": results.get("method_info"), "notes": results.get("notes"),
                   "set": sets.get(name, {}),
                   "deployed": deployed_checks(path, results, stream, folder)}
        report["methods"][name] = row
        report["verdicts"] = judge(report["methods"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"{name:9} ACC {100 * row['acc']:6.2f}  BWT {100 * row['bwt']:+6.2f}  "
              f"bytes/dense {row['artifact_over_dense']:.2f}  {wall / 60:5.1f} min  "
              f"runtime==results {row['deployed']['runtime_equals_results']}  "
              f"onnx {max(row['deployed']['onnx_vs_runtime_max_abs'].values()):.1e} (largest logit "
              f"{row['deployed']['largest_logit']:.1f}, relative {row['deployed']['onnx_vs_runtime_scaled']:.1e})",
              flush=True)
    for name, checks in report["verdicts"].items():
        print(f"{name:9} " + "  ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))


if __name__ == "__main__":
    main()
