"""The live lists the agents keep moving (popularity, trending, per category), as the
candidate sources read them: cached in-process, refreshed in the background, read once.

Every event moves these sorted sets, so a request may use one at most ``ttl`` (1 s) old.
Two things made the plain one-second cache costly under load (docs/serving-speed.md,
session 6): when an entry expired, every request arriving before the first re-read
answered read the list too (at 1,000 requests a second, dozens of identical reads of
the same 100 members, and new connections to carry them), and the request that found it
expired waited a round trip for it.

So, as HTTP caches do with ``stale-while-revalidate``:

- a list up to ``ttl`` old is served as is;
- a list older than that, up to ``max_stale`` (30 s), is still served, and one read in
  the background (started by the first request that notices) refreshes it;
- a list never read, or older than ``max_stale``, or empty and older than ``ttl``, is
  read while the request waits (stale emptiness has nothing to offer);
- one read at a time per list: a request that needs a list being read waits for that
  read instead of starting its own (single flight).

A list is then at most ``ttl`` plus one round trip old whenever requests keep coming,
and when Redis does not answer, the last lists keep serving for ``max_stale`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from recstream.errors import StoreUnavailable
from recstream.published import as_text
from serving.pipeline.codes import Table
from serving.pipeline.detach import Reads, started

__all__ = ["LIVE_MAX_STALE_S", "LIVE_TTL_S", "LiveLists", "Rows"]

LIVE_TTL_S = 1.0
"""Live lists move every event: re-read at most once a second."""
LIVE_MAX_STALE_S = 30.0
"""How long an expired list is still served while it is re-read."""


class Rows(list[tuple[str, float]]):
    """One list's (member, score) rows, highest first, members unique; ``table`` holds
    the same as arrays once a source has made them (serving/pipeline/codes.py), so the
    list is coded once per read, not once per request; ``best`` likewise holds the
    source's cut of it as a dict (`serving.pipeline.candidates.best`) and that cut coded
    (for the shortlist), shared by every request until the list is read again: its
    readers never change it."""

    __slots__ = ("best", "table")

    def __init__(self, rows: list[tuple[str, float]]) -> None:
        super().__init__(rows)
        self.table: Table | None = None
        self.best: tuple[tuple[int, float], dict[str, float], Table | None] | None = None


_Key = tuple[str, int]


class LiveLists:
    """The top ``n`` members of sorted sets, per (key, n)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        reads: Reads,
        *,
        ttl: float = LIVE_TTL_S,
        max_stale: float = LIVE_MAX_STALE_S,
        size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.reads = reads
        self.ttl = ttl
        self.max_stale = max_stale
        self.size = size
        self.clock = clock
        self._lists: OrderedDict[_Key, tuple[float, Rows]] = OrderedDict()
        self._reading: dict[_Key, asyncio.Task[dict[str, Rows]]] = {}

    def forget_empty(self) -> int:
        """Drop the lists held empty; returns how many. For the start-up warm-up: its
        answer reads the lists to open the connections and run the code once, and on a
        fresh install they are empty; kept, a first answer right after the first events
        would serve that emptiness for up to ``ttl``."""
        empty = [key for key, (_, rows) in self._lists.items() if not rows]
        for key in empty:
            del self._lists[key]
        return len(empty)

    def now(self, keys: Sequence[str], n: int) -> list[Rows] | None:
        """Each list from memory (refreshing the expired ones in the background); None
        when one must be read first."""
        found, missing = self._lookup(keys, n)
        if missing:
            return None
        return [found[key] for key in keys]

    async def get(self, keys: Sequence[str], n: int) -> list[Rows]:
        """Each list, the ones not in memory read in one round trip (or joined to the
        read already under way)."""
        found, missing = self._lookup(keys, n)
        if missing:
            for task in {id(t): t for t in self._read(missing, n)}.values():
                # shielded: a request that stops waiting leaves the read to finish
                found.update(await asyncio.shield(task))
        return [found[key] for key in keys]

    def _lookup(self, keys: Sequence[str], n: int) -> tuple[dict[str, Rows], list[str]]:
        now = self.clock()
        found: dict[str, Rows] = {}
        missing: list[str] = []
        expired: list[str] = []
        for key in keys:
            entry = self._lists.get((key, n))
            age = now - entry[0] if entry is not None else None
            # An expired empty list is read while the request waits, not served stale:
            # nothing is all it could give (a start-up warm-up read the lists before the
            # first events, and a new visitor's first answer was then empty for 30 s).
            if (
                entry is None
                or age is None
                or age >= self.max_stale
                or (not entry[1] and age >= self.ttl)
            ):
                missing.append(key)
                continue
            if age >= self.ttl:
                expired.append(key)
            found[key] = entry[1]
        if expired:
            self._read(expired, n)  # in the background; a failure keeps the old list
        return found, missing

    def _read(self, keys: Sequence[str], n: int) -> list[asyncio.Task[dict[str, Rows]]]:
        """The reads that bring ``keys``: one new read for those nobody is reading, and
        the reads under way for the others."""
        tasks = []
        new = []
        for key in keys:
            task = self._reading.get((key, n))
            if task is None:
                new.append(key)
            else:
                tasks.append(task)
        if new:
            task = started(self._fetch(new, n), self.reads)
            for key in new:
                self._reading[(key, n)] = task

            def done(_: asyncio.Task[Any], keys: list[str] = new) -> None:
                for key in keys:
                    self._reading.pop((key, n), None)

            task.add_done_callback(done)
            tasks.append(task)
        return tasks

    async def _fetch(self, keys: list[str], n: int) -> dict[str, Rows]:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zrevrange(key, 0, n - 1, withscores=True)
        try:
            replies = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"reading {keys} failed: {exc}") from exc
        at = self.clock()
        out: dict[str, Rows] = {}
        for key, reply in zip(keys, replies, strict=True):
            rows = out[key] = Rows([(as_text(member), float(score)) for member, score in reply])
            self._lists[(key, n)] = (at, rows)
            self._lists.move_to_end((key, n))
        while len(self._lists) > self.size:
            self._lists.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._lists)
