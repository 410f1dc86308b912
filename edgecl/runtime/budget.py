"""Memory budgets: parse "32MiB"/"1.5GB"/ints, and a ledger that refuses a request before it is allocated.

Why a ledger and not a try/except around allocation: on a device an allocation that does not fit is an OOM kill, not
an exception. So every buffer the runtime keeps is reserved here first, and a request beyond the budget raises
`BudgetError` naming the budget, what is already held and what was asked.
"""
from __future__ import annotations

import re
import threading

from edgecl.errors import BudgetError, UsageError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}
_PATTERN = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(value: int | float | str | None) -> int | None:
    """Bytes from an int, or a string such as "32MiB", "1.5GB", "800k", "1048576"; None stays None (no limit).
    Decimal units (kB, MB, GB) are powers of 1000, binary ones (KiB, MiB, GiB) powers of 1024."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"budget must be a size such as '32MiB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _PATTERN.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise UsageError(f"budget {value!r} is not a size; use e.g. 32MiB, 1.5GB, 800kB or a byte count")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not size >= 1 or size > 2**62:  # below one byte is no budget at all (0.5 would round to 0 B); NaN fails too
        raise UsageError(f"budget {value!r} must be a positive size of at least 1 byte")
    return int(size)


def format_bytes(n: float) -> str:
    """Human-readable binary size (the unit `parse_budget` reads back)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


class Ledger:
    """Bytes reserved per named item against an optional limit. Thread-safe."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.items: dict[str, int] = {}
        self.peak = 0  # the most ever held at once (start-up reserves more than it keeps: the audit's "needed")
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return sum(self.items.values())

    def fits(self, nbytes: int) -> bool:
        return self.limit is None or self.used + nbytes <= self.limit

    def reserve(self, item: str, nbytes: int) -> None:
        """Record `nbytes` for `item`, or raise BudgetError before anything is allocated."""
        with self._lock:
            if not self.fits(nbytes):
                raise BudgetError(f"memory budget {format_bytes(self.limit)} ({self.limit} B) exceeded: asked for "
                                  f"{item} = {format_bytes(nbytes)} with {format_bytes(self.used)} already held "
                                  f"({', '.join(f'{k} {format_bytes(v)}' for k, v in self.items.items()) or 'none'})")
            self.items[item] = self.items.get(item, 0) + int(nbytes)
            self.peak = max(self.peak, self.used)

    def release(self, item: str) -> None:
        with self._lock:
            self.items.pop(item, None)


def refuse_device_budget_off_gpu(device_budget: int | str | None, device: str, resident: str | None = None) -> None:
    """UsageError for a device budget where nothing is held on a device (a CPU run outside the device path's CPU
    twin): it would bound nothing, silently."""
    if device_budget is not None and device != "cuda" and resident != "device":
        raise UsageError(f"--device-budget applies to --device cuda (GPU memory); with --device {device} the --budget "
                         "is the whole budget")
