"""`edgecl train` as one library call: check the request, train (or continue a deployed artifact), write
DIR/model.edgecl (one rename, last of its writes), the training state beside it for methods that have one, then
DIR/spec.json (the architecture, reusable as --arch), DIR/acc_matrix.png and DIR/results.json, which describe that
model — so a kill never leaves side files ahead of it.

Every name and value of the request is checked before torch is imported or data is built (`check_request`), so a
typo is refused in a fraction of a second with a `UsageError`, not after an import and a traceback.

Under torchrun (or `edgecl train --nproc N`) every rank runs this call: each checks that all ranks hold the same
request and data, trains (`edgecl.train.distributed`), and only rank 0 logs and writes, after a barrier that every
rank reaches only when its training succeeded."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from edgecl.arch.factories import check_arch_string
from edgecl.errors import UsageError
from edgecl.train import registry
from edgecl.train.compute import check_device, check_threads, require_device, set_threads
from edgecl.train.data import StreamTooShort, check_stream
from edgecl.train.initial import check_init_source

ARTIFACT_NAME = "model.edgecl"


def check_request(method_name: str, stream_name: str, *, arch_name: str | None = None, n_tasks: int | None = None,
                  seed: int | None = None, overrides: dict[str, Any] | None = None, device: str = "cpu",
                  threads: int | None = None, resume: str | None = None,
                  input_shape: tuple[int, ...] | None = None, init_weights: str | None = None,
                  factory_args: dict[str, Any] | None = None) -> None:
    """Everything `train_and_write` can refuse without torch or data: names, config values, flags."""
    registry.entry(method_name)  # an unknown method is the first thing to name
    if resume:
        if n_tasks is None:
            raise UsageError("--resume needs --tasks N, the number of new tasks to add")
        if overrides:
            raise UsageError("--resume keeps the artifact's method config; drop --set")
    if seed is not None and "seed" in (overrides or {}) and overrides["seed"] != seed:
        raise UsageError(f"--seed {seed} and --set seed={overrides['seed']} disagree; give one")
    registry.check_config(method_name, {**({} if seed is None else {"seed": seed}), **(overrides or {})})
    if arch_name is not None or factory_args:
        check_arch_string(arch_name, factory_args)
    check_stream(stream_name, n_tasks, input_shape)
    check_device(device)
    check_threads(threads)
    if init_weights is not None:
        check_init_source(init_weights, arch_name, resume)


def train_and_write(method_name: str, stream_name: str, out_dir: str, *, arch_name: str | None = None,
                    n_tasks: int | None = None, seed: int | None = None, overrides: dict[str, Any] | None = None,
                    device: str = "cpu", threads: int | None = None, progress: bool = True,
                    resume: str | None = None, input_shape: tuple[int, ...] | None = None,
                    classifier: bool | None = None, init_weights: str | None = None,
                    factory_args: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or, with `resume`, continue a deployed artifact), print the accuracy matrix, write results.json +
    heatmap + artifact (+ training state). `arch_name`: a preset, a .json spec or module:factory (default: mlp, or
    with `resume` the artifact's own); `input_shape` resizes the digit streams; `classifier=False` takes a factory's
    module as the trunk (see `edgecl.arch.from_torch`). `threads`: torch CPU threads (None leaves torch's setting).
    `seed` (default 0; with `resume`, the artifact's) seeds the method and a built-in stream's data. With `resume`
    the stream must hold the artifact's tasks followed by `n_tasks` new ones (`check_resumed_stream`). Returns the
    results dict."""
    check_request(method_name, stream_name, arch_name=arch_name, n_tasks=n_tasks, seed=seed, overrides=overrides,
                  device=device, threads=threads, resume=resume, input_shape=input_shape, init_weights=init_weights,
                  factory_args=factory_args)
    set_threads(threads)
    require_device(device)
    from edgecl.train import distributed

    with distributed.joined(device) as world, distributed.rank_errors():
        if world.is_main:  # only rank 0 writes: refuse an unusable --out before anyone trains
            check_out_dir(out_dir, {"--arch": arch_name, "--stream": stream_name, "--init-weights": init_weights})
        return _train(method_name, stream_name, out_dir, world, dict(
            arch_name=arch_name, n_tasks=n_tasks, seed=seed, overrides=overrides, device=device, progress=progress,
            resume=resume, input_shape=input_shape, classifier=classifier, init_weights=init_weights,
            factory_args=factory_args, log=log if world.is_main else _quiet))


