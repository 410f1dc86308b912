"""`edgecl train` as one library call: check the request, train (or continue a deployed artifact), write
DIR/model.edgecl (one rename, last of its writes), the training state beside it for methods that have one, then
DIR/spec.json (the architecture, reusable as --arch), DIR/acc_matrix.png and DIR/results.json, which describe that
model — so a kill never leaves side files ahead of it.

Every name and value of the request is checked before torch is imported or data is built (`check_request`), so a
typo is refused in a fraction of a second with a `UsageError`, not after an import and a traceback."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from edgecl.arch.factories import check_arch_string
from edgecl.errors import UsageError
from edgecl.train import registry
from edgecl.train.compute import check_device, check_threads, require_device, set_threads
from edgecl.train.data import check_stream

ARTIFACT_NAME = "model.edgecl"


def check_request(method_name: str, stream_name: str, *, arch_name: str | None = None, n_tasks: int | None = None,
                  seed: int = 0, overrides: dict[str, Any] | None = None, device: str = "cpu",
                  threads: int | None = None, resume: str | None = None,
                  input_shape: tuple[int, ...] | None = None) -> None:
    """Everything `train_and_write` can refuse without torch or data: names, config values, flags."""
    registry.entry(method_name)  # an unknown method is the first thing to name
    if resume:
        if n_tasks is None:
            raise UsageError("--resume needs --tasks N, the number of new tasks to add")
        if overrides:
            raise UsageError("--resume keeps the artifact's method config; drop --set")
    registry.check_config(method_name, {"seed": seed, **(overrides or {})})
    if arch_name is not None:
        check_arch_string(arch_name)
    check_stream(stream_name, n_tasks, input_shape)
    check_device(device)
    check_threads(threads)


def train_and_write(method_name: str, stream_name: str, out_dir: str, *, arch_name: str | None = None,
                    n_tasks: int | None = None, seed: int = 0, overrides: dict[str, Any] | None = None,
                    device: str = "cpu", threads: int | None = None, progress: bool = True,
                    resume: str | None = None, input_shape: tuple[int, ...] | None = None,
                    classifier: bool | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or, with `resume`, continue a deployed artifact), print the accuracy matrix, write results.json +
    heatmap + artifact (+ training state). `arch_name`: a preset, a .json spec or module:factory (default: mlp, or
    with `resume` the artifact's own); `input_shape` resizes the digit streams; `classifier=False` takes a factory's
    module as the trunk (see `edgecl.arch.from_torch`). `threads`: torch CPU threads (None leaves torch's setting).
    Returns the results dict."""
    check_request(method_name, stream_name, arch_name=arch_name, n_tasks=n_tasks, seed=seed, overrides=overrides,
                  device=device, threads=threads, resume=resume, input_shape=input_shape)
    set_threads(threads)
    require_device(device)
    from edgecl import artifact
    from edgecl.arch.factories import resolve_arch
    from edgecl.train import engine
    from edgecl.train.data import make_stream
    from edgecl.train.outputs import format_matrix, save_json, write_results
    from edgecl.train.protocol import TrainContext, check_resumable
    from edgecl.train.state import load_training_state, save_training_state

    previous = None
    if resume:
        with artifact.load(resume) as opened:
            previous = opened.to_packed()  # decoded and verified: every checksum, consistency
    first = previous.n_tasks if previous else 0
    stream = make_stream(stream_name, first + n_tasks if n_tasks is not None else None, seed, input_shape)
    if previous and arch_name is None:
        arch = previous.arch  # continue the deployed architecture
    else:
        arch = resolve_arch(arch_name or "mlp", stream.input_shape, classifier=classifier)
    if tuple(arch["input_shape"]) != tuple(stream.input_shape):
        raise UsageError(f"architecture {arch['name']!r} takes inputs of shape {tuple(arch['input_shape'])}, the stream "
                         f"{stream.name!r} has {tuple(stream.input_shape)} (--input-shape resizes the digit streams)")
    if previous:
        try:
            check_resumable(previous, method_name, arch)
        except UsageError as exc:
            raise UsageError(f"{resume}: {exc}") from None
        method = registry.create(method_name, arch, previous.config)
        method.resume(previous, load_training_state(resume))
    else:
        method = registry.create(method_name, arch, {"seed": seed, **(overrides or {})})
    log(f"edgecl: {method_name} on {stream.name} ({len(stream.tasks)} tasks, {arch['name']}"
        f"{f', resuming after task {first - 1}' if first else ''}), config {json.dumps(method.config.to_json())}")
    result = engine.run(method, stream, TrainContext(device=device, progress=progress), first_task=first, log=log)
    data = result.to_json()
    data["artifact"] = write_model(result.packed, out_dir, resume=resume, keeps=method.append_keeps, log=log)
    save_training_state(method.training_state(), data["artifact"]["path"])
    save_json(arch, os.path.join(out_dir, "spec.json"))  # the architecture, reusable as --arch DIR/spec.json
    write_results(data, result.acc_matrix, f"{result.method} on {result.stream}", out_dir)  # last: they describe it
    log(format_matrix(result.acc_matrix))
    log(f"ACC {100 * data['acc']:.2f}%  BWT {100 * data['bwt']:+.2f} points  artifact {data['artifact']['path']} "
        f"({data['artifact']['bytes'] / 1024:.1f} KiB)")
    return data


def write_model(packed: Any, out_dir: str, *, resume: str | None = None, keeps: str = "all",
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """DIR/model.edgecl, replaced in one rename (the new file is complete and checked first), so a kill at any point
    leaves DIR's previous model or the new one. With `resume`, the model extends that artifact, and every earlier
    task is verified to materialise as the method guarantees before the rename (`artifact.append_task`)."""
    from edgecl import artifact

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ARTIFACT_NAME)
    if resume:
        done = artifact.append_task(resume, packed, keeps=keeps, out=path)  # refuses if that would change them
        what = "every tensor" if keeps == "all" else "their heads"
        log(f"verified: tasks 0-{done['tasks'] - 1} of {resume} materialise bit-identically from the new artifact "
            f"({what}, the {packed.method} guarantee)")
    else:
        artifact.save(packed, path)
    return {"path": path, "bytes": os.path.getsize(path)}
