"""Training one stream on N ranks with torch.distributed: the one module that knows about ranks.

Launch is torch's own (`torchrun --nproc-per-node N -m edgecl train ...`, or `edgecl train --nproc N`, which starts the
same through `torch.distributed.run`); gloo on CPUs, NCCL on GPUs (one GPU per local rank). The methods keep
functional parameter dicts, not `nn.Module`s, so instead of wrapping a module in DDP the one mini-batch loop
(`edgecl.train.protocol.run_epochs`) all-reduces gradients, and each place that computes a statistic over a task's
data makes one explicit call here. The rules that make N ranks train exactly what one process trains:

- Data order. Every rank draws the same permutation of a task's training split from the task's seeded generator and
  takes its contiguous slice of every *global* batch (`local_part`): the config's `batch_size` stays the global
  figure the papers name, and each rank computes batch_size/N of it (slices differ by at most one sample).
- Gradients. A rank's loss is weighted by its share of the global batch (`weighted`) and the gradients are summed
  across ranks (`sum_grads`): the gradient of the global batch's mean loss, as one process computes it, up to float
  summation order. Every rank then takes the same optimiser step, so parameters stay bit-identical.
- BatchNorm in training mode normalises with the statistics of the whole global batch (`batch_norm`, exact and
  differentiable through a summing all-reduce), and its running statistics follow them.
- Statistics over a task's data are summed (`all_sum`) or their per-sample vectors gathered (`gather_rows`); what
  each method computes from them afterwards runs identically on every rank.
- Checks. `check_identical` compares digests across ranks: of the request and data before training, of the whole
  method state after every task (`state_digest`); a mismatch stops every rank with a clear error.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from edgecl.errors import EdgeclError, UsageError

def launched() -> bool:
    """True in a process that torchrun (or `edgecl train --nproc`) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True while this process is one of several ranks of a joined process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, draws progress bars and writes the outputs."""
    return rank() == 0


@dataclass(frozen=True)
class World:
    """This process's place in a run: rank, number of ranks, its local rank on its machine and the backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The torch device this rank trains on: its own GPU (`cuda:LOCAL_RANK`) under several ranks."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.size > 1 else device

    def describe(self, batch_size: int) -> dict[str, Any]:
        """What results.json records of a run on several ranks."""
        return {"world_size": self.size, "backend": self.backend, "global_batch": batch_size,
                "per_rank_batch": [len(p) for p in torch.tensor_split(torch.arange(batch_size), self.size)]}


@contextlib.contextmanager
def joined(device: str = "cpu") -> Iterator[World]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) for the
    duration of a run, and leave it after: gloo for `cpu`, NCCL for `cuda` with this rank's GPU made current. A
    single process joins nothing; a group the caller already joined is used as is (and left to the caller)."""
    if active():
        yield _world()
        return
    if not launched():
        yield World()
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if torch.cuda.device_count() <= local:
            raise UsageError(f"rank {os.environ.get('RANK')}: --device cuda needs one GPU per local rank; local rank "
                             f"{local} sees {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield _world()
        # leave together: under load rank 0 once aborted in its teardown ("terminate called without an active
        # exception", twice in a row, then not in 3 reruns after this barrier); a teardown racing a peer's is the
        # likely cause, not proven
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _world() -> World:
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


class RankStopped(EdgeclError):
    """This rank's collective failed because another rank left the job (its error, not this one, is the cause)."""


@contextlib.contextmanager
def rank_errors() -> Iterator[None]:
    """Under several ranks, name the rank in every edgecl error raised inside (the CLI prints it) and record it
    where torchrun reads a failed worker's cause (TORCHELASTIC_ERROR_FILE), so the launcher's summary shows it. A
    collective that fails because a peer is gone becomes a one-line `RankStopped` instead of a backend traceback."""
    try:
        yield
    except EdgeclError as exc:
        if active():
            exc.args = (f"rank {rank()}: {exc}",)
            _record(exc)
        raise
    except RuntimeError as exc:
        if not (active() and _peer_lost(exc)):
            raise
        reason = re.search(r"Connection \w+ by peer", str(exc))
        stopped = RankStopped(f"rank {rank()}: stopped because another rank left the job ("
                              f"{reason.group(0) if reason else str(exc).splitlines()[0][:120]}); that rank's error "
                              "is the cause")
        _record(stopped)
        raise stopped from None


def _peer_lost(exc: RuntimeError) -> bool:
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        key in text for key in ("Connection reset", "Connection closed", "gloo", "NCCL"))


def _record(exc: BaseException) -> None:
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


# -- the data each rank reads ------------------------------------------------------------------------------------

