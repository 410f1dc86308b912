"""Artifact size benchmark (issue 3 acceptance, issue 9 `bench_size`).

Trains each method on a stream with the MLP preset, saves the artifact, checks the round trip (every task's
materialised weights bit-exact, test predictions identical), and reports bytes against one dense fp32 model and N
separate models, the mask side against its order-0 entropy, and bits per parameter per task (from `inspect`).

    python tools/bench_size.py --methods lps --stream permuted-digits --tasks 10 --out out/bench_size
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from edgecl.machine import machine_info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="lps", help="comma-separated method names (default: lps)")
    ap.add_argument("--stream", default="permuted-digits")
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--epochs", type=int, default=None, help="override the method's epochs (default: its own)")
    ap.add_argument("--config", default="{}", help="JSON config overrides for every method")
    ap.add_argument("--fp16", action="store_true", help="also save an fp16-base artifact and report its size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/bench_size")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from edgecl import artifact
    from edgecl.arch import preset
    from edgecl.deltas import materialize
    from edgecl.train import engine, registry
    from edgecl.train.data import make_stream
    from edgecl.train.protocol import TrainContext

    os.makedirs(args.out, exist_ok=True)
    stream = make_stream(args.stream, args.tasks, args.seed)
    arch = preset(args.arch, stream.input_shape)
    report = {"machine": machine_info(), "stream": args.stream, "tasks": args.tasks, "arch": args.arch,
              "methods": {}}
    for name in args.methods.split(","):
        config = {"seed": args.seed, **json.loads(args.config)}
        if args.epochs is not None:
            config["epochs"] = args.epochs
        start = time.perf_counter()
        result = engine.run(registry.create(name, arch, config), stream, TrainContext(progress=False),
                            log=lambda *_: None)
        train_s = time.perf_counter() - start
        packed = result.packed
        path = os.path.join(args.out, f"{name}.edgecl")
        artifact.save(packed, path)
        art = artifact.load(path)
        exact = all(art.materialize(t)[k].tobytes() == w.tobytes()
                    for t in range(packed.n_tasks) for k, w in materialize(packed, t).items())
        loaded = art.to_packed()
        same_pred = all(np.array_equal(engine.predict(packed, t, task.x_test), engine.predict(loaded, t, task.x_test))
                        for t, task in enumerate(stream.tasks))
        info = artifact.inspect(path)
        row = {"train_seconds": round(train_s, 1), "acc": float(np.mean(result.acc_matrix[-1])),
               "round_trip_bit_exact": exact, "predictions_identical": same_pred, "inspect": info}
        if args.fp16:
            path16 = os.path.join(args.out, f"{name}-fp16.edgecl")
            artifact.save(packed, path16, fp16=True)
            row["fp16_bytes"] = os.path.getsize(path16)
            row["fp16_ratio_to_dense"] = row["fp16_bytes"] / info["dense_fp32_bytes"]
        report["methods"][name] = row
        print_row(name, row)
    with open(os.path.join(args.out, "bench_size.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'bench_size.json')}")
    return 0


def print_row(name: str, row: dict) -> None:
    from edgecl.inspect_report import format_report

    info = row["inspect"]
    print(f"== {name}: acc {row['acc']:.3f}, trained in {row['train_seconds']} s; round trip bit-exact: "
          f"{row['round_trip_bit_exact']}, predictions identical: {row['predictions_identical']}")
    print(format_report(info))
    print(f"   whole artifact {info['file_bytes']} B = {info['ratio_to_dense']:.3f} x one dense fp32 model "
          f"({info['dense_fp32_bytes']} B); {info['n_tasks']} separate models would be {info['n_tasks']} x")
    if "fp16_bytes" in row:
        print(f"   fp16 base: {row['fp16_bytes']} B = {row['fp16_ratio_to_dense']:.3f} x dense fp32")


if __name__ == "__main__":
    sys.exit(main())
