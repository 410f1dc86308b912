"""Task streams. Built-in ones come from scikit-learn's bundled handwritten digits (1,797 real 8×8 images, no
download) with a fixed seeded split; `Stream.from_arrays` and `load_stream_file` bring your own tasks."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from edgecl.errors import UsageError

STREAMS = ("permuted-digits", "split-digits", "rotated-digits", "synthetic")


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
        converted with `.numpy()`. Labels must be 0..C-1 per task; inputs share one shape."""
        out = []
        for i, tup in enumerate(tasks):
            if len(tup) != 4:
                raise UsageError(f"task {i}: expected (x_train, y_train, x_test, y_test), got {len(tup)} items")
            xtr, ytr, xte, yte = (np.asarray(v) for v in tup)
            out.append(_checked_task(f"{name}-{i}", xtr, ytr, xte, yte, i))
        if not out:
            raise UsageError(f"stream {name!r} has no tasks")
        shape = tuple(input_shape or out[0].x_train.shape[1:])
        for i, t in enumerate(out):
            if t.x_train.shape[1:] != shape or t.x_test.shape[1:] != shape:
                raise UsageError(f"task {i}: input shape {t.x_train.shape[1:]} differs from the stream's {shape}")
        return cls(name, shape, out)


def _checked_task(name, xtr, ytr, xte, yte, i) -> TaskData:
    for what, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise UsageError(f"task {i} ({what}): need x of shape (N, ...) and y of shape (N,), got {x.shape} "
                             f"and {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise UsageError(f"task {i} ({what}): labels must be non-negative integers")
        if not np.isfinite(x.astype(np.float64)).all():
            raise UsageError(f"task {i} ({what}): inputs contain NaN or infinity")
    n_classes = int(max(ytr.max(), yte.max())) + 1
    return TaskData(name, xtr.astype(np.float32), ytr.astype(np.int64), xte.astype(np.float32),
                    yte.astype(np.int64), n_classes)


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
    if n_tasks is not None and n_tasks < 1:
        raise UsageError(f"n_tasks must be ≥ 1, got {n_tasks}")
    if input_shape is not None:
        shape = tuple(input_shape)
        if name not in STREAMS or name == "synthetic":
            raise UsageError(f"--input-shape applies to the digit streams; {name!r} brings its own shape")
        if len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape) or shape[0] not in (1, 3) \
                or not all(8 <= d <= MAX_SIDE for d in shape[1:]):
            raise UsageError(f"input shape {shape} must be channels,height,width with 1 or 3 channels and sides "
                             f"from 8 to {MAX_SIDE}, e.g. 3,32,32")


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
    """A built-in stream by name (see STREAMS), or a .npz stream file. Same name, n_tasks, seed and input shape →
    same data, always. `input_shape` (C, H, W) resizes the 8×8 digits (nearest: every pixel becomes a block,
    after each task's permutation or rotation, so the tasks are the same at any size) and repeats them over C
    channels, to exercise real model shapes (e.g. 3×32×32 for a torchvision ResNet) with the embedded data."""
    if name not in STREAMS:
        check_stream(name, None, input_shape)
        return load_stream_file(name)
    check_stream(name, n_tasks, input_shape)
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
        n = n_tasks or 5
        if n > 5:
            raise UsageError("split-digits has at most 5 tasks (pairs of digits)")
        for t in range(n):
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


def load_stream_file(path: str) -> Stream:
    """A user stream from an .npz with arrays task0_x_train, task0_y_train, task0_x_test, task0_y_test, task1_… .
    Loaded with allow_pickle=False: a data file can never execute code."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise UsageError(f"{path}: not a readable .npz stream file ({exc})") from None
    tasks, i = [], 0
    while f"task{i}_x_train" in arrays:
        keys = [f"task{i}_{k}" for k in ("x_train", "y_train", "x_test", "y_test")]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise UsageError(f"{path}: missing arrays {missing}")
        tasks.append(tuple(arrays[k] for k in keys))
        i += 1
    if not tasks:
        raise UsageError(f"{path}: no task0_x_train array; a stream file holds task0_x_train, task0_y_train, "
                         "task0_x_test, task0_y_test, task1_… (README, 'Your own data')")
    return Stream.from_arrays(os.path.splitext(os.path.basename(path))[0], tasks)
