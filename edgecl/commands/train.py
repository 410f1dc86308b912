"""`edgecl train`: one method on one stream → DIR/results.json, DIR/acc_matrix.png, DIR/model.edgecl."""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import numpy as np

from edgecl.errors import UsageError

ARTIFACT_NAME = "model.edgecl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="lps, agscl, halrp, rgo, finetune or stl")
    p.add_argument("--stream", default="permuted-digits",
                   help="permuted-digits, split-digits, rotated-digits, synthetic, or a .npz file (see README)")
    p.add_argument("--tasks", type=int, default=None,
                   help="number of tasks to take from the stream (with --resume: number of NEW tasks to add)")
    p.add_argument("--resume", metavar="ARTIFACT", default=None,
                   help="add tasks to a deployed artifact made by the same method and architecture; earlier tasks "
                        "stay bit-identical (verified before the new artifact is written to --out)")
    p.add_argument("--arch", default="mlp", help="architecture preset: mlp, lenet, resnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the method (JSON value), e.g. --set epochs=5")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    # One thread by default: the built-in models are small, and two OpenMP threads on a busy 2-core machine stall
    # whenever one loses its core (measured ~10x slower under load).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def set_threads(n: int) -> None:
    if n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs; VALUE is JSON when it parses, else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_and_write(method_name: str, stream_name: str, out_dir: str, *, arch_name: str = "mlp",
                    n_tasks: int | None = None, seed: int = 0, overrides: dict[str, Any] | None = None,
                    device: str = "cpu", progress: bool = True, resume: str | None = None,
                    log=print) -> dict[str, Any]:
    """Train (or, with `resume`, continue a deployed artifact), print the accuracy matrix, write results.json +
    heatmap + artifact. Returns the results dict."""
    from edgecl import artifact
    from edgecl.arch import preset
    from edgecl.train import engine, registry
    from edgecl.train.data import make_stream
    from edgecl.train.protocol import TrainContext, check_resumable

    _check_device(device)
    previous = artifact.as_packed(resume) if resume else None
    state = load_training_state(resume) if resume else None
    first = previous.n_tasks if previous else 0
    if previous and n_tasks is None:
        raise UsageError("--resume needs --tasks N, the number of new tasks to add")
    if previous and overrides:
        raise UsageError("--resume keeps the artifact's method config; drop --set")
    stream = make_stream(stream_name, first + n_tasks if n_tasks is not None else None, seed)
    arch = preset(arch_name, stream.input_shape)
    if previous:
        try:
            check_resumable(previous, method_name, arch)
        except UsageError as exc:
            raise UsageError(f"{resume}: {exc}") from None
        method = registry.create(method_name, arch, previous.config)
        method.resume(previous, state)
    else:
        method = registry.create(method_name, arch, {"seed": seed, **(overrides or {})})
    log(f"edgecl: {method_name} on {stream.name} ({len(stream.tasks)} tasks, {arch_name}"
        f"{f', resuming after task {first - 1}' if first else ''}), config {json.dumps(method.config.to_json())}")
    result = engine.run(method, stream, TrainContext(device=device, progress=progress), first_task=first, log=log)
    data = engine.write_results(result, out_dir)
    path = os.path.join(out_dir, ARTIFACT_NAME)
    if previous:
        if os.path.abspath(path) != os.path.abspath(resume):
            shutil.copyfile(resume, path)
        artifact.append_task(path, result.packed, keeps=method.append_keeps)  # refuses if that would change
    else:
        artifact.save(result.packed, path)
    save_training_state(method.training_state(), path)
    data["artifact"] = {"path": path, "bytes": os.path.getsize(path)}
    engine.save_json(data, os.path.join(out_dir, "results.json"))
    log(engine.format_matrix(result.acc_matrix))
    log(f"ACC {100 * data['acc']:.2f}%  BWT {100 * data['bwt']:+.2f} points  artifact {path} "
        f"({data['artifact']['bytes'] / 1024:.1f} KiB)")
    return data


def state_path(artifact_path: str) -> str:
    """Where a method's training state (e.g. RGO's projection matrices) lives: beside the artifact, not in it."""
    return f"{artifact_path}.state"


def save_training_state(state: dict[str, Any], artifact_path: str) -> None:
    """safetensors (no pickle), written atomically; nothing is written for methods without training state."""
    if not state:
        return
    from safetensors.numpy import save

    from edgecl.io import write_atomic

    write_atomic(state_path(artifact_path), save({k: np.ascontiguousarray(v) for k, v in state.items()}))


def load_training_state(artifact_path: str) -> dict[str, Any] | None:
    """The state saved beside an artifact, or None when there is none; a damaged file is a clear error."""
    path = state_path(artifact_path)
    if not os.path.exists(path):
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable training state ({exc})") from None


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to torch")


def main(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    train_and_write(args.method, args.stream, args.out, arch_name=args.arch, n_tasks=args.tasks, seed=args.seed,
                    overrides=parse_overrides(args.set), device=args.device, progress=not args.no_progress,
                    resume=args.resume)
    return 0
