"""`edgecl run ARTIFACT --task N --input x.npy [--output y.npy]`: one task's logits on a device, without torch."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgecl.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact file (model.edgecl)")
    p.add_argument("--task", required=True, help="task index or name")
    p.add_argument("--input", required=True, help=".npy float array of shape (batch, *input_shape)")
    p.add_argument("--output", help="write the logits here as .npy (default: print predicted classes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, ort-tensorrt")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 32MiB (refuse rather than exceed it)")


def load_npy(path: str) -> np.ndarray:
    """An array from a .npy file, never unpickling; errors name the file."""
    if not Path(path).is_file():
        raise UsageError(f"input file {path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"input file {path!r} is not a readable .npy array ({exc})") from None


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime import TaskRuntime

    x = load_npy(args.input)
    runtime = TaskRuntime(args.artifact, backend=args.backend, device=args.device, budget=args.budget,
                          strategy="inplace", cache_tasks=1, max_batch=max(1, len(x)) if x.ndim else 1)
    task = runtime.switch(args.task)
    logits = runtime.infer(x)
    if args.output:
        try:
            np.save(args.output, logits)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output!r}: {exc.strerror or exc}") from None
        print(f"task {task} ({runtime.tasks[task]}): logits {logits.shape} written to {args.output}")
    else:
        print(" ".join(str(int(c)) for c in logits.argmax(1)))
    return 0
