"""edgecl: continual learning that ships — train tasks one after another, pack one artifact, export it, run it on a
device within a memory budget. `edgecl COMMAND --help` lists a command's options.
Exit codes: 0 ok, 1 a check failed (e.g. audit over budget), 2 bad input or usage."""
# Each subcommand lives in its own module under `edgecl.commands` exposing `add_arguments(parser)` and
# `main(args) -> int`; only the chosen one is imported, so `edgecl run` on a device never imports torch.
from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
import warnings
from typing import Any, Callable

from edgecl import __version__
from edgecl.errors import EdgeclError, EdgeclWarning

COMMANDS = {
    "demo": "LPS on permuted digits end to end: train, pack, export check, run on the runtime, budget summary",
    "train": "train a method on a task stream; write results.json, a heatmap and the artifact",
    "inspect": "bytes and bits per parameter of an artifact, per component and per task",
    "export": "per-task ONNX (folded, compacted) or TensorRT engines from an artifact",
    "run": "infer one task of an artifact on an input .npy (torch-free)",
    "audit": "memory budget report of an artifact; exit 1 when it does not fit",
    "compare": "train several methods on one stream and compare accuracy, bytes and speed",
    "doctor": "what the runtime will use on this machine: execution providers, compiled fill, versions",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="edgecl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgecl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / version / "invalid choice" (exit 2)
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(f"edgecl.commands.{name}")
    cmd = argparse.ArgumentParser(prog=f"edgecl {name}", description=COMMANDS[name])
    module.add_arguments(cmd)
    try:
        args = cmd.parse_args(_glue_dash_values(cmd, argv[1:]))
    except SystemExit as exc:  # argparse refused a flag (2) or printed --help (0): an exit code, as from a command
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", EdgeclWarning)
            warnings.showwarning = _labelled(name, warnings.showwarning)
            code = int(module.main(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
            return code
    except EdgeclError as exc:
        print(f"edgecl {name}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_OF:
            raise
        print(f"edgecl {name}: error: {_missing_extra(name, exc.name or '')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgecl {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


EXTRA_OF = {"torch": "train", "sklearn": "train", "scipy": "train", "tqdm": "train", "matplotlib": "train",
            "torchvision": "vision", "timm": "vision"}
"""Packages a device install (numpy + onnxruntime: the `runtime` extra) lacks, and the extra that brings each."""


def _missing_extra(command: str, module: str) -> str:
    """The message for a command that needs a package this install does not have: which one, and the pip line,
    instead of an import traceback (`edgecl train` on a torch-free device)."""
    package = module.split(".")[0]
    return (f"{package} is not installed: `edgecl {command}` needs the '{EXTRA_OF[package]}' extra (pip install "
            f"'edgecl[{EXTRA_OF[package]}]'); a device install (numpy + onnxruntime) runs inspect, audit, export, run "
            f"and doctor")


def _labelled(name: str, show: Callable[..., None]) -> Callable[..., None]:
    """`warnings.showwarning` that prints edgecl's own warnings as `edgecl NAME: warning: ...`, and any other
    (torch's, numpy's) in Python's usual format, with its file and line, so nobody takes it for edgecl's."""
    def labelled(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, EdgeclWarning):
            print(f"edgecl {name}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)
    return labelled


def _stdout_closed() -> int:
    """The reader of our output went away (`edgecl inspect M | head -1`): stop quietly. stdout is pointed at devnull
    so the interpreter's final flush does not raise again (the Python docs' recipe, "Note on SIGPIPE"); the code is
    a SIGPIPE death's, 128 + 13."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # stdout is not a file descriptor (captured in a test)
    return 141


def _glue_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argparse reads `--budget -5MiB` as two options ("expected one argument"): a value that starts with '-' and is
    not an option itself is glued to its option (`--budget=-5MiB`), so the command's own check names what is wrong."""
    takes_value = {opt for action in parser._actions if action.option_strings and action.nargs is None
                   for opt in action.option_strings}
    known = {opt for action in parser._actions for opt in action.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in known:
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