def _train(method_name: str, stream_name: str, out_dir: str, world: Any, request: dict[str, Any]) -> dict[str, Any]:
    """`train_and_write`'s work on one rank (`world`, an `edgecl.train.distributed.World`), its keyword arguments
    in `request`: every rank trains; rank 0 writes, after a barrier that every rank reaches only once its training
    succeeded."""
    from edgecl import artifact
    import torch

    from edgecl.arch.factories import resolve_arch_and_module
    from edgecl.train import distributed, engine
    from edgecl.train.data import make_stream
    from edgecl.train.initial import check_resumed_start
    from edgecl.train.outputs import format_matrix, save_json, write_results
    from edgecl.train.protocol import TrainContext, check_resumable
    from edgecl.train.state import save_training_state

    resume, n_tasks, arch_name, seed, log = (request[k] for k in ("resume", "n_tasks", "arch_name", "seed", "log"))
    previous = None
    if resume:
        with artifact.load(resume) as opened:
            previous = opened.to_packed()  # decoded and verified: every checksum, consistency
    first = previous.n_tasks if previous else 0
    # one seed for the method and the stream (`--seed` or `--set seed=`, which check_request made agree), so a
    # resume, which rebuilds the stream with the artifact's seed, scores the old tasks on their own data
    chosen = (request["overrides"] or {}).get("seed", seed)
    seed = resumed_seed(previous, seed, resume) if previous else (0 if chosen is None else chosen)
    try:
        stream = make_stream(stream_name, first + n_tasks if n_tasks is not None else None, seed,
                             request["input_shape"])
    except StreamTooShort as exc:
        if not previous:
            raise
        raise UsageError(f"{exc}: {resume} holds {first} task{'s' * (first != 1)} and --tasks {n_tasks} adds "
                         f"{n_tasks}, so the stream must hold {first + n_tasks}: {RESUME_STREAM}") from None
    if previous:
        check_resumed_stream(previous, stream, resume)
    module = None
    if previous and arch_name is None:
        arch = previous.arch  # continue the deployed architecture
    else:
        torch.manual_seed(seed)  # a factory's own initialisation, the start with --init-weights module, is the seed's
        arch, module = resolve_arch_and_module(arch_name or "mlp", stream.input_shape,
                                               classifier=request["classifier"], factory_args=request["factory_args"])
    if tuple(arch["input_shape"]) != tuple(stream.input_shape):
        raise UsageError(f"architecture {arch['name']!r} takes inputs of shape {tuple(arch['input_shape'])}, the stream "
                         f"{stream.name!r} has {tuple(stream.input_shape)} (--input-shape resizes the digit streams)")
    if previous:
        try:
            check_resumable(previous, method_name, arch)
        except UsageError as exc:
            raise UsageError(f"{resume}: {exc}") from None
    start = chosen_start(request["init_weights"], arch, module, arch_name)
    if previous:
        redraws = registry.method_class(method_name).redraws_trunk
        kept = check_resumed_start(previous.extra, start, resume, redraws)
        method = registry.create(method_name, arch, previous.config, start=start)
        method.start_record = kept
        method.resume(previous, resumed_state(method, resume))
    else:
        method = registry.create(method_name, arch, {"seed": seed, **(request["overrides"] or {})}, start=start)
    if world.size > 1:
        check_ranks_agree(method, stream, previous, world)
    log(f"edgecl: {method_name} on {stream.name} ({len(stream.tasks)} tasks, {arch['name']}"
        f"{f', resuming after task {first - 1}' if first else ''}"
        f"{f', {world.size} ranks ({world.backend})' if world.size > 1 else ''}), "
        f"config {json.dumps(method.config.to_json())}")
    ctx = TrainContext(device=world.device(request["device"]), progress=request["progress"] and world.is_main)
    result = engine.run(method, stream, ctx, first_task=first, log=log)
    data = result.to_json()
    if world.size > 1:
        data["distributed"] = {**world.describe(method.config.batch_size), **data.get("distributed", {})}
    distributed.barrier()  # reached by every rank only when its training succeeded; rank 0 writes after it
    if world.is_main:
        data["artifact"] = write_model(result.packed, out_dir, resume=resume, keeps=method.append_keeps, log=log)
        save_training_state(method.training_state(), data["artifact"]["path"])
        save_json(arch, os.path.join(out_dir, "spec.json"))  # the architecture, reusable as --arch DIR/spec.json
        write_results(data, result.acc_matrix, f"{result.method} on {result.stream}", out_dir)  # last: they describe it
        log(format_matrix(result.acc_matrix))
        log(f"ACC {100 * data['acc']:.2f}%  BWT {100 * data['bwt']:+.2f} points  artifact {data['artifact']['path']} "
            f"({data['artifact']['bytes'] / 1024:.1f} KiB)")
    data["artifact"] = distributed.from_main(data.get("artifact"))  # every rank ends when rank 0 has written
    return data


