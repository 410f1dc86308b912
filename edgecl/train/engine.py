"""The continual-learning loop: learn each task in order, then test every task seen so far through the deployed
form of the model (`materialize(pack(), j)`), filling the accuracy matrix A[i][j]."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgecl import metrics
from edgecl.deltas import PackedModel, materialize
from edgecl.errors import UsageError
from edgecl.train import distributed, initial
from edgecl.train.data import Stream, TaskData
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import Method, TrainContext


@dataclass
class RunResult:
    method: str
    stream: str
    acc_matrix: list[list[float]]
    packed: PackedModel
    seconds_per_task: list[float]
    notes: dict[int, dict[str, Any]] = field(default_factory=dict)
    first_task: int = 0  # > 0 when the run resumed a deployed model holding that many tasks
    rank_digests: list[list[str]] = field(default_factory=list)  # per task learned: every rank's state digest

    def to_json(self) -> dict[str, Any]:
        n = len(self.acc_matrix)
        dense = np.full((n, n), np.nan)
        for i, row in enumerate(self.acc_matrix):
            dense[i, :len(row)] = row
        return {"method": self.method, "stream": self.stream, "arch": self.packed.arch["name"],
                "config": self.packed.config, "tasks": [t.name for t in self.packed.tasks],
                "acc_matrix": self.acc_matrix, **metrics.summary(dense), "seconds_per_task": self.seconds_per_task,
                "method_info": self.packed.extra, "notes": {str(k): v for k, v in self.notes.items()},
                "resumed_at_task": self.first_task,
                **({"distributed": {"state_sha256": self.rank_digests}} if self.rank_digests else {})}


PREDICT_BATCH = 512  # test inputs per forward pass when scoring a task


def predict(packed: PackedModel, task: int, x: np.ndarray, device: str = "cpu",
            batch: int = PREDICT_BATCH) -> np.ndarray:
    """Class predictions of one task from its materialised weights (the exact deployed weights). Inputs that make
    the logits non-finite (finite values that overflow float32 inside the model) are refused, never argmax'ed."""
    labels, finite = _predict(packed, task, x, device, batch)
    if not finite.all():
        raise _overflow(packed, task, x, finite, int((~finite).sum()), len(x))
    return labels


