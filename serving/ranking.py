"""Ranking: merge candidates with the actor's live window, score, filter and explain.

The first ranker is deliberately simple and fully explainable:

    score(item) = w_recent · recency(item) + w_similar · similarity(item)
                + w_popular · popularity(item)

* ``recency`` sums the actor's interactions with the item, each weighted by its event
  type and halved every ``half_life`` positions back in the window, normalised to [0, 1].
  Re-showing what a visitor just looked at is the strongest simple signal in the real
  clickstreams we evaluate on (Taobao, YooChoose).
* ``similarity`` sums the published item-to-item similarities (training's ``item2item``
  model, current version) of the actor's recent items, each weighted by its recency,
  normalised to [0, 1]. Absent until a model is published.
* ``popularity`` is the item's weighted interaction count over the maximum, so a user
  with no history still gets a sensible list.

Items the actor already purchased are filtered out. Every store read has a deadline
(``Settings.store_timeout_ms``); a store that misses it is named in ``degraded`` and the
ranker answers with what it has instead of failing the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis.exceptions import RedisError

from agents.state import DurableWindows, HotStore, WindowEntry
from recstream.errors import RecstreamError
from recstream.settings import Settings
from serving.candidates import PublishedModels

__all__ = ["Ranker", "Recommendation", "Recommendations"]

T = TypeVar("T")

W_RECENT = 1.0
W_SIMILAR = 0.6
W_POPULAR = 0.3
SIMILAR_SOURCES = 10
HALF_LIFE = 5.0
POPULAR_POOL = 200
POPULAR_TTL = 1.0


@dataclass(frozen=True, slots=True)
class Recommendation:
    item_id: str
    score: float
    reasons: tuple[str, ...]


@dataclass
class Recommendations:
    recommendation_id: str
    namespace: str
    actor: str
    items: list[Recommendation]
    degraded: list[str] = field(default_factory=list)
    took_ms: float = 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "recommendation_id": self.recommendation_id,
            "namespace": self.namespace,
            "actor": self.actor,
            "items": [
                {"item_id": r.item_id, "score": round(r.score, 6), "reasons": list(r.reasons)}
                for r in self.items
            ],
            "degraded": self.degraded,
            "took_ms": round(self.took_ms, 3),
        }


class _RecentMisses:
    """Actors recently found in neither store, so a stream of requests from new visitors
    does not cost a DynamoDB read each. Bounded in size and age; Redis is still read first
    on every request, so an actor who starts clicking is seen at once."""

    def __init__(self, ttl: float = 60.0, size: int = 100_000) -> None:
        self.ttl = ttl
        self.size = size
        self._at: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        at = self._at.get(key)
        return at is not None and time.monotonic() - at < self.ttl

    def add(self, key: tuple[str, str]) -> None:
        self._at[key] = time.monotonic()
        self._at.move_to_end(key)
        while len(self._at) > self.size:
            self._at.popitem(last=False)


class Ranker:
    def __init__(
        self,
        hot: HotStore,
        durable: DurableWindows,
        settings: Settings,
        models: PublishedModels | None = None,
    ) -> None:
        self.hot = hot
        self.durable = durable
        self.models = models
        self.settings = settings
        self.timeout = settings.store_timeout_ms / 1000
        self.budget = settings.ranking_budget_ms / 1000
        self._misses = _RecentMisses()
        self._background: set[asyncio.Task[None]] = set()
        # Popularity is the same for every actor and moves slowly: one read a second per
        # namespace instead of one per request.
        self._popular: dict[tuple[str, int], tuple[float, list[tuple[str, float]]]] = {}

    async def _popular_items(self, namespace: str, pool: int) -> list[tuple[str, float]]:
        now = time.monotonic()
        cached = self._popular.get((namespace, pool))
        if cached is not None and now - cached[0] < POPULAR_TTL:
            return cached[1]
        items = await self.hot.popular(namespace, pool)
        if len(self._popular) > 10_000:  # bounded: namespaces x pool sizes
            self._popular.clear()
        self._popular[(namespace, pool)] = (now, items)
        return items

    async def _bounded(
        self, name: str, call: Callable[[], Awaitable[T]], degraded: list[str], deadline: float
    ) -> T | None:
        """Run one store call within its own deadline and what is left of the request's
        budget; a call that misses either is named in ``degraded``."""
        remaining = min(self.timeout, deadline - asyncio.get_running_loop().time())
        if remaining <= 0:
            degraded.append(name)
            return None
        try:
            async with asyncio.timeout(remaining):
                return await call()
        except (TimeoutError, RecstreamError, RedisError, OSError):
            degraded.append(name)
            return None

    def _in_background(self, call: Awaitable[None]) -> None:
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restore(self, namespace: str, actor: str, entries: list[WindowEntry]) -> None:
        # Off the request path: the answer does not wait for Redis to be repaired.
        with contextlib.suppress(RecstreamError, RedisError, OSError):
            async with asyncio.timeout(1.0):
                await self.hot.merge_window(namespace, actor, entries)

    async def _window(
        self, namespace: str, actor: str, degraded: list[str], deadline: float
    ) -> list[WindowEntry]:
        window = await self._bounded(
            "window", lambda: self.hot.window(namespace, actor), degraded, deadline
        )
        if window:
            return window
        # Nothing hot: a new actor, or Redis lost the key. The durable copy tells which;
        # a found window is put back so the next request is served from Redis again.
        if window is not None and (namespace, actor) in self._misses:
            return []
        durable = await self._bounded(
            "durable_window", lambda: self.durable.get(namespace, actor), degraded, deadline
        )
        if durable is None and "durable_window" not in degraded:
            self._misses.add((namespace, actor))
        if durable:
            self._in_background(self._restore(namespace, actor, durable))
            return durable
        return []

    async def recommend(
        self,
        namespace: str,
        actor: str,
        num_results: int,
        exclude: frozenset[str] = frozenset(),
    ) -> Recommendations:
        """The top ``num_results`` items for ``actor``, never one in ``exclude`` (e.g. what
        the page already shows) nor one the actor purchased."""
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.budget
        degraded: list[str] = []
        pool = max(POPULAR_POOL, num_results * 4)
        window, popular = await asyncio.gather(
            self._window(namespace, actor, degraded, deadline),
            self._bounded(
                "popularity", lambda: self._popular_items(namespace, pool), degraded, deadline
            ),
        )
        scores: dict[str, float] = defaultdict(float)
        reasons: dict[str, list[str]] = defaultdict(list)
        purchased = {e.item_id for e in window if e.event_type == "purchase"}

        recent: dict[str, float] = defaultdict(float)
        for position, entry in enumerate(window):
            recent[entry.item_id] += self.settings.weight(entry.event_type) * 0.5 ** (
                position / HALF_LIFE
            )
        if recent:
            top = max(recent.values())
            for item, value in recent.items():
                scores[item] += W_RECENT * value / top
                reasons[item].append("recently_interacted")
            if self.models is not None:
                sources = sorted(recent.items(), key=lambda kv: -kv[1])[:SIMILAR_SOURCES]
                models = self.models
                similar = await self._bounded(
                    "item2item", lambda: models.neighbours(namespace, sources), degraded, deadline
                )
                if similar:
                    top = max(n.score for n in similar) or 1.0
                    for n in similar:
                        scores[n.item_id] += W_SIMILAR * n.score / top
                        reasons[n.item_id].append(f"similar_to:{n.because}")
        if popular:
            top = popular[0][1] or 1.0
            for item, count in popular:
                scores[item] += W_POPULAR * count / top
                reasons[item].append("popular")

        hidden = purchased | exclude
        ranked = sorted(
            (item for item in scores if item not in hidden),
            key=lambda item: (-scores[item], item),
        )[:num_results]
        return Recommendations(
            recommendation_id=uuid.uuid4().hex,
            namespace=namespace,
            actor=actor,
            items=[Recommendation(i, scores[i], tuple(reasons[i])) for i in ranked],
            degraded=degraded,
            took_ms=(time.perf_counter() - started) * 1000,
        )
