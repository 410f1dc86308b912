"""Task streams. Built-in ones come from scikit-learn's bundled handwritten digits (1,797 real 8×8 images, no
download) with a fixed seeded split; `Stream.from_arrays` and `load_stream_file` bring your own tasks
(`edgecl.train.user_data`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from edgecl.artifact.limits import MAX_TASKS
from edgecl.errors import UsageError
from edgecl.train.user_data import StreamTooShort, checked_tasks, read_stream_file

STREAMS = ("permuted-digits", "split-digits", "rotated-digits", "synthetic")
SPLIT_TASKS = 5  # split-digits: the pairs 0/1, 2/3, 4/5, 6/7, 8/9


@dataclass
class TaskData:
    """One task: float32 inputs (N, *input_shape), int64 labels in [0, n_classes)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


@dataclass
class Stream:
    name: str
    input_shape: tuple[int, ...]
    tasks: list[TaskData] = field(default_factory=list)

    @classmethod
    def from_arrays(cls, name: str, tasks: list[tuple], input_shape: tuple[int, ...] | None = None) -> "Stream":
        """Your own tasks: a list of (x_train, y_train, x_test, y_test) numpy tuples, or torch Datasets' tensors
        converted with `.numpy()`. Float inputs sharing one shape; labels 0..C-1 per task; the tasks are named
        '{name}-0', '{name}-1', … (`edgecl.train.user_data` has the whole policy)."""
        shape, checked = checked_tasks(name, tasks, input_shape)
        return cls(name, shape, [TaskData(*t) for t in checked])


def _digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    return train_test_split(x, d.target.astype(np.int64), test_size=0.3, random_state=seed, stratify=d.target)


DIGITS_SHAPE = (1, 8, 8)
MAX_SIDE = 512  # 1,797 digits at 3×512×512 float32 are 5.6 GB: beyond that, bring your own data


def check_stream(name: str, n_tasks: int | None = None, input_shape: tuple[int, ...] | None = None) -> None:
    """Refuse an unknown stream name, task count or input shape before any data is built (nothing is loaded)."""
    if name not in STREAMS and not os.path.exists(name):
        if name.endswith(".npz") or os.sep in name or "/" in name:
            raise UsageError(f"stream file {name!r} not found")
        raise UsageError(f"unknown stream {name!r} (built-in: {', '.join(STREAMS)}; or a path to a .npz file)")
    if n_tasks is not None and not 1 <= n_tasks <= MAX_TASKS:
        raise UsageError(f"the number of tasks must be 1-{MAX_TASKS} (the artifact's limit, docs/ARTIFACT.md), got "
                         f"{n_tasks}")
    if name == "split-digits" and (n_tasks or 0) > SPLIT_TASKS:
        raise StreamTooShort(f"split-digits has {SPLIT_TASKS} tasks (pairs of digits), fewer than the {n_tasks} "
                             "asked for", SPLIT_TASKS)
    if input_shape is not None:
        shape = tuple(input_shape)
        if name not in STREAMS or name == "synthetic":
            raise UsageError(f"--input-shape applies to the digit streams; {name!r} brings its own shape")
        if len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape) or shape[0] not in (1, 3) \
                or not all(8 <= d <= MAX_SIDE for d in shape[1:]):
            raise UsageError(f"input shape {shape} must be channels,height,width with 1 or 3 channels and sides "
                             f"from 8 to {MAX_SIDE}, e.g. 3,32,32")
    if name in STREAMS:
        _check_size(name, n_tasks, tuple(input_shape or DIGITS_SHAPE))