def local_part(index: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch's sample indices (all of them in a single process)."""
    return torch.tensor_split(index, world_size())[rank()] if active() else index


def weighted(loss: torch.Tensor, local: int, total: int) -> torch.Tensor:
    """A rank's mean loss over its `local` samples scaled to its share of the global batch of `total`, so that the
    sum over ranks is the global batch's mean loss. A rank with no sample (a global batch smaller than the number of
    ranks) contributes an exact zero and still runs backward, for the collectives inside it. Unchanged alone."""
    if not active():
        return loss
    if local == 0:
        return loss.nan_to_num() * 0.0
    return loss * (local / total)


# -- collectives -------------------------------------------------------------------------------------------------

def _comm_device(like: torch.Tensor | None = None) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if like is None else like.device


def _flat_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One all-reduce (sum) over several tensors of one dtype, packed into one buffer."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device(tensors[0]))
    dist.all_reduce(flat)
    flat = flat.to(tensors[0].device)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_sum(tensors):
    """Elementwise sums across ranks of a tensor or a list/tuple of tensors (new tensors; the inputs stay as they
    were). A single process gets its input back."""
    if not active():
        return tensors
    if isinstance(tensors, torch.Tensor):
        return _flat_sum([tensors])[0]
    return type(tensors)(_flat_sum(list(tensors)))


def sum_grads(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """Sum every gradient the optimiser will step across ranks, in place, in one all-reduce per dtype, and return
    the global loss (`loss`, this rank's weighted share, rides in the same all-reduce: no extra collective per step).
    A single process gets its loss back and nothing moves."""
    if not active():
        return loss
    total = loss.detach().clone().reshape(1)
    tensors = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None] + [total]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        for t, summed in zip(same, _flat_sum(same)):
            t.copy_(summed)
    return total.reshape(())


def _gather(t: torch.Tensor) -> torch.Tensor:
    """(world, *t.shape): every rank's `t`, in rank order."""
    device = t.device
    t = t.to(_comm_device(t))
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out).to(device)


