"""A fixed set of K slots holding the K most recently used keys, safe for any number of threads, independent of what a
slot holds and of ONNX Runtime (modelled on vLLM's LoRA manager: the cache of adapter slots is separate from the
model, which supplies a fill and may watch evictions).

Rules (tests/test_slots.py):

- `acquire(key)` pins the slot holding `key` and returns it; the caller uses it and calls `release` (or uses
  ``with cache.use(key) as slot``). A pinned slot is never evicted or refilled.
- A miss takes a free slot, else the least recently used unpinned one, marks it loading and calls ``fill(slot, key)``
  *outside* the lock; other threads wanting that key wait until it is ready. A fill that raises leaves the slot free
  (holding no key) and the error goes to the caller that filled.
- When every slot is pinned, a miss waits for a release.
- One condition lock guards the map, the LRU order and the pin counts; it is never held while a slot is filled or
  used. A thread holds at most one pin and never waits while holding one, so there is no deadlock.
- `close()` wakes every waiter, which then raises; later calls raise too.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from edgecl.errors import UsageError

B = TypeVar("B")


@dataclass
class Slot(Generic[B]):
    """One slot: its fixed `buffers` (whatever the owner fills), the key it holds, and its state."""

    index: int
    buffers: B
    key: int | None = None
    loading: bool = False
    pins: int = 0


class SlotCache(Generic[B]):
    """K slots over `buffers` (one per slot), filled on a miss by ``fill(slot, key)``. ``on_evict(slot, old_key)``,
    if given, is called under the lock when a slot is taken from `old_key` (keep it quick; it must not call back)."""

    def __init__(self, buffers: list[B], fill: Callable[[Slot[B], int], None], *,
                 on_evict: Callable[[Slot[B], int], None] | None = None, owner: str = "this slot cache"):
        self.slots = [Slot(i, b) for i, b in enumerate(buffers)]
        self.size = len(self.slots)
        self._fill, self._on_evict, self._owner = fill, on_evict, owner
        self._cond = threading.Condition()
        self._lru: OrderedDict[int, Slot[B]] = OrderedDict()  # key → the slot holding it, least recently used first
        self.hits = self.misses = 0
        self.closed = False

    def __len__(self) -> int:
        return self.size

    def acquire(self, key: int) -> Slot[B]:
        """Pin the slot holding `key`, filling the least recently used free slot on a miss."""
        with self._cond:
            while True:
                self._check_open()  # a close() while waiting must not leave this thread waiting forever
                slot = self._lru.get(key)
                if slot is not None:
                    if slot.loading:
                        self._cond.wait()
                        continue
                    slot.pins += 1
                    self._lru.move_to_end(key)
                    self.hits += 1
                    return slot
                victim = self._victim()
                if victim is None:
                    self._cond.wait()
                    continue
                if victim.key is not None:
                    del self._lru[victim.key]
                    if self._on_evict is not None:
                        self._on_evict(victim, victim.key)
                victim.key, victim.loading, victim.pins = key, True, 1
                self._lru[key] = victim
                self.misses += 1
                break
        try:
            self._fill(victim, key)
        except BaseException:
            with self._cond:
                self._lru.pop(key, None)
                victim.key, victim.loading, victim.pins = None, False, 0
                self._cond.notify_all()
            raise
        with self._cond:
            victim.loading = False
            self._cond.notify_all()
        return victim

    def release(self, slot: Slot[B]) -> None:
        """Unpin a slot `acquire` returned."""
        with self._cond:
            slot.pins -= 1
            if slot.pins == 0:
                self._cond.notify_all()

    @contextmanager
    def use(self, key: int) -> Iterator[Slot[B]]:
        """``acquire`` for the duration of a ``with`` block."""
        slot = self.acquire(key)
        try:
            yield slot
        finally:
            self.release(slot)

    def close(self) -> None:
        """Forget every key, let go of the slots (a caller still using one keeps it until it releases) and wake every
        waiter (they raise UsageError); later calls raise too."""
        with self._cond:
            self.closed = True
            self._lru.clear()
            self.slots = []
            self._cond.notify_all()

    def info(self) -> dict[str, Any]:
        """Hits, misses, the slot count, and the keys held (most recently used last)."""
        with self._cond:
            return {"hits": self.hits, "misses": self.misses, "slots": self.size, "cached": list(self._lru)}

    def _check_open(self) -> None:
        if self.closed:
            raise UsageError(f"{self._owner} is closed")

    def _victim(self) -> Slot[B] | None:
        for slot in self.slots:  # a slot that never held a key (or lost it to a failed fill) first
            if slot.key is None and slot.pins == 0:
                return slot
        for slot in self._lru.values():  # then the least recently used
            if slot.pins == 0:
                return slot
        return None
