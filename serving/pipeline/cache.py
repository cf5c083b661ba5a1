"""A small in-process TTL cache for item-level data (neighbour rows, popularity lists).

Bounded in size (least recently written evicted) and in age, so a promote or a live
counter moving is seen within ``ttl`` seconds, and memory stays flat however many items
are requested.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class TTLCache(Generic[K, V]):
    def __init__(
        self, ttl: float, size: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._data.get(key)
        if found is None:
            return None
        at, value = found
        if self.clock() - at >= self.ttl:
            del self._data[key]
            return None
        return value

    def get_all(self, keys: Iterable[K]) -> dict[K, V] | None:
        """`get` of every key, the clock read once; None as soon as one is missing or
        expired (what a caller that needs them all does next is a read anyway)."""
        data = self._data
        now = self.clock()
        found: dict[K, V] = {}
        for key in keys:
            entry = data.get(key)
            if entry is None or now - entry[0] >= self.ttl:
                return None
            found[key] = entry[1]
        return found

    def put(self, key: K, value: V) -> None:
        now = self.clock()
        self._data[key] = (now, value)
        self._data.move_to_end(key)
        data = self._data
        while len(data) > self.size:
            data.popitem(last=False)
        # The oldest entries are first: drop the expired ones now, not when their key is
        # asked again (it may never be). Otherwise a short-lived cache fills to ``size``
        # with dead entries, all of them objects every full garbage collection walks.
        while data:
            at, _ = next(iter(data.values()))
            if now - at < self.ttl:
                break
            data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
