"""The ranking pipeline: one request through every stage, inside its deadline.

    state → candidates → features → filter → rank → seen → diversity → explain → log

The request budget (``Settings.ranking_budget_ms``, 50 ms by default) is split:

- state (one Redis round trip): at most ``store_timeout_ms`` and 40% of the budget;
- candidate sources: all run concurrently, each until ``source_timeout_ms`` from its
  start or 80% of the budget, whichever comes first (the DynamoDB window fallback shares
  that deadline); a source that misses it or fails is skipped and named in ``degraded``;
- the catalog (item metadata): until 90% of the budget;
- features, rank, seen, diversity and explanations are CPU over at most a few thousand
  candidates, and the served log is written in the background.

Zero data is a valid state: with nothing in Redis and nothing published the answer is an
empty list, never an error. A brand-new actor (no window anywhere) is not degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from recstream import prom
from recstream.decay import ForwardDecay
from recstream.errors import RecstreamError
from recstream.ids import new_id
from recstream.settings import Settings
from recstream.windows import DurableWindows, WindowEntry, WindowMerge
from serving.metrics import SOURCE_LATENCY
from serving.pipeline import kernels
from serving.pipeline.candidates import SourceOutput, Sources, best
from serving.pipeline.detach import Reads, cancel_detached, detached
from serving.pipeline.diversity import category_cap, mmr
from serving.pipeline.explain import debug_view, explain
from serving.pipeline.features import assemble
from serving.pipeline.freshness import FreshnessTracker
from serving.pipeline.log import ServedLog
from serving.pipeline.memo import AnswerCache, Kept, MemoKey
from serving.pipeline.models import ModelCache, Published
from serving.pipeline.rank import DEFAULT_WEIGHTS, LearnedRanker, LinearBlend
from serving.pipeline.result import Recommendation, Recommendations
from serving.pipeline.seen import apply_seen, policy_for
from serving.pipeline.shortlist import shortlist
from serving.pipeline.state import RawState, RecentMisses, read_raw_state, read_state
from serving.pipeline.types import (
    Candidate,
    CandidateFilter,
    ItemCatalog,
    RankContext,
    Scorer,
    UserState,
)
from streams.schema import Item

__all__ = ["Ranker"]

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_SHARE = 0.4
SOURCES_SHARE = 0.8
CATALOG_SHARE = 0.9
DEBUG_CANDIDATES = 200
WARM_ACTOR = "recstream:warm-up"
"""The actor `Ranker.warm` reads from the durable store: no event names it."""
SOURCE_NAMES = (
    "recently_viewed",
    "item2item",
    "sknn",
    "als",
    "trending",
    "popularity",
    "category_popularity",
)
RELATED_WEIGHTS: Mapping[str, float] = {"item2item": 1.0, "sknn": 1.0, "als": 0.5}
"""Related items blend these by default (the published blend's weights when present)."""
_ERRORS = (TimeoutError, RecstreamError, RedisError, OSError)


def _hour(values: Mapping[str, str], now: float) -> int:
    raw = values.get("hour")
    if raw is not None and raw.isdigit() and 0 <= int(raw) <= 23:
        return int(raw)
    return datetime.fromtimestamp(now, UTC).hour


class _Request:
    """The per-request bookkeeping: deadlines, degraded stores, stage timings."""

    def __init__(
        self, budget: float, debug: bool, as_of: float | None = None, logged: bool = True
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.started = time.perf_counter()
        self.now = time.time() if as_of is None else as_of
        """The wall clock the features' ages are measured from: now, or the request's
        ``as_of`` (a replay's or backtest's time)."""
        self.budget = budget
        self.degraded: list[str] = []
        self.debug = debug
        self.sources: dict[str, dict[str, Any]] = {}
        self.logged = logged
        """False for the start-up warm-up's answer, which nobody was shown."""

    def at(self, share: float) -> float:
        return self.start + share * self.budget

    def left(self, until: float) -> float:
        return until - self.loop.time()

    def degrade(self, name: str) -> None:
        if name not in self.degraded:
            self.degraded.append(name)

    async def bounded(self, name: str, call: Awaitable[T], until: float) -> T | None:
        """``call`` until the loop time ``until``; a miss or a store failure is named in
        ``degraded`` and answered with None."""
        began = time.perf_counter()
        try:
            if self.left(until) <= 0:
                if inspect.iscoroutine(call):
                    call.close()  # never started: nothing to cancel, nothing to warn about
                raise TimeoutError
            async with asyncio.timeout_at(until):
                return await call
        except _ERRORS as exc:
            if not isinstance(exc, TimeoutError):
                log.debug("%s failed: %s", name, exc)
            self.degrade(name)
            return None
        finally:
            prom.observe(SOURCE_LATENCY, time.perf_counter() - began, name)
            if isinstance(call, asyncio.Task | asyncio.Future) and not call.done():
                call.cancel()

    def timed(
        self, name: str, out: SourceOutput | None, began: float, observe: bool = True
    ) -> None:
        """A source's latency on /metrics (`bounded` observes its own) and, in debug, in
        the answer."""
        if observe:
            prom.observe(SOURCE_LATENCY, time.perf_counter() - began, name)
        if self.debug:
            self.sources[name] = {
                "origin": out.origin if out is not None else "degraded",
                "candidates": len(out.scores) if out is not None else 0,
                "ms": round((time.perf_counter() - began) * 1000, 3),
            }

    def took_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class Ranker:
    """The pipeline of one process: its caches, hooks and background work.

    ``catalog`` (item metadata) and the per-call ``item_filter`` are optional hooks
    (serving/pipeline/types.py); ``scorer`` defaults to the linear blend."""

    def __init__(
        self,
        redis: aioredis.Redis,
        durable: DurableWindows,
        settings: Settings,
        *,
        catalog: ItemCatalog | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        # the compiled loops ready before the first request (at once when the app's
        # lifespan loaded them already, off the event loop)
        kernels.warm()
        self.redis = redis
        self.durable = durable
        self.settings = settings
        self.catalog = catalog
        self.scorer: Scorer = scorer or LinearBlend()
        # an explicitly given scorer always ranks; else a published learned ranker does
        self._learned = scorer is None
        self.window_merge = WindowMerge(redis, settings)
        self.models = ModelCache(redis)
        self.reads: Reads = set()
        self.sources = Sources(
            redis,
            settings.item_cache_ttl_s,
            self.reads,
            settings.live_list_ttl_s,
            ForwardDecay.of(settings),
        )
        self.served = ServedLog(redis, settings)
        self.freshness = FreshnessTracker(settings.freshness_actors)
        self.answers = AnswerCache(
            min(settings.answer_cache_ttl_s, settings.item_cache_ttl_s), settings.answer_cache_size
        )
        self._diverse = (
            settings.diversity_category_cap is not None or settings.diversity_mmr_lambda is not None
        )
        self.budget = settings.ranking_budget_ms / 1000
        self.store_timeout = settings.store_timeout_ms / 1000
        self.source_timeout = settings.source_timeout_ms / 1000
        self.warmed = False
        """`warm` has run (whatever it could reach): /readyz waits for it."""
        self._misses = RecentMisses()
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle ------------------------------------------------------------------------
    async def warm(self, namespace: str, wait_s: float = 30.0) -> None:
        """Load every published model of ``namespace`` now (startup, tests), instead of
        on the first requests: the versions the pointers name, waited for even while
        another version is in memory; then make the store calls and one whole answer a
        first request would otherwise pay for. Best effort: what fails is logged."""
        try:
            versions = (await read_state(self.redis, namespace, None, 1)).versions
            await asyncio.gather(
                *(
                    self.models.ensure(namespace, name, versions.get(name), wait_s)
                    for name in versions
                )
            )
            # A process's first S3 and DynamoDB calls (aiobotocore's session and
            # connection, botocore's endpoint rules) held the event loop for 5-10 ms at a
            # time: a new visitor's first answer after a start was empty, every source past
            # its deadline (asyncio's debug mode named them). They are made now: the check
            # for lost model pointers a request would start (one is missing until every
            # model is published) and a read of an actor no event names.
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: self.durable.get(namespace, WARM_ACTOR)
            ]
            if (restorer := self.models.restorer) is not None:
                calls.append(lambda: restorer.warm(namespace))
            # Then one whole answer for that actor, not logged as served: the first request
            # otherwise still opened the Redis connections its concurrent sources need and
            # made the first live-list reads, and came out at 13-18 ms, now and then with
            # every source past its deadline (the demo's "before any click" was empty);
            # after this one, 10-11 ms. (The live lists it found empty, as on a fresh
            # install, are forgotten after it: the first events' lists are read at once.)
            calls.append(lambda: self._rank(
                namespace, WARM_ACTOR, 10, exclude=(), context=None, item_filter=None,
                filter_values=None, debug=False, given=None, as_of=None, logged=False,
            ))  # fmt: skip
            # (made one at a time, so none is left unawaited if the warm-up is cancelled)
            for call in calls:
                try:
                    await asyncio.wait_for(call(), wait_s)
                except (TimeoutError, *_ERRORS) as exc:
                    log.info("warming %s: %s (the first requests will be slower)", namespace, exc)
        finally:
            self.sources.lists.forget_empty()
            self.warmed = True

    async def aclose(self) -> None:
        await self.served.drain()
        await cancel_detached(self.reads)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.models.aclose()

    def _in_background(self, call: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- stage 1: state -------------------------------------------------------------------
    async def _raw_state(self, req: _Request, namespace: str, actor: str | None) -> RawState | None:
        return await req.bounded(
            "window" if actor is not None else "models",
            detached(
                read_raw_state(self.redis, namespace, actor, self.settings.window_size),
                self.reads,
            ),
            req.start + min(self.store_timeout, STATE_SHARE * self.budget),
        )

    def _parse(self, namespace: str, raw: RawState | None) -> UserState:
        if raw is None:
            # Redis did not answer: keep serving the model versions already in memory.
            return UserState([], {}, {}, self.models.loaded_versions(namespace))
        return raw.parse()

    async def _state(self, req: _Request, namespace: str, actor: str | None) -> UserState:
        return self._parse(namespace, await self._raw_state(req, namespace, actor))

    async def _durable_window(
        self, req: _Request, namespace: str, actor: str, until: float
    ) -> list[WindowEntry]:
        """(Asked only for an actor `RecentMisses` does not know to be new.)"""
        key = (namespace, actor)
        task = self._in_background(self.durable.get(namespace, actor))

        def remember(t: asyncio.Task[Any]) -> None:
            # Finishes even after the request gave up waiting, so the next request knows.
            if t.cancelled() or t.exception() is not None:
                return
            found = t.result()
            if found:
                self._misses.discard(key)
                self._in_background(self._restore(namespace, actor, found))
            else:
                self._misses.add(key)

        task.add_done_callback(remember)
        try:
            async with asyncio.timeout_at(until):
                found = await asyncio.shield(task)
        except _ERRORS:
            req.degrade("durable_window")
            return []
        return list(found or [])

    async def _restore(self, namespace: str, actor: str, entries: list[WindowEntry]) -> None:
        # Off the request path: the answer does not wait for Redis to be repaired.
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(1.0):
                await self.window_merge.merge(namespace, actor, entries)

    # --- stage 2: candidates --------------------------------------------------------------
    def _weights(self, blend: Published | None) -> dict[str, float]:
        if blend is not None and blend.weights:
            return dict(blend.weights)
        return dict(DEFAULT_WEIGHTS)

    async def _model(
        self, req: _Request, namespace: str, state: UserState, name: str, until: float
    ) -> Published | None:
        return await self.models.get(namespace, name, state.versions.get(name), req.left(until))

    def _cached_items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item] | None:
        """`_categories` from memory alone; None when an item must be read."""
        if self.catalog is None or not item_ids:
            return {}
        return self.catalog.cached_items(namespace, list(dict.fromkeys(item_ids)))

    async def _categories(
        self, req: _Request, namespace: str, item_ids: Sequence[str], until: float
    ) -> dict[str, Item]:
        cached = self._cached_items(namespace, item_ids)
        if cached is not None or self.catalog is None:
            return dict(cached or {})
        found = await req.bounded(
            "catalog",
            detached(self.catalog.items(namespace, list(dict.fromkeys(item_ids))), self.reads),
            until,
        )
        return dict(found or {})

    async def _candidates(
        self,
        req: _Request,
        namespace: str,
        state: UserState,
        history: Callable[[], Awaitable[list[str]]],
        weights: Mapping[str, float],
        restrict: Collection[str] | None,
        now: list[str] | None,
    ) -> list[SourceOutput]:
        """Every source with a non-zero weight, plus popularity (the fallback of every
        list): the ones whose inputs are in memory at once, the others concurrently, each
        within its own deadline. ``now`` is the history when it is known already (not
        waiting for the durable window)."""
        until = min(req.loop.time() + self.source_timeout, req.at(SOURCES_SHARE))
        n = self.settings.candidates_per_source
        src = self.sources

        async def recently_viewed() -> SourceOutput:
            items = await history()
            return src.repeat(
                items, await self._model(req, namespace, state, "recently_viewed", until)
            )

        async def item2item() -> SourceOutput:
            items = await history()
            model = await self._model(req, namespace, state, "item2item", until)
            version = state.versions.get("item2item")
            return await src.item2item(namespace, items, version, model, restrict, n)

        async def sknn() -> SourceOutput:
            items = await history()
            return src.sknn(
                items, await self._model(req, namespace, state, "sknn", until), restrict, n
            )

        async def als() -> SourceOutput:
            items = await history()
            model = await self._model(req, namespace, state, "als", until)
            return src.als(items, state.embedding, model, restrict, n)

        async def trending() -> SourceOutput:
            model = await self._model(req, namespace, state, "trending", until)
            return await src.trending(namespace, model, restrict, n)

        async def popularity() -> SourceOutput:
            model = await self._model(req, namespace, state, "popularity", until)
            return await src.popular(namespace, model, restrict, n, req.now)

        async def category_popularity() -> SourceOutput:
            items = await history()
            popular, params = await asyncio.gather(
                self._model(req, namespace, state, "popularity", until),
                self._model(req, namespace, state, "category_popularity", until),
            )
            recent = src.affinity_items(items, params)
            catalog = await self._categories(req, namespace, recent, until)
            categories = {i: it.categories[0] for i, it in catalog.items() if it.categories}
            affinity = src.affinities(items, categories, state.features, params, req.now)
            return await src.category_popularity(namespace, affinity, popular, restrict, n, req.now)

        makers: dict[str, Callable[[], Awaitable[SourceOutput]]] = {
            "recently_viewed": recently_viewed,
            "item2item": item2item,
            "sknn": sknn,
            "als": als,
            "trending": trending,
            "popularity": popularity,
            "category_popularity": category_popularity,
        }
        chosen = [s for s in SOURCE_NAMES if weights.get(s, 0.0) != 0 or s == "popularity"]
        done: dict[str, SourceOutput] = {}
        if now is not None:
            # The synchronous pass: every source whose inputs are all in memory (models
            # loaded, rows and lists cached) is computed here, with no task, no timeout
            # and no loop hop; in steady state that is all of them. The rest, below.
            for name in chosen:
                began = time.perf_counter()
                try:
                    out = self._source_now(name, namespace, state, now, restrict, req.now)
                except _ERRORS as exc:
                    log.debug("%s failed: %s", name, exc)
                    req.degrade(name)
                    out = None
                if out is not None or name in req.degraded:
                    req.timed(name, out, began)
                if out is not None:
                    done[name] = out

        async def timed(name: str) -> SourceOutput | None:
            began = time.perf_counter()
            out = await req.bounded(name, makers[name](), until)
            req.timed(name, out, began, observe=False)
            return out

        pending = [name for name in chosen if name not in done and name not in req.degraded]
        if pending:
            for name, out in zip(
                pending, await asyncio.gather(*(timed(name) for name in pending)), strict=True
            ):
                if out is not None:
                    done[name] = out
        return [done[name] for name in chosen if name in done]

    def _source_now(
        self,
        name: str,
        namespace: str,
        state: UserState,
        items: list[str],
        restrict: Collection[str] | None,
        clock: float,
    ) -> SourceOutput | None:
        """Source ``name`` from what is in memory, or None when it must read a store;
        ``clock`` is the request's wall clock (`_Request.now`)."""
        n = self.settings.candidates_per_source
        src = self.sources
        ready, model = self.models.get_now(namespace, name, state.versions.get(name))
        if not ready:
            return None
        if name == "recently_viewed":
            return src.repeat(items, model)
        if name == "item2item":
            version = state.versions.get("item2item")
            return src.item2item_now(namespace, items, version, model, restrict, n)
        if name == "sknn":
            return src.sknn(items, model, restrict, n)
        if name == "als":
            return src.als(items, state.embedding, model, restrict, n)
        if name == "trending":
            return src.trending_now(namespace, model, restrict, n)
        if name == "popularity":
            return src.popular_now(namespace, model, restrict, n, clock)
        if name != "category_popularity":
            return None  # (no other source: it would go the concurrent way)
        # its own parameters, the popularity lists and the catalog
        ready, popular = self.models.get_now(
            namespace, "popularity", state.versions.get("popularity")
        )
        catalog = self._cached_items(namespace, src.affinity_items(items, model))
        if not ready or catalog is None:
            return None
        categories = {i: it.categories[0] for i, it in catalog.items() if it.categories}
        affinity = src.affinities(items, categories, state.features, model, clock)
        return src.category_popularity_now(namespace, affinity, popular, restrict, n, clock)

    @staticmethod
    def _merge(outputs: Sequence[SourceOutput], order: Sequence[str] = ()) -> list[Candidate]:
        pool: dict[str, Candidate] = {item: Candidate(item) for item in order}
        for out in outputs:
            for item, score in out.scores.items():
                candidate = pool.get(item)
                if candidate is None:
                    if order:
                        continue  # re-ranking: only the given items
                    candidate = pool[item] = Candidate(item)
                candidate.sources[out.name] = score
                if item in out.because:
                    candidate.because = out.because[item]
                if item in out.category:
                    candidate.category = out.category[item]
        return list(pool.values())

    @staticmethod
    def _because(outputs: Sequence[SourceOutput], candidates: Sequence[Candidate]) -> None:
        """Each candidate's item2item explanation (`SourceOutput.because_of`), for these
        candidates only: the items shown (and the debug view's). Computed for the whole
        merged pool, most of it never shown, it was 60 % of the merge's CPU."""
        for out in outputs:
            if out.because_of is None:
                continue
            asked = [c for c in candidates if c.because is None and out.name in c.sources]
            if asked:
                found = out.because_of([c.item_id for c in asked])
                for c in asked:
                    c.because = found.get(c.item_id)

    # --- the recommendation request --------------------------------------------------------
    async def recommend(
        self,
        namespace: str,
        actor: str,
        num_results: int,
        exclude: Collection[str] = frozenset(),
        *,
        context: Mapping[str, str] | None = None,
        item_filter: CandidateFilter | None = None,
        filter_values: Mapping[str, str] | None = None,
        debug: bool = False,
        as_of: float | None = None,
    ) -> Recommendations:
        """The top ``num_results`` items for ``actor`` (a user id, or ``session:{id}``),
        never one in ``exclude`` (e.g. what the page already shows) nor one
        ``item_filter`` refuses. ``as_of`` (epoch seconds, default now) is the time the
        ranking is for: the features' ages and the hour are measured from it, so a
        replay of logged events is ranked as it would have been then."""
        return await self._rank(
            namespace,
            actor,
            num_results,
            exclude=exclude,
            context=context,
            item_filter=item_filter,
            filter_values=filter_values,
            debug=debug,
            given=None,
            as_of=as_of,
        )

    async def rerank(
        self,
        namespace: str,
        actor: str,
        item_ids: Sequence[str],
        *,
        context: Mapping[str, str] | None = None,
        item_filter: CandidateFilter | None = None,
        filter_values: Mapping[str, str] | None = None,
        debug: bool = False,
        as_of: float | None = None,
    ) -> Recommendations:
        """``item_ids`` ordered for ``actor``: every given item exactly once (duplicates
        folded), best first; items no source scores keep their given order at the end.
        A seen item is demoted (never dropped) under the demote and exclude policies; an
        ``item_filter`` removes the items it refuses, as Personalize's does."""
        given = list(dict.fromkeys(item_ids))
        return await self._rank(
            namespace,
            actor,
            len(given),
            exclude=frozenset(),
            context=context,
            item_filter=item_filter,
            filter_values=filter_values,
            debug=debug,
            given=given,
            as_of=as_of,
        )

    async def _rank(
        self,
        namespace: str,
        actor: str,
        num_results: int,
        *,
        exclude: Collection[str],
        context: Mapping[str, str] | None,
        item_filter: CandidateFilter | None,
        filter_values: Mapping[str, str] | None,
        debug: bool,
        given: list[str] | None,
        as_of: float | None,
        logged: bool = True,
    ) -> Recommendations:
        req = _Request(self.budget, debug, as_of, logged)
        values = dict(context or {})
        rank_context = RankContext(values, _hour(values, req.now))
        raw = await self._raw_state(req, namespace, actor)
        memo: MemoKey | None = None
        # (an answer for a given time is not kept: its key would need the time, and the
        # next request, a replay's next step, asks for another)
        if (
            raw is not None
            and self.answers.enabled
            and not debug
            and item_filter is None
            and as_of is None
        ):
            memo = self.answers.key(
                namespace, actor, num_results, exclude, given, values, rank_context.hour,
                raw.fingerprint(),
            )  # fmt: skip
            kept = self.answers.get(memo)
            if kept is not None:
                result = self._serve(req, namespace, actor, kept, values)
                result.took_ms = req.took_ms()
                return result
        state = self._parse(namespace, raw)
        sources_until = min(req.loop.time() + self.source_timeout, req.at(SOURCES_SHARE))
        window_task: asyncio.Task[list[WindowEntry]] | None = None
        if (
            not state.window
            and "window" not in req.degraded
            and (namespace, actor) not in self._misses
        ):
            window_task = asyncio.ensure_future(
                self._durable_window(req, namespace, actor, sources_until)
            )

        async def history() -> list[str]:
            if window_task is not None and not state.window:
                state.window = await asyncio.shield(window_task)
            return state.history

        blend = await self._model(req, namespace, state, "blend", sources_until)
        weights = self._weights(blend)
        learned = (
            await self._model(req, namespace, state, "ranker", sources_until)
            if self._learned
            else None
        )
        ranking = learned.ranking if learned is not None else None
        # the learned ranker's sources are the ones it was fitted on
        chosen = dict.fromkeys(ranking.spec.sources, 1.0) if ranking is not None else weights
        outputs = await self._candidates(
            req, namespace, state, history, chosen, given,
            state.history if window_task is None else None,
        )  # fmt: skip
        if window_task is not None:
            await history()
        window = state.window
        if window:
            self.freshness.observe(namespace, actor, window)
        policy = policy_for(self.settings.seen_policy, namespace)
        if given is None and item_filter is None and ranking is None:
            # a filter may refuse most of the best: it sees the whole pool. The learned
            # ranker scores the whole pool too: it was fitted on every source's full list
            # (its rank features count within it), not on the blend's shortlist
            keep = max(self._pool(num_results + len(exclude)), DEBUG_CANDIDATES * debug)
            seen = {e.item_id for e in window}
            outputs = shortlist(
                outputs,
                weights,
                keep,
                seen,
                None if self._diverse else policy,
                self.sources.interner,
            )
        candidates = self._merge(outputs, given or ())

        # Item metadata: a filter and diversity read it for every candidate, the response
        # only for the items shown; ~150 cache lookups a request are worth skipping.
        every_item = item_filter is not None or self._diverse
        if every_item:
            await self._describe(req, namespace, candidates)
        spec = ranking.spec if ranking is not None else None
        matrix = assemble(
            candidates,
            window,
            rank_context,
            self.settings.weight,
            req.now,
            spec,
            describe=debug,
        )
        scorer = LearnedRanker(ranking, matrix) if ranking is not None else self.scorer
        scorer.score(candidates, weights)

        if item_filter is not None:
            fvalues = dict(filter_values or {})
            candidates = [
                c for c in candidates if item_filter.allows(c.item_id, c.item, window, fvalues)
            ]
        if given is not None:
            position = {item: i for i, item in enumerate(given)}
            ranked = sorted(
                candidates, key=lambda c: (-bool(c.contributions), -c.score, position[c.item_id])
            )
        else:
            ranked = sorted(candidates, key=_order)
        if given is not None and policy == "exclude":
            policy = "demote"  # re-ranking returns every given item
        ranked = apply_seen(ranked, policy, exclude)
        if given is None:
            ranked = self._diversify(ranked, num_results)
        strategy = "personalized_ranking" if given is not None else "recommendations"
        if ranking is not None and learned is not None:
            variant = f"{scorer.name}@{learned.version}"
        else:
            variant = f"{scorer.name}@{blend.version if blend else 'default'}"
        shown = ranked[:num_results]
        self._because(outputs, shown)
        if not every_item:
            await self._describe(req, namespace, shown)
        result = self._answer(req, namespace, actor, shown, strategy, variant, values)
        if memo is not None and not req.degraded and not (window_task is not None and window):
            # (an answer built from the durable window is not kept: the window is being
            # written back to Redis, which changes the key of the next request)
            self.answers.put(memo, Kept(result.items, strategy, variant))
        if debug:
            self._because(outputs, ranked[num_results:DEBUG_CANDIDATES])
            explain(ranked[num_results:DEBUG_CANDIDATES])
            result.debug = {
                "scorer": variant,
                "weights": weights,
                "versions": state.versions,
                "seen_policy": policy,
                "context": {"values": values, "hour": rank_context.hour},
                "window": [e.item_id for e in window],
                "sources": req.sources,
                "candidates": [debug_view(c) for c in ranked[:DEBUG_CANDIDATES]],
            }
        result.took_ms = req.took_ms()
        return result

    def _pool(self, shown: int) -> int:
        """How many unseen candidates the shortlist keeps when ``shown`` are answered
        (``num_results`` plus the ``exclude`` list). The blend's top ``shown`` unseen items
        are the shortlist's first ``shown`` (tests/serving/test_shortlist.py), and seen ones
        are kept besides, whatever the seen policy does with them: nothing more is needed.
        Diversity may skip many of the best, so it gets ``rank_pool``, at least twice
        ``shown``."""
        if self._diverse:
            return max(self.settings.rank_pool, 2 * shown)
        return shown

    async def _describe(self, req: _Request, namespace: str, candidates: list[Candidate]) -> None:
        items = await self._categories(
            req, namespace, [c.item_id for c in candidates], req.at(CATALOG_SHARE)
        )
        for candidate in candidates:
            candidate.item = items.get(candidate.item_id)

    def _diversify(self, ranked: list[Candidate], n: int) -> list[Candidate]:
        if self.settings.diversity_category_cap is not None:
            ranked = category_cap(ranked, self.settings.diversity_category_cap)
        if self.settings.diversity_mmr_lambda is not None:
            ranked = mmr(ranked, self.settings.diversity_mmr_lambda, n)
        return ranked

    # --- related items (SIMS) ----------------------------------------------------------------
    async def related(
        self,
        namespace: str,
        item_id: str,
        num_results: int,
        *,
        exclude: Collection[str] = frozenset(),
        item_filter: CandidateFilter | None = None,
        filter_values: Mapping[str, str] | None = None,
        debug: bool = False,
    ) -> Recommendations:
        """Items like ``item_id``: its item2item neighbours, the sessions that hold it
        (session kNN) and its nearest ALS factors; popular items fill up, and are all an
        unknown item gets."""
        req = _Request(self.budget, debug)
        state = await self._state(req, namespace, None)
        until = min(req.loop.time() + self.source_timeout, req.at(SOURCES_SHARE))
        n = self.settings.candidates_per_source
        blend = await self._model(req, namespace, state, "blend", until)
        weights = {
            name: (blend.weights.get(name, 0.0) if blend and blend.weights else w)
            for name, w in RELATED_WEIGHTS.items()
        }

        async def item2item() -> SourceOutput:
            version = state.versions.get("item2item")
            out = SourceOutput("item2item", origin=f"published:{version}")
            if version is not None:
                rows = await self.sources.neighbour_rows(namespace, version, [item_id])
                row = rows.get(item_id)
                vocabulary = self.sources.vocabulary(namespace, version)
                out.scores = dict(row.pairs(vocabulary)[:n]) if row is not None else {}
                out.because = dict.fromkeys(out.scores, item_id)
            return out

        async def sknn() -> SourceOutput:
            model = await self._model(req, namespace, state, "sknn", until)
            return self.sources.sknn([item_id], model, None, n)

        async def als() -> SourceOutput:
            model = await self._model(req, namespace, state, "als", until)
            out = SourceOutput("als")
            if model is None or model.unit_factors is None or item_id not in model.lookup:
                return out
            out.origin = f"published:{model.version}"
            sims = model.unit_factors @ model.unit_factors[model.lookup[item_id]]
            out.scores = best({model.item_ids[i]: float(s) for i, s in enumerate(sims) if s > 0}, n)
            return out

        async def popularity() -> SourceOutput:
            model = await self._model(req, namespace, state, "popularity", until)
            return await self.sources.popular(namespace, model, None, n, req.now)

        makers = {"item2item": item2item, "sknn": sknn, "als": als, "popularity": popularity}
        outputs = [
            out
            for out in await asyncio.gather(
                *(req.bounded(name, make(), until) for name, make in makers.items())
            )
            if out is not None
        ]
        if item_filter is None:
            keep = max(self.settings.rank_pool, 2 * num_results, DEBUG_CANDIDATES * debug)
            outputs = shortlist(outputs, weights, keep, {item_id}, "exclude", self.sources.interner)
        candidates = [c for c in self._merge(outputs) if c.item_id != item_id]
        items = await self._categories(
            req, namespace, [c.item_id for c in candidates], req.at(CATALOG_SHARE)
        )
        for candidate in candidates:
            candidate.item = items.get(candidate.item_id)
        assemble(candidates, [], RankContext(), self.settings.weight, req.now, describe=debug)
        self.scorer.score(candidates, weights)
        if item_filter is not None:
            fvalues = dict(filter_values or {})
            candidates = [
                c for c in candidates if item_filter.allows(c.item_id, c.item, [], fvalues)
            ]
        ranked = [c for c in sorted(candidates, key=_order) if c.item_id not in exclude]
        self._because(outputs, ranked[:num_results])
        result = self._answer(
            req,
            namespace,
            None,
            ranked[:num_results],
            "related_items",
            f"{self.scorer.name}@{blend.version if blend else 'default'}",
            {"item_id": item_id},
        )
        if debug:
            self._because(outputs, ranked[num_results:DEBUG_CANDIDATES])
            explain(ranked[num_results:DEBUG_CANDIDATES])
            result.debug = {
                "weights": weights,
                "versions": state.versions,
                "candidates": [debug_view(c) for c in ranked[:DEBUG_CANDIDATES]],
            }
        result.took_ms = req.took_ms()
        return result

    def _answer(
        self,
        req: _Request,
        namespace: str,
        actor: str | None,
        shown: list[Candidate],
        strategy: str,
        variant: str,
        context: Mapping[str, str],
    ) -> Recommendations:
        """The answer of the items shown, explained, and logged for attribution."""
        explain(shown)
        items = [Recommendation(c.item_id, c.score, tuple(c.reasons), c.item) for c in shown]
        return self._serve(req, namespace, actor, Kept(items, strategy, variant), context)

    def _serve(
        self,
        req: _Request,
        namespace: str,
        actor: str | None,
        answer: Kept,
        context: Mapping[str, str],
    ) -> Recommendations:
        """``answer`` under a new recommendation id, logged for attribution."""
        result = Recommendations(
            recommendation_id=new_id(),
            namespace=namespace,
            actor=actor,
            items=list(answer.items),
            degraded=req.degraded,
        )
        if not req.logged:
            return result
        self.served.record(
            namespace,
            result.recommendation_id,
            actor=actor,
            strategy=answer.strategy,
            variant=answer.variant,
            items=[r.item_id for r in answer.items],
            context=context,
        )
        return result

    # --- trending -----------------------------------------------------------------------------
    async def trending(
        self, namespace: str, window: str, category: str | None, num_results: int
    ) -> Recommendations:
        """What is trending in ``window`` (1h or 24h), overall or in ``category``: the
        agents' materialized lists, else the published trending model (overall) or the
        category's popularity list; popular items when nothing trends yet."""
        req = _Request(self.budget, False)
        state = await self._state(req, namespace, None)
        until = min(req.loop.time() + self.source_timeout, req.at(SOURCES_SHARE))
        n = max(num_results, 1)

        async def trend() -> SourceOutput:
            model = await self._model(req, namespace, state, "trending", until)
            return await self.sources.trending(namespace, model, None, n, window, category)

        async def fallback() -> SourceOutput:
            model = await self._model(req, namespace, state, "popularity", until)
            if category is None:
                return await self.sources.popular(namespace, model, None, n, req.now)
            return await self.sources.category_popularity(
                namespace, {category: 1.0}, model, None, n, req.now
            )

        out = await req.bounded("trending", trend(), until)
        if out is None or not out.scores:
            out = await req.bounded("popularity", fallback(), until)
        candidates = self._merge([out] if out is not None else [])
        items = await self._categories(
            req, namespace, [c.item_id for c in candidates], req.at(CATALOG_SHARE)
        )
        for c in candidates:
            c.item = items.get(c.item_id)
            c.score = next(iter(c.sources.values()))
            c.contributions = dict(c.sources)
        shown = sorted(candidates, key=lambda c: (-c.score, c.item_id))[:num_results]
        result = self._answer(
            req,
            namespace,
            None,
            shown,
            "trending",
            f"{window}:{out.origin if out else 'none'}",
            {"window": window, **({"category": category} if category else {})},
        )
        result.took_ms = req.took_ms()
        return result


def _order(candidate: Candidate) -> tuple[bool, float, float, str]:
    """Blend candidates by score; items only the fallback proposed follow by popularity."""
    return (
        not candidate.contributions,
        -candidate.score,
        -candidate.sources.get("popularity", 0.0),
        candidate.item_id,
    )
