"""Stage 1½: the answer cache. An answer whose inputs have not changed is served again.

A recommendation is a function of the request's parameters, the actor's live state, the
published model versions, the item-level data the sources read (neighbour rows,
popularity, trending, category lists, the catalog) and, slowly, the clock (decayed
affinities, the hour). Pages ask again with nothing changed: a second widget, a reload,
the next page of a feed. Computing the answer costs 1 to 2.5 ms of CPU; finding it again
costs a dictionary lookup. So an answer is kept under a key made of:

- the parameters: namespace, actor, ``num_results``, ``exclude``, the re-ranked items,
  the context and the hour it resolves to;
- a digest of every byte the one state round trip read (window, features, embedding and
  every model pointer: `serving.pipeline.state.RawState.fingerprint`).

That round trip is made on every request, so an event the agents applied, a promote or a
rollback changes the key at once: a click is reflected by the very next answer, as
without the cache. The item-level data is not in the key. It is already served from
in-process caches, the live popularity and trending lists about a second old
(`serving.pipeline.live`); a kept answer lives
``min(answer_cache_ttl_s, item_cache_ttl_s)``, 1 s by default, so an answer reflects the
live lists at most 2 s old instead of 1 s, and the clock's slow terms (decayed
affinities, hours-long half-lives) at most 1 s old.

Never kept: debug answers, filtered answers (a filter's definition and the catalog
fields it reads are outside the key), degraded answers (a store missed its deadline:
the next request should try again), and answers that needed the durable window
(Redis lost the actor's state; the next request reads it back). Every reuse still gets
its own ``recommendation_id`` and is logged for attribution like any answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

from serving.metrics import ANSWER_CACHE
from serving.pipeline.cache import TTLCache
from serving.pipeline.result import Recommendation

__all__ = ["AnswerCache", "Kept", "MemoKey"]

MemoKey = tuple[object, ...]

_HIT = ANSWER_CACHE.labels(result="hit")
_MISS = ANSWER_CACHE.labels(result="miss")


class Kept(NamedTuple):
    """What an answer needs besides its new id: the items shown, and what to log."""

    items: list[Recommendation]
    strategy: str
    variant: str


class AnswerCache:
    def __init__(
        self, ttl_s: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.enabled = ttl_s > 0 and size > 0
        self._kept: TTLCache[MemoKey, Kept] = TTLCache(ttl_s, size=max(size, 1), clock=clock)

    @staticmethod
    def key(
        namespace: str,
        actor: str,
        num_results: int,
        exclude: Collection[str],
        given: Sequence[str] | None,
        context: Mapping[str, str],
        hour: int | None,
        fingerprint: bytes,
    ) -> MemoKey:
        return (
            namespace,
            actor,
            num_results,
            tuple(sorted(exclude)),
            tuple(given) if given is not None else None,
            tuple(sorted(context.items())),
            hour,
            fingerprint,
        )

    def get(self, key: MemoKey) -> Kept | None:
        found = self._kept.get(key)
        (_HIT if found is not None else _MISS).inc()
        return found

    def put(self, key: MemoKey, kept: Kept) -> None:
        self._kept.put(key, kept)

    def __len__(self) -> int:
        return len(self._kept)
