"""`edgecl inspect FILE [--json]`: where an artifact's bytes go — per component and per task, bytes, parameters and
bits per parameter, and the masks' stored size against their order-0 entropy. Torch-free."""
from __future__ import annotations

import argparse
import json

from edgecl.checks import path_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=path_arg, help="artifact file (.edgecl)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON (for tools)")
    parser.add_argument("--blobs", action="store_true", help="also list every stored tensor and its encoding")


def main(args: argparse.Namespace) -> int:
    from edgecl.artifact import inspect
    from edgecl.inspect_report import format_report

    info = inspect(args.file)
    print(json.dumps(info, indent=2) if args.json else format_report(info, blobs=args.blobs))
    return 0
