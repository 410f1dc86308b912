"""The slot cache on its own, with fills that only record what they were asked (no ONNX Runtime): hits, misses and LRU
order, pins that block eviction, a failing fill that leaves its slot free, waiters on a loading slot, and close."""
from __future__ import annotations

import threading
import time

import pytest

from edgecl.errors import UsageError
from edgecl.runtime.slots import SlotCache

WAIT = 10  # seconds a test thread may take before the test calls it stuck


class Recorder:
    """A fill that writes the key into the slot's buffer (a one-item list) and logs each call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, slot, key: int) -> None:
        self.calls.append(key)
        slot.buffers[0] = key


def cache(n: int, fill=None, **kwargs) -> SlotCache:
    return SlotCache([[None] for _ in range(n)], fill or Recorder(), **kwargs)


def thread(target, *args) -> threading.Thread:
    th = threading.Thread(target=target, args=args, daemon=True)
    th.start()
    return th


def test_hits_misses_and_lru_order():
    evicted = []
    fill = Recorder()
    slots = cache(2, fill, on_evict=lambda slot, key: evicted.append(key))
    for key in (1, 2, 1, 3, 2, 2):
        with slots.use(key) as slot:
            assert slot.buffers[0] == key and slot.key == key
    # 1 miss, 2 miss, 1 hit, 3 miss (evicts 2, the least recently used), 2 miss (evicts 1), 2 hit
    assert fill.calls == [1, 2, 3, 2]
    assert evicted == [2, 1]
    assert slots.info() == {"hits": 2, "misses": 4, "slots": 2, "cached": [3, 2]}


def test_pin_blocks_eviction():
    slots = cache(1)
    held = slots.acquire(1)
    got = []
    waiter = thread(lambda: got.append(slots.acquire(2)))
    time.sleep(0.2)
    assert waiter.is_alive() and not got and held.key == 1  # task 2 waits: the only slot is pinned
    slots.release(held)
    waiter.join(WAIT)
    assert got and got[0].key == 2
    slots.release(got[0])


def test_a_pinned_slot_is_not_the_victim():
    slots = cache(2)
    old = slots.acquire(1)  # least recently used, but pinned
    slots.release(slots.acquire(2))
    with slots.use(3) as slot:
        assert slot is not old
    assert old.key == 1 and slots.info()["cached"] == [1, 3]
    slots.release(old)


def test_failing_fill_leaves_the_slot_free():
    def fill(slot, key):
        if key == 13:
            raise RuntimeError("cannot write task 13")
        slot.buffers[0] = key

    slots = cache(1, fill)
    with pytest.raises(RuntimeError, match="task 13"):
        slots.acquire(13)
    assert slots.slots[0].key is None and slots.slots[0].pins == 0 and not slots.slots[0].loading
    assert slots.info()["cached"] == []
    with slots.use(4) as slot:  # the slot is usable again
        assert slot.buffers[0] == 4


def test_waiters_on_a_loading_slot_share_one_fill():
    started, finish = threading.Event(), threading.Event()
    calls = []

    def slow_fill(slot, key):
        calls.append(key)
        started.set()
        assert finish.wait(WAIT)
        slot.buffers[0] = key

    slots = cache(2, slow_fill)
    got = []

    def use():
        with slots.use(7) as slot:
            got.append(slot.buffers[0])

    first = thread(use)
    assert started.wait(WAIT)
    others = [thread(use) for _ in range(3)]
    time.sleep(0.2)
    assert not got and all(th.is_alive() for th in others)  # they wait for the fill, not a second slot
    finish.set()
    for th in [first, *others]:
        th.join(WAIT)
    assert got == [7, 7, 7, 7] and calls == [7]
    assert slots.info()["hits"] == 3 and slots.info()["misses"] == 1


def test_close_wakes_waiters_and_refuses_later_calls():
    slots = cache(1, owner="this TaskRuntime")
    held = slots.acquire(1)
    errors = []

    def wait_for_slot():
        try:
            slots.acquire(2)
        except UsageError as exc:
            errors.append(str(exc))

    waiter = thread(wait_for_slot)
    time.sleep(0.2)
    assert waiter.is_alive()
    slots.close()
    waiter.join(WAIT)
    assert not waiter.is_alive() and errors == ["this TaskRuntime is closed"]
    slots.release(held)  # a caller still holding a slot may let it go after the close
    with pytest.raises(UsageError, match="closed"):
        slots.acquire(1)


def test_many_threads_never_share_a_slot_between_keys():
    """Random keys from 8 threads over 3 slots: every use sees its own key in the buffer while it holds the pin."""
    import random

    slots = cache(3)
    failures = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            key = rng.randrange(6)
            with slots.use(key) as slot:
                if slot.buffers[0] != key:
                    failures.append((key, slot.buffers[0]))

    workers = [thread(worker, k) for k in range(8)]
    for th in workers:
        th.join(60)
    assert not any(th.is_alive() for th in workers) and not failures
    info = slots.info()
    assert info["hits"] + info["misses"] == 8 * 300