def chosen_start(init_weights: str | None, arch: Any, module: Any, arch_name: str | None) -> Any:
    """The checked starting weights --init-weights names (None: a fresh draw): the factory module's or a file's."""
    from edgecl.train.initial import MODULE, starting_weights

    if init_weights is None:
        return None
    if init_weights == MODULE:
        # the label ships in the artifact: the factory's file name, not where it lay on this machine
        return starting_weights(module, arch, label=f"the module of --arch {os.path.basename(arch_name)}")
    return starting_weights(init_weights, arch)


def resumed_state(method: Any, resume: str) -> dict[str, Any] | None:
    """The training state a method resumes from, read only for methods that keep one (a stale `.state` beside the
    artifact, left by another model, must not matter to the others)."""
    if not method.has_training_state:
        return None
    from edgecl.train.state import load_training_state, state_path

    state = load_training_state(resume)
    if state is None:
        raise UsageError(f"{resume}: {method.name} resumes from its training state {state_path(resume)}, which is "
                         "missing: `edgecl train` writes it beside the artifact; keep the two together")
    return state


RESUME_STREAM = ("the artifact's tasks first, as it was trained on them (the same built-in stream and seed, or a "
                 "stream file of the same name holding them as task0, task1, …), then the new ones")


def resumed_seed(previous: Any, seed: int | None, resume: str) -> int:
    """The seed a resumed run uses: the artifact's (its method config's), which also rebuilds a built-in stream's
    earlier tasks exactly; another --seed would score those tasks on other data, so it is refused."""
    kept = int(previous.config.get("seed", 0))
    if seed is not None and seed != kept:
        raise UsageError(f"{resume} was trained with seed {kept}; --resume keeps it (it also rebuilds the stream's "
                         f"earlier tasks): drop --seed {seed}")
    return kept


def check_resumed_stream(previous: Any, stream: Any, resume: str) -> None:
    """A resumed run scores the artifact's tasks on the stream's first tasks and learns the rest: those first tasks
    must be the artifact's own (same names, same class counts), else its ACC and BWT would measure other data."""
    if stream.name == "rotated-digits" and previous.n_tasks > 1:
        raise UsageError(f"{resume}: rotated-digits spreads its angles over the whole task count, so its earlier tasks "
                         "change with --tasks and cannot be rebuilt: train every rotated task in one run, or resume "
                         "from a stream file holding the old tasks and then the new ones")
    for t, (old, new) in enumerate(zip(previous.tasks, stream.tasks)):
        if (old.name, old.n_classes) != (new.name, new.n_classes):
            raise UsageError(f"{resume}: its task {t} is {old.name!r} with {old.n_classes} classes, the stream "
                             f"{stream.name!r} has {new.name!r} with {new.n_classes} there; --resume needs a stream "
                             f"holding {RESUME_STREAM}")


def check_ranks_agree(method: Any, stream: Any, previous: Any, world: Any) -> None:
    """Every rank must train the same thing: the same config, architecture, stream data and resumed model. A
    different stream file per rank (the data are sharded by slicing every global batch, not by reading different
    files) would silently train a model no single process could; it is refused on every rank before training."""
    from edgecl.train import distributed

    if method.config.batch_size < world.size:
        raise UsageError(f"batch_size={method.config.batch_size} is the global batch, split over {world.size} ranks: "
                         f"it must be at least the number of ranks")
    request = {"method": method.name, "config": method.config.to_json(), "arch": method.arch,
               "start": method.start.sha256 if method.start else None,
               "stream": [(t.x_train, t.y_train, t.x_test, t.y_test) for t in stream.tasks], "resumed": previous}
    distributed.check_identical(distributed.state_digest(request), "the method, settings, stream or resumed model")


def check_out_dir(out_dir: str, reads: dict[str, str | None] | None = None) -> None:
    """--out must be a folder, or creatable as one, whose run files would replace none of the inputs (`reads`:
    flag → path; `outputs.check_run_outputs`); found before training, not after it."""
    if not out_dir:
        raise UsageError("--out: an empty path; name the folder to write the run into")
    path = os.path.abspath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {out_dir}: exists and is not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out_dir}: cannot create or write it ({parent} is not a writable folder)")
    from edgecl.train.outputs import check_run_outputs

    check_run_outputs(out_dir, reads or {})


def _quiet(_line: str) -> None:
    """The log of every rank but 0: one rank reports for all."""


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
