"""The process's resident memory: reading it (the audit's measurement) and handing freed heap back to the OS (so the
reading is what the runtime holds). No ONNX Runtime here: the audit and the runtime both import it."""
from __future__ import annotations

import ctypes
import os


def process_rss() -> int | None:
    """Resident set size of this process in bytes (psutil, else /proc), or None where neither exists."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None


def return_free_heap() -> None:
    """Hand the heap the loader and session set-up freed (decompression buffers, serialised graphs) back to the
    OS, so the process's resident memory is what the runtime holds (glibc keeps freed heap otherwise; elsewhere this
    is a no-op)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without it), or Windows
        pass