def _check_size(name: str, n_tasks: int | None, shape: tuple[int, ...]) -> None:
    """Refuse a built-in stream whose data alone would not fit in this machine's memory, before building it (each
    task holds its own float32 copy of every image: 1,797 digits, or 800 synthetic samples, per task)."""
    n = n_tasks or (10 if name in ("permuted-digits", "synthetic") else 5)
    per_task = 800 * 64 * 4 if name == "synthetic" else 1797 * 4 * int(np.prod(shape))
    total = n * per_task
    memory = physical_memory()
    if memory and total > memory:
        raise UsageError(f"{name} with {n} tasks of shape {shape} would hold {total / 2**30:.1f} GiB of data, more "
                         f"than this machine's {memory / 2**30:.1f} GiB of memory; ask for fewer tasks (--tasks) or a "
                         "smaller --input-shape")


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """'3,32,32' → (3, 32, 32); None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape expects channels,height,width such as 3,32,32, got {text!r}") from None


def make_stream(name: str, n_tasks: int | None = None, seed: int = 0,
                input_shape: tuple[int, ...] | None = None) -> Stream:
    """A built-in stream by name (see STREAMS), or a .npz stream file (its first n_tasks tasks; StreamTooShort when
    it holds fewer). Same name, n_tasks, seed and input shape → same data, always. `input_shape` (C, H, W) resizes
    the 8×8 digits (nearest: every pixel becomes a block, after each task's permutation or rotation, so the tasks are
    the same at any size) and repeats them over C channels, to exercise real model shapes (e.g. 3×32×32 for a
    torchvision ResNet) with the embedded data."""
    check_stream(name, n_tasks, input_shape)  # names, counts and sizes before any data is built
    if name not in STREAMS:
        return load_stream_file(name, n_tasks)
    stream = _builtin(name, n_tasks, seed)
    if input_shape is None or tuple(input_shape) == DIGITS_SHAPE:
        return stream
    for task in stream.tasks:
        task.x_train, task.x_test = _resized(task.x_train, input_shape), _resized(task.x_test, input_shape)
    stream.input_shape = tuple(input_shape)
    return stream


def _resized(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(N, 1, 8, 8) → (N, C, H, W): nearest-neighbour zoom, then the one channel repeated C times."""
    from scipy.ndimage import zoom

    c, h, w = shape
    big = zoom(x, (1, 1, h / x.shape[2], w / x.shape[3]), order=0, grid_mode=True, mode="nearest")
    return np.ascontiguousarray(np.repeat(big.astype(np.float32), c, axis=1))


def _builtin(name: str, n_tasks: int | None, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    if name == "synthetic":
        return _synthetic(n_tasks or 10, rng)
    xtr, xte, ytr, yte = _digits(seed)
    tasks = []
    if name == "permuted-digits":
        for t in range(n_tasks or 10):
            perm = np.arange(64) if t == 0 else rng.permutation(64)
            tasks.append(TaskData(f"perm{t}", _permute(xtr, perm), ytr, _permute(xte, perm), yte, 10))
    elif name == "split-digits":
        for t in range(n_tasks or SPLIT_TASKS):
            a, b = 2 * t, 2 * t + 1
            tr, te = np.isin(ytr, (a, b)), np.isin(yte, (a, b))
            tasks.append(TaskData(f"digits{a}{b}", xtr[tr], (ytr[tr] == b).astype(np.int64), xte[te],
                                  (yte[te] == b).astype(np.int64), 2))
    else:  # rotated-digits
        n = n_tasks or 5
        for t in range(n):
            angle = t * 180.0 / n
            tasks.append(TaskData(f"rot{int(angle)}", _rotate(xtr, angle), ytr, _rotate(xte, angle), yte, 10))
    return Stream(name, DIGITS_SHAPE, tasks)


def _permute(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(len(x), -1)[:, perm].reshape(x.shape))


def _rotate(x: np.ndarray, angle: float) -> np.ndarray:
    from scipy.ndimage import rotate

    return rotate(x, angle, axes=(2, 3), reshape=False, order=1, mode="constant").astype(np.float32)


def _synthetic(n_tasks: int, rng: np.random.Generator) -> Stream:
    """Gaussian class clusters in 64 dimensions, a fresh random projection per task: cheap, arbitrarily many tasks
    (for growth benchmarks)."""
    tasks = []
    for t in range(n_tasks):
        centers = rng.normal(size=(10, 64)).astype(np.float32)
        def draw(n):
            y = rng.integers(0, 10, n)
            return (centers[y] + 0.8 * rng.normal(size=(n, 64))).astype(np.float32).reshape(n, 1, 8, 8), y
        xtr, ytr = draw(600)
        xte, yte = draw(200)
        tasks.append(TaskData(f"syn{t}", xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), 10))
    return Stream("synthetic", (1, 8, 8), tasks)


def load_stream_file(path: str, n_tasks: int | None = None) -> Stream:
    """A user stream from an .npz file (all its tasks, or its first `n_tasks`); see `edgecl.train.user_data`."""
    name, shape, checked = read_stream_file(path, n_tasks)
    return Stream(name, shape, [TaskData(*t) for t in checked])
