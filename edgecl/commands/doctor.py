"""`edgecl doctor [--json]`: what the runtime will use on this machine (execution providers, compiled or numpy fill,
versions) and a real CPU check. Exit 0 when the CPU runtime works here, 1 when it cannot."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from edgecl.doctor import print_report

    return print_report(as_json=args.json)
