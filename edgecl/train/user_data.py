"""Your own tasks — numpy arrays (`Stream.from_arrays`) or a `.npz` stream file — checked before any training.

Policy (README, "Your own data"; tests/test_data.py):
- inputs are real floating-point arrays (float16/32/64), cast to float32 and finite after the cast (a float64 value
  beyond float32's range is refused, naming the task and field, not trained on as inf); integer and bool inputs are
  refused like the runtime refuses them (`edgecl.runtime.inputs`): the deployed model takes scaled floats, so a
  model trained on raw integers could not be fed the same data; complex, string, date and object arrays are not
  numbers a model can take;
- labels are integer arrays of 0..C−1 with C ≤ the artifact's class limit (`MAX_CLASSES`), and every test label
  occurs in its training split (a class never trained on cannot be predicted);
- task names are the stream's name plus '-index' (a file's stem: `my-tasks.npz` → my-tasks-0, my-tasks-1, …) and
  must be names the artifact can store and select, checked here rather than when the trained model is written;
- a stream file holds exactly task0_x_train, task0_y_train, task0_x_test, task0_y_test, task1_…, numbered without
  gaps: a stray or misspelt key is refused, never skipped along with the tasks after it.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any

import numpy as np

from edgecl.artifact.limits import MAX_CLASSES
from edgecl.artifact.manifest import task_names_problem
from edgecl.errors import UsageError

FIELDS = ("x_train", "y_train", "x_test", "y_test")
_KEY = re.compile(r"task(0|[1-9][0-9]*)_(x_train|y_train|x_test|y_test)")
_HINT = "README, 'Your own data'"


class StreamTooShort(UsageError):
    """A stream holds fewer tasks than asked for (`held`); `edgecl train --resume` says what its stream must hold."""

    def __init__(self, message: str, held: int):
        super().__init__(message)
        self.held = held


CheckedTask = tuple  # (name, x_train float32, y_train int64, x_test float32, y_test int64, n_classes): TaskData's fields


def checked_tasks(name: str, tasks: list[tuple],
                  input_shape: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], list[CheckedTask]]:
    """What `Stream.from_arrays` builds from: every task checked (`checked_task`), one input shape, storable task
    names. Returns the input shape and each task's fields (this module builds no stream object: `edgecl.train.data`
    does, and imports this one)."""
    if not tasks:
        raise UsageError(f"stream {name!r} has no tasks")
    problem = task_names_problem([f"{name}-{i}" for i in range(len(tasks))])
    if problem:
        raise UsageError(f"stream {name!r}: task names are the stream's name + '-index', and {problem}: choose "
                         "another stream name")
    out = []
    for i, tup in enumerate(tasks):
        if len(tup) != 4:
            raise UsageError(f"task {i}: expected (x_train, y_train, x_test, y_test), got {len(tup)} items")
        out.append(checked_task(f"{name}-{i}", i, *(_plain(v, i, f) for v, f in zip(tup, FIELDS))))
    shape = tuple(input_shape or out[0][1].shape[1:])
    origin = "input_shape" if input_shape else "task 0 x_train's"
    for i, t in enumerate(out):
        for field, x in (("x_train", t[1]), ("x_test", t[3])):
            if x.shape[1:] != shape:  # name the array that differs, not its task's x_train
                raise UsageError(f"task {i} {field} has input shape {x.shape[1:]}, the stream's is {shape} ({origin}): "
                                 "every task's inputs have one shape, (N, *input_shape)")
    return shape, out


def _plain(value: Any, i: int, field: str) -> np.ndarray:
    """A plain ndarray; a masked array is refused (its hidden values would be trained on), as the runtime does."""
    masked = sys.modules.get("numpy.ma")
    if masked is not None and isinstance(value, masked.MaskedArray):
        raise UsageError(f"task {i} {field} is a numpy masked array: training cannot honour a mask and would use the "
                         "masked values; pass x.filled(value) or the plain array")
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"task {i} {field} is not an array: {exc}") from None


def checked_task(name: str, i: int, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray,
                 yte: np.ndarray) -> CheckedTask:
    """One task as float32 inputs and int64 labels, or a UsageError naming the task and field (module policy)."""
    for what, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise UsageError(f"task {i} ({what}): need x of shape (N, ...) and y of shape (N,), got {x.shape} "
                             f"and {y.shape}")
        _check_labels(y, i, f"y_{what}")
        _check_input_dtype(x, i, f"x_{what}")
    _check_test_classes_trained(ytr, yte, i)
    xs = [_finite_float32(x, i, f"x_{what}") for what, x in (("train", xtr), ("test", xte))]
    n_classes = int(max(ytr.max(), yte.max())) + 1
    return name, xs[0], ytr.astype(np.int64), xs[1], yte.astype(np.int64), n_classes


def _check_labels(y: np.ndarray, i: int, field: str) -> None:
    if y.dtype.kind not in "iu":
        raise UsageError(f"task {i} {field} has dtype {y.dtype}; labels must be integers 0..C-1 (e.g. "
                         "y.astype(np.int64))")
    low, high = int(y.min()), int(y.max())  # Python ints: a uint64 label ≥ 2**63 is compared, not overflowed
    if low < 0:
        raise UsageError(f"task {i} {field} has label {low}; labels must be non-negative integers 0..C-1")
    if high >= MAX_CLASSES:
        raise UsageError(f"task {i} {field} has label {high}; a task has at most {MAX_CLASSES} classes (labels "
                         f"0-{MAX_CLASSES - 1}: the artifact's limit, docs/ARTIFACT.md)")


def _check_test_classes_trained(ytr: np.ndarray, yte: np.ndarray, i: int) -> None:
    """Every test label is a class the training split holds: one it never shows cannot be learned, so its test
    samples would be scored wrong by construction (a shifted or swapped label array read as a weak model)."""
    unseen = np.setdiff1d(yte, ytr)
    if unseen.size:
        shown = ", ".join(str(int(v)) for v in unseen[:8]) + (", …" if unseen.size > 8 else "")
        raise UsageError(f"task {i} y_test has label{'s' * (unseen.size > 1)} {shown} that y_train never holds (its "
                         f"labels are {_labels(np.unique(ytr))}): a class never trained on cannot be predicted; add "
                         "training examples of it or drop those test samples")


def _labels(held: np.ndarray) -> str:
    """Sorted distinct labels as a reader checks them: 'a..b' when they are every label from a to b, else the
    first eight and the last (a range would hide the gap an unseen test label sits in)."""
    lo, hi = int(held[0]), int(held[-1])
    if held.size == hi - lo + 1:
        return f"{lo}..{hi}" if hi > lo else str(lo)
    return ", ".join(str(int(v)) for v in held[:8]) + (f", … {hi}" if held.size > 8 else "")


def _check_input_dtype(x: np.ndarray, i: int, field: str) -> None:
    kind = x.dtype.kind
    if kind == "f":
        return
    if kind in "iub":
        raise UsageError(f"task {i} {field} has dtype {x.dtype}; inputs must be floating point, scaled as you will "
                         "feed them on the device (e.g. x.astype(np.float32) / 255): the runtime refuses integer and "
                         "bool input, so a model trained on them could not be fed the same data")
    raise UsageError(f"task {i} {field} has dtype {x.dtype}, not real numbers; inputs must be a float array "
                     "(float16, float32 or float64)")


def _finite_float32(x: np.ndarray, i: int, field: str) -> np.ndarray:
    """x as float32, every value finite after the cast (what is trained on is what is checked)."""
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(out)
    if finite.all():
        return out
    first = tuple(int(v) for v in np.argwhere(~finite)[0])
    value = x[first]
    if np.isfinite(value):
        raise UsageError(f"task {i} {field} has {int((~finite).sum())} values beyond float32's range (first at index "
                         f"{first}: {float(value):.3g}; the model computes in float32, max 3.4e38): scale the inputs")
    raise UsageError(f"task {i} {field} contains {int((~finite).sum())} NaN or infinite values (first at index "
                     f"{first})")


def read_stream_file(path: str, n_tasks: int | None = None) -> tuple[str, tuple[int, ...], list[CheckedTask]]:
    """A user stream's name, input shape and checked tasks from an .npz holding task0_x_train, task0_y_train,
    task0_x_test, task0_y_test, task1_… (module policy); with `n_tasks`, its first n_tasks tasks (StreamTooShort
    when it holds fewer). Loaded with allow_pickle=False: a data file can never execute code."""
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        with np.load(path, allow_pickle=False) as z:
            count = _task_count(path, list(z.files))
            if n_tasks is not None and n_tasks > count:
                raise StreamTooShort(f"{path} holds {count} task{'s' * (count != 1)}, fewer than the "
                                     f"{n_tasks} asked for", count)
            count = n_tasks or count
            problem = task_names_problem([f"{name}-{i}" for i in range(count)])
            if problem:
                raise UsageError(f"{path}: task names come from the file name ({name}-0, {name}-1, …) and {problem}: "
                                 "rename the file")
            tasks = [tuple(z[f"task{i}_{f}"] for f in FIELDS) for i in range(count)]
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise UsageError(f"{path}: not a readable .npz stream file ({exc})") from None
    try:
        return (name, *checked_tasks(name, tasks))
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _task_count(path: str, keys: list[str]) -> int:
    """How many tasks the file's keys describe: every key task<i>_<field>, every task complete, no gaps."""
    stray = sorted(k for k in keys if not _KEY.fullmatch(k))
    if stray:
        raise UsageError(f"{path}: unexpected arrays {stray[:8]}; a stream file holds only task<i>_x_train, "
                         f"task<i>_y_train, task<i>_x_test and task<i>_y_test for i = 0, 1, … ({_HINT})")
    tasks: dict[int, set[str]] = {}
    for key in keys:
        index, field = _KEY.fullmatch(key).groups()
        tasks.setdefault(int(index), set()).add(field)
    if not tasks:
        raise UsageError(f"{path}: no task0_x_train array; a stream file holds task0_x_train, task0_y_train, "
                         f"task0_x_test, task0_y_test, task1_… ({_HINT})")
    gap = next(i for i in range(len(tasks) + 1) if i not in tasks)
    if gap < len(tasks):
        raise UsageError(f"{path}: has tasks {sorted(tasks)[:8]} but no task{gap}: tasks are numbered 0, 1, 2, … "
                         "without gaps")
    for i in range(len(tasks)):
        missing = [f"task{i}_{f}" for f in FIELDS if f not in tasks[i]]
        if missing:
            raise UsageError(f"{path}: missing arrays {missing}")
    return len(tasks)
