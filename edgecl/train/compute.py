"""Where training computes: the torch device and the number of CPU threads, checked the same way by every command
that trains (train, demo, compare).

One CPU thread by default: the built-in models are small (a digits MLP step is a few hundred microseconds), so extra
threads buy little, and two OpenMP threads on a busy 2-core machine stall whenever one loses its core (measured ~10x
slower under load). Raise it with --threads on an idle machine with wide models."""
from __future__ import annotations

from edgecl.checks import MAX_THREADS, check_int
from edgecl.errors import UsageError

DEVICES = ("cpu", "cuda")
DEFAULT_THREADS = 1


def check_device(device: str) -> None:
    """Refuse a device name torch training does not support (cheap: torch is not imported)."""
    if device not in DEVICES:
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")


def require_device(device: str) -> None:
    """`check_device`, then make sure torch can use it (imports torch)."""
    check_device(device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to torch")


def check_threads(threads: int | None) -> None:
    """None (leave torch's setting) or 1..MAX_THREADS: torch segfaults on absurd counts rather than refusing them."""
    if threads is not None:
        check_int(threads, "--threads", 1, MAX_THREADS)


def set_threads(threads: int | None) -> None:
    """Use `threads` torch CPU threads (None: leave torch's setting alone, for library callers)."""
    check_threads(threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