def _predict(packed: PackedModel, task: int, x: np.ndarray, device: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Argmax labels and, per input, whether all of its logits are finite."""
    params = from_numpy(materialize(packed, task), device)
    labels, finite = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = forward(packed.arch, params, torch.from_numpy(x[i:i + batch]).to(device))
            labels.append(logits.argmax(1).cpu())
            finite.append(torch.isfinite(logits).all(1).cpu())
    if not labels:
        return np.zeros(0, np.int64), np.ones(0, bool)
    return torch.cat(labels).numpy(), torch.cat(finite).numpy()


def _overflow(packed: PackedModel, task: int, x: np.ndarray, finite: np.ndarray, bad: int, total: int) -> UsageError:
    """The error for non-finite logits: weights are finite (the artifact's rules, the divergence check), so the
    inputs overflowed float32 inside the model; an accuracy counted from their argmax would be invented."""
    rows = np.flatnonzero(~finite)
    where = f" (largest |x| {float(np.abs(x[rows]).max()):.3g})" if len(rows) else ""
    return UsageError(f"task {packed.tasks[task].name!r}: the model's outputs on {bad} of {total} test inputs are not "
                      f"finite{where}: inputs or weights too large overflow float32 inside the model; scale the "
                      "inputs as you will feed them on the device, or lower the learning rate if the weights grew "
                      "(no accuracy is computed from them)")


def accuracy(packed: PackedModel, task: int, data: TaskData, device: str = "cpu") -> float:
    """Test accuracy of one task; under several ranks each predicts its slice of the test split and the counts of
    correct (and of non-finite) predictions are summed, so every rank gets the number one process computes, or every
    rank refuses the task's non-finite outputs."""
    part = distributed.local_part(torch.arange(len(data.x_test))).numpy()
    x = data.x_test[part]
    labels, finite = _predict(packed, task, x, device, PREDICT_BATCH)
    counts = torch.tensor([int(((labels == data.y_test[part]) & finite).sum()), int((~finite).sum())])
    correct, bad = (int(v) for v in distributed.all_sum(counts))
    if bad:
        raise _overflow(packed, task, x, finite, bad, len(data.x_test))
    return correct / len(data.x_test)


CHANCE_MARGIN = 0.05  # test accuracy within 5 points of the majority class: the task was not learned


def majority_rate(task: TaskData) -> float:
    """The test accuracy of always answering the task's most frequent test class: the floor a learned task clears."""
    return float(np.bincount(task.y_test).max() / len(task.y_test))


def not_learned(accuracy: float, majority: float) -> bool:
    """Within `CHANCE_MARGIN` of always answering the most frequent class, and below halfway from it to 100 % (a task
    whose majority class is 97 % of its test set is flagged below 98.5 %, not at every accuracy)."""
    return accuracy < min(majority + CHANCE_MARGIN, (1 + majority) / 2)


def run(method: Method, stream: Stream, ctx: TrainContext | None = None, first_task: int = 0,
        log=print) -> RunResult:
    """Train `method` on every task of `stream` from `first_task` on and evaluate after each one.

    With first_task > 0 (a resumed, deployed model) the method already holds tasks 0..first_task-1; their rows of the
    accuracy matrix are filled with the accuracy the resumed model has on them before learning anything new. Under
    several ranks every rank runs this loop; after each task the ranks' state digests must agree (else a UsageError
    on every rank) and are kept in `rank_digests`."""
    ctx = ctx or TrainContext()
    n = len(stream.tasks)
    if first_task >= n:  # a run that learns nothing must not look like one that did
        raise UsageError(f"stream {stream.name!r} has {n} tasks, none after the {first_task} the resumed model holds: "
                         "nothing to learn")
    acc = np.full((n, n), np.nan)
    packed = method.pack() if first_task else None
    if first_task:
        before = [accuracy(packed, j, stream.tasks[j], ctx.device) for j in range(first_task)]
        for i in range(first_task):
            acc[i, :i + 1] = before[:i + 1]
    times: list[float] = []
    digests: list[list[str]] = []
    for t in range(first_task, n):
        start = time.perf_counter()
        method.learn_task(t, stream.tasks[t], ctx)
        times.append(time.perf_counter() - start)
        if distributed.active():  # every rank must hold the same model: stop here, before anything is written
            digests.append(distributed.check_identical(distributed.state_digest(method),
                                                       f"{method.name}'s state after task {t}"))
        packed = method.pack()
        initial.record(packed, getattr(method, "start_record", None))  # duck-typed methods (compare's) have none
        for j in range(t + 1):
            acc[t, j] = accuracy(packed, j, stream.tasks[j], ctx.device)
        log(f"[{method.name}] task {t + 1}/{n} {stream.tasks[t].name}: acc {acc[t, t]:.3f}, "
            f"mean over seen {np.nanmean(acc[t, :t + 1]):.3f} ({times[-1]:.1f}s)")
        if ctx.notes.get(t, {}).get("warning"):  # a method saying its guarantee did not hold on this task
            log(f"[{method.name}] WARNING: {ctx.notes[t]['warning']}")
        chance = majority_rate(stream.tasks[t])
        if not_learned(acc[t, t], chance):
            log(f"[{method.name}] WARNING: task {stream.tasks[t].name} reached {100 * acc[t, t]:.1f}%, no better than "
                f"always answering its most frequent class ({100 * chance:.1f}%): it has not learned; try more epochs "
                "or another learning rate (--set epochs=… lr=…)" + _hint(method))
    rows = [[float(acc[i, j]) for j in range(i + 1)] for i in range(n)]
    return RunResult(method.name, stream.name, rows, packed, times, ctx.notes, first_task, digests)


def _hint(method: Any) -> str:
    """The method's own likely cause of a task at chance, if it names one (duck-typed methods may not)."""
    hint = getattr(method, "not_learned_hint", lambda: None)()
    return f"; {hint}" if hint else ""