def gather_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's rows (axis −2: samples, or sample-major input patches) of each tensor, concatenated in rank
    order: what one process computes over the whole global batch, whose slices the ranks hold in that order. Ranks
    may hold different numbers of rows; the other axes must agree. Two collectives for the whole dict."""
    if not active() or not tensors:
        return tensors
    names = list(tensors)
    dtypes = {tensors[n].dtype for n in names}
    if len(dtypes) > 1:
        raise ValueError(f"gather_rows: one dtype expected, got {sorted(map(str, dtypes))}")
    first = tensors[names[0]]
    counts = _gather(torch.tensor([tensors[n].shape[-2] for n in names], dtype=torch.int64, device=first.device))
    top = counts.max(0).values.tolist()
    padded = []
    for n, rows in zip(names, top):
        t = tensors[n]
        pad = torch.zeros(t.shape[:-2] + (rows - t.shape[-2], t.shape[-1]), dtype=t.dtype, device=t.device)
        padded.append(torch.cat([t, pad], -2).reshape(-1))
    everything = _gather(torch.cat(padded))
    out, start = {}, 0
    for i, (n, rows) in enumerate(zip(names, top)):
        shape = tensors[n].shape[:-2] + (rows, tensors[n].shape[-1])
        size = int(np.prod(shape))
        parts = [everything[r, start:start + size].reshape(shape)[..., :int(counts[r, i]), :]
                 for r in range(world_size())]
        out[n] = torch.cat(parts, -2)
        start += size
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_identical(digest: str, what: str) -> list[str]:
    """Every rank's `digest` of `what`, in rank order; a UsageError on every rank when any two differ (naming the
    ranks), so a divergence stops the job instead of writing a model some rank did not train."""
    if not active():
        return [digest]
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        raise UsageError(f"{what} differs across ranks (ranks with the same digest: "
                         f"{sorted(groups.values())}): every rank must read the same stream, settings and artifact "
                         "and run the same software on the same kind of hardware")
    return digests


# -- BatchNorm over the global batch -----------------------------------------------------------------------------

class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation of this rank's slice with the mean and variance of the global batch: one
    all-reduce forward (per-channel sums, sums of squares and counts, in float64) and one backward (the sums of the
    incoming gradient and of its product with the normalised input, which every rank's input gradient needs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):  # noqa: D401
        dims, shape = _channel_dims(x)
        xd = x.double()
        local = torch.cat([xd.sum(dims), xd.square().sum(dims), xd.new_tensor([x.numel() // max(x.shape[1], 1)])])
        total = _flat_sum([local])[0]
        count = float(total[-1])
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} over all ranks")
        channels = x.shape[1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean.square()).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        xhat = ((xd - mean.reshape(shape)) * invstd.reshape(shape)).to(x.dtype)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.count = count
        ctx.mark_non_differentiable(mean, var)
        return xhat * weight.reshape(shape) + bias.reshape(shape), mean.to(x.dtype), var.to(x.dtype), count

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_unused):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = _channel_dims(xhat)
        sum_grad, sum_grad_xhat = grad.sum(dims), (grad * xhat).sum(dims)  # this rank's: its weight/bias grads
        total_grad, total_grad_xhat = _flat_sum([torch.cat([sum_grad, sum_grad_xhat])])[0].chunk(2)
        dx = (weight * invstd).reshape(shape) * (grad - (total_grad / ctx.count).reshape(shape)
                                                 - xhat * (total_grad_xhat / ctx.count).reshape(shape))
        return dx, sum_grad_xhat, sum_grad, None


def _channel_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """The axes a BatchNorm reduces over (all but channels) and the shape that broadcasts a per-channel vector."""
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, momentum: float, eps: float) -> torch.Tensor:
    """Training-mode BatchNorm over the global batch: mean and (biased) variance per channel from every rank's
    samples, the running statistics moved by `momentum` towards them (unbiased variance), as F.batch_norm on one
    process holding the whole batch, up to float rounding; gradients flow to every rank's samples. torch's
    SyncBatchNorm has no CPU kernels (gloo), hence this one: two collectives per layer and step."""
    y, mean, var, count = _GlobalBatchNorm.apply(x, weight, bias, eps)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)
    return y


# -- digests -------------------------------------------------------------------------------------------------------

def state_digest(state: Any) -> str:
    """SHA-256 over everything reachable from `state` — tensors, arrays, random generators' states, numbers and
    strings, through dicts, lists, tuples and the attributes of objects (a method and its helper objects) — in a
    fixed order, with names, dtypes and shapes. Wall-clock timings (names ending in "seconds") differ across ranks
    by nature and are left out."""
    h = hashlib.sha256()
    _feed(h, state, "", set())
    return h.hexdigest()


def _feed(h, value: Any, path: str, seen: set[int]) -> None:
    if path.endswith("seconds"):
        return
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"{path}|{value.dtype}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).tobytes() if value.dtype != object else repr(value).encode())
    elif isinstance(value, torch.Generator):
        _feed(h, value.get_state(), f"{path}:generator", seen)
    elif isinstance(value, (str, bytes, int, float, bool, type(None), np.generic)):
        h.update(f"{path}={value!r}|".encode())
    elif id(value) in seen:
        return
    elif isinstance(value, dict):
        seen.add(id(value))
        for k in sorted(value, key=str):
            _feed(h, value[k], f"{path}.{k}", seen)
    elif isinstance(value, (list, tuple)):
        seen.add(id(value))
        for i, v in enumerate(value):
            _feed(h, v, f"{path}[{i}]", seen)
    elif hasattr(value, "__dict__") and not callable(value):
        seen.add(id(value))
        _feed(h, vars(value), f"{path}<{type(value).__name__}>", seen)


# -- launching -----------------------------------------------------------------------------------------------------

def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m edgecl ARGV` as `nproc` ranks on this machine through torch's launcher (torchrun's
    standalone rendezvous, a free port) and wait. Returns 0, or the exit code of the rank that failed first (1
    when it was killed), after naming it and its error on stderr."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun would set it and warn; --threads governs torch
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "edgecl", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        failed, failure = min(exc.failures.items(), key=lambda kv: (_collateral(kv[1]), kv[1].timestamp, kv[0]))
        code = failure.exitcode
        message = _message(failure)
        if code < 0:
            what = f"was killed by signal {-code}"
        elif message:
            what = f"failed: {message}"
        else:
            what = f"failed with exit code {code} (its output is above)"
        print(f"edgecl {argv[0]}: error: rank {failed} of {nproc} {what}; the other ranks were stopped and nothing "
              "was written", file=sys.stderr)
        return code if code > 0 else 1
    return 0


def _message(failure: Any) -> str | None:
    """The error a failed rank recorded (`rank_errors`), without torchrun's placeholder texts."""
    if not os.path.isfile(failure.error_file):
        return None
    message = failure.message
    return message if isinstance(message, str) else (message or {}).get("message")


def _collateral(failure: Any) -> bool:
    """A rank the launcher stopped, or one that stopped because another left: not the cause."""
    return failure.exitcode == -signal.SIGTERM or RankStopped.__name__ in (_message(failure) or "")
