"""`edgecl export ARTIFACT --format onnx|tensorrt [--tasks all|0,3] [--fp16] [--no-compact] --out DIR`.

Exit codes: 0 written; 1 TensorRT requested but the package or a GPU is missing (nothing written); 2 bad input
(unreadable artifact, unknown task, bad --tasks syntax)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact file written by `edgecl train` or `edgecl demo`")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                        help="onnx: one graph per task; tensorrt: also one engine per task")
    parser.add_argument("--tasks", default="all", help="'all' (default), indices/ranges/names: '0,3', '2-5'")
    parser.add_argument("--fp16", action="store_true",
                        help="onnx: store weights in float16 (float32 in/out); tensorrt: build fp16 engines")
    parser.add_argument("--no-compact", action="store_true", help="keep pruned rows/columns (dense graphs)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the ONNX Runtime check of each compacted graph against its dense graph")
    parser.add_argument("--max-batch", type=int, default=256, help="tensorrt: largest batch of the profile")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")


def main(args: argparse.Namespace) -> int:
    from edgecl.errors import UsageError
    from edgecl.export import build_engines, export_onnx
    from edgecl.export.tensorrt import TensorRTUnavailable

    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be ≥ 1, got {args.max_batch}")
    common = dict(tasks=args.tasks, fp16=args.fp16, compact=not args.no_compact, progress=not args.quiet)
    if args.format == "tensorrt":
        try:
            index = build_engines(args.artifact, args.out, max_batch=args.max_batch, **common)
        except TensorRTUnavailable as exc:
            print(f"edgecl export: TensorRT export is not possible here: {exc}", file=sys.stderr)
            return 1
    else:
        index = export_onnx(args.artifact, args.out, verify=not args.no_verify, **common)
    _summary(index, args.out)
    return 0


def _summary(index: dict, out: str) -> None:
    print(f"exported {len(index['tasks'])} task(s) of {index['method']}/{index['arch']} to {out} "
          f"(opset {index['opset']}, fp16 weights: {index['fp16']}, compact: {index['compact']})")
    print(f"{'task':>4}  {'name':<16} {'classes':>7} {'params dense':>12} {'compact':>9} {'bytes':>10}  file")
    for e in index["tasks"]:
        files = e["file"] + (f", {e['engine']}" if "engine" in e else "")
        print(f"{e['index']:>4}  {e['name'][:16]:<16} {e['n_classes']:>7} {e['params_dense']:>12} "
              f"{e['params_compact']:>9} {e['bytes']:>10}  {files}")
    print("index: index.json")
