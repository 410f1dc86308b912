"""`edgecl export ARTIFACT --format onnx|tensorrt [--tasks all|0,3] [--fp16] [--no-compact] --out DIR`.

Exit codes: 0 written; 1 TensorRT requested but the package or a GPU is missing (nothing written); 2 bad input
(unreadable artifact, unknown task, bad --tasks syntax)."""
from __future__ import annotations

import argparse

from edgecl.checks import MAX_BATCH, int_arg, path_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", type=path_arg, help="artifact file written by `edgecl train` or `edgecl demo`")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                        help="onnx: one graph per task; tensorrt: also one engine per task")
    parser.add_argument("--tasks", default="all", help="'all' (default), indices/ranges/names: '0,3', '2-5'")
    parser.add_argument("--fp16", action="store_true",
                        help="onnx: store weights in float16 (float32 in/out); tensorrt: build fp16 engines")
    parser.add_argument("--no-compact", action="store_true", help="keep pruned rows/columns (dense graphs)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the ONNX Runtime check of each compacted graph against its dense graph")
    parser.add_argument("--max-batch", type=int_arg(1, MAX_BATCH), default=256,
                        help="tensorrt: largest batch of the profile")
    parser.add_argument("--latency", action="store_true",
                        help="time each compacted graph against its dense one at batch 1 and 64 (CPU, one thread)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, type=path_arg, help="output folder (created if missing)")


def main(args: argparse.Namespace) -> int:
    from edgecl.export.driver import export_artifact

    return export_artifact(args.artifact, args.out, format=args.format, tasks=args.tasks, fp16=args.fp16,
                           compact=not args.no_compact, verify=not args.no_verify, max_batch=args.max_batch,
                           progress=not args.quiet, latency=args.latency)
