"""Stage 2: candidates from every source training and the agents publish.

Each source scores exactly as its offline model does (training/models/*.py, with the
published ``params``), so the blend of their scores matches the offline blend:

============================  ==========================================================
source (blend component)      request-time computation
============================  ==========================================================
``recently_viewed``           Σ decay^age over the last ``history_len`` window items;
                              the newest item x ``last_weight`` (training.models.repeat)
``item2item``                 Σ_j w_j · sim(h_j, i) over the last ``history_len`` items,
                              w_j = j/m (``recency``) else 1; the ``nbr:{item}`` rows of
                              the serving version, cached per version
``sknn``                      `recstream.scoring.knn_scores` on the published index
                              (loaded once per version) with its ``params``
``als``                       `recstream.scoring.fold_in` of the last ``history_len``
                              window items (confidence ``alpha``) onto the published
                              ``factors``/``yty``; scores = factors · x. The live
                              embedding (``rs:{ns}:emb:{actor}``) when the window has
                              no known item
``trending``                  ``rs:{ns}:trend:{24h|1h}`` (agents/trending), else the
                              published ``trending`` ``top``
``popularity``                ``rs:{ns}:pop:decayed``, else ``rs:{ns}:pop``, else the
                              published ``popularity`` ``top``
``category_popularity``       affinity(c) = Σ decay^age of recent items of category c
                              (catalog), or the decayed ``a:cat:{c}`` affinities of the
                              feature hash; score = affinity(c)·(1 + s(i)/(max s + 1))
                              over ``rs:{ns}:pop:cat:{c}``, else the published
                              ``popularity`` ``top:cat:{c}``
============================  ==========================================================

Every source is bounded (``Settings.candidates_per_source``) and the ones that read
Redis run under their own deadline (serving/pipeline/ranker.py); the CPU-only ones work
on data already in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis

from recstream.decay import ForwardDecay
from recstream.keys import Keys
from recstream.published import read_current_many
from recstream.scoring import fold_in, knn_scores, top_k
from recstream.settings import Settings
from serving.pipeline.cache import TTLCache
from serving.pipeline.codes import IdOrder, Interner, Scratch, Table
from serving.pipeline.detach import Reads, detached
from serving.pipeline.kernels import best_entries, neighbour_sums, strongest
from serving.pipeline.live import LIVE_TTL_S, LiveLists, Rows
from serving.pipeline.models import Published

T = TypeVar("T")

__all__ = ["SourceOutput", "Sources", "best", "order_ties", "run_starts"]

AFFINITY_HALF_LIFE_S = 86400.0
"""Half-life used to bring the feature hash's ``a:cat:*`` affinities to the same instant
(only their ratios matter here)."""
MAX_CATEGORIES = 5
"""Category popularity reads the lists of the user's top few categories only."""
NEIGHBOUR_TTL_S = 600.0
"""How long a published version's neighbour rows stay cached (they never change)."""
DEFAULT_DECAY = ForwardDecay(
    Settings.model_fields["popularity_epoch_s"].default,
    Settings.model_fields["popularity_half_life_s"].default,
)
"""The settings' default decay (the ranker passes the configured one)."""
MAX_VERSIONS = 4
"""Item2item versions whose id numbering is kept per process (the serving one and the
few a rollback or promotion may switch between)."""


class SourceOutput:
    """One source's candidates: ``scores`` (item → score, in the source's order), and
    what the explanations and the debug view need.

    A source that works on coded arrays hands them over as ``table`` (the same items and
    scores, in the same order) and ``scores`` is decoded only when asked: the shortlist
    (serving/pipeline/shortlist.py) reads the table and keeps a few dozen of the ~200
    items, so most requests never build the dictionary."""

    __slots__ = (
        "_category",
        "_groups",
        "_scores",
        "because",
        "because_of",
        "name",
        "origin",
        "table",
    )

    def __init__(
        self,
        name: str,
        scores: dict[str, float] | None = None,
        because: dict[str, str] | None = None,
        category: dict[str, str] | None = None,
        origin: str = "",
        because_of: Callable[[Collection[str]], dict[str, str]] | None = None,
        *,
        table: Table | None = None,
        groups: tuple[Sequence[str], np.ndarray[Any, np.dtype[np.intp]]] | None = None,
    ) -> None:
        self.name = name
        self._scores = scores
        self.table = table
        """``scores`` as coded arrays, when the source made them (None otherwise): the
        same items and scores in the same order; ``scores`` is decoded from it when no
        dict was given."""
        self.because: dict[str, str] = {} if because is None else because
        """item2item: the history item that contributed most to each score."""
        self._category = category
        self._groups = groups
        self.origin = origin
        """Where the data came from (e.g. ``live`` or ``published``), for the debug view."""
        self.because_of = because_of
        """item2item: computes ``because`` for the given items. It costs more than the
        scores, and most scored items are cut before they are shown, so `Ranker._merge`
        asks it only for the items left after the shortlist."""

    @property
    def scores(self) -> dict[str, float]:
        """Read only once made: popularity and trending share one dict between requests
        (a live list's cut, `serving.pipeline.live.Rows`)."""
        if self._scores is None:
            table = self.table
            self._scores = (
                {}
                if table is None
                else dict(
                    zip(
                        table.interner.decode(table.codes.tolist()),
                        table.values.tolist(),
                        strict=True,
                    )
                )
            )
        return self._scores

    @scores.setter
    def scores(self, scores: dict[str, float]) -> None:
        self._scores = scores
        self.table = None  # (a coded twin, if any, is set after)

    @property
    def groups(self) -> tuple[Sequence[str], np.ndarray[Any, np.dtype[np.intp]]] | None:
        """category_popularity with a ``table``: the categories, and the index of each
        table row's category among them (``category`` decoded from them when asked)."""
        return self._groups

    @groups.setter
    def groups(self, groups: tuple[Sequence[str], np.ndarray[Any, np.dtype[np.intp]]]) -> None:
        self._groups = groups
        self._category = None

    @property
    def category(self) -> dict[str, str]:
        """category_popularity: the category whose list proposed each item."""
        if self._category is None:
            table, groups = self.table, self._groups
            if groups is None or table is None:
                self._category = {}
            else:
                names, index = groups
                self._category = dict(
                    zip(
                        table.interner.decode(table.codes.tolist()),
                        map(names.__getitem__, index.tolist()),
                        strict=True,
                    )
                )
        return self._category

    @category.setter
    def category(self, category: dict[str, str]) -> None:
        self._category = category
        self._groups = None

    def __repr__(self) -> str:
        return f"SourceOutput({self.name!r}, {self.scores!r}, origin={self.origin!r})"


@dataclass(frozen=True, slots=True)
class NeighbourRow:
    """One ``nbr:{item}`` row of a published item2item version, as arrays: numpy adds a
    request's ≈ 2,000 neighbour contributions in C, and a cache of arrays holds two
    objects per row, not 400 tuples the garbage collector walks."""

    codes: np.ndarray[Any, np.dtype[np.int32]]
    """Neighbour ids, numbered by the version's `Vocabulary`, highest similarity first."""
    sims: np.ndarray[Any, np.dtype[np.float64]]

    def pairs(self, vocabulary: Vocabulary) -> list[tuple[str, float]]:
        ids = vocabulary.ids
        return [(ids[c], s) for c, s in zip(self.codes.tolist(), self.sims.tolist(), strict=True)]


class Vocabulary:
    """Item id ↔ dense code for one published item2item version (it grows as its rows are
    read), and the version's cached rows, which are numbered by it."""

    __slots__ = ("_interned", "_interner", "_slots", "code", "ids", "order", "rows")

    def __init__(self, row_ttl_s: float) -> None:
        self.code: dict[str, int] = {}
        self.ids: list[str] = []
        self.rows: TTLCache[str, NeighbourRow] = TTLCache(row_ttl_s)
        self._interner: Interner | None = None
        self._interned: np.ndarray[Any, np.dtype[np.int64]] = np.zeros(0, np.int64)
        self._slots = Scratch()
        self.order = IdOrder()

    def slots(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The kernels' code → slot map (`Scratch`) for this version's codes."""
        return self._slots.covering(len(self.ids))

    def interned(self, interner: Interner) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Each of this version's codes as ``interner`` numbers the same id (the codes
        every source hands the shortlist); the ids new since the last call numbered."""
        if self._interner is not interner:
            self._interner, self._interned = interner, np.zeros(0, np.int64)
        if len(self._interned) < len(self.ids):
            added = interner.encode(self.ids[len(self._interned) :])
            self._interned = np.concatenate([self._interned, added])
        return self._interned

    def encode(self, items: Sequence[str]) -> np.ndarray[Any, np.dtype[np.int32]]:
        code = self.code
        for item in items:
            if item not in code:
                code[item] = len(self.ids)
                self.ids.append(item)
        return np.fromiter((code[i] for i in items), np.int32, len(items))


@functools.lru_cache(maxsize=64)
def _powers(decay: float, n: int) -> tuple[float, ...]:
    """``decay**age`` for ages 0 .. n-1 (each the very float ``decay**age`` gives)."""
    return tuple(decay**age for age in range(n))


def best(scores: Mapping[str, float], n: int) -> dict[str, float]:
    """The ``n`` highest scores, ties by item id (deterministic)."""
    if len(scores) <= n:
        return dict(scores)
    # One sort on a C-level key (the score), then ties put in id order by hand: a Python
    # key tuple per item cost several times more, and ties are rare among float scores.
    ranked = sorted(scores.items(), key=itemgetter(1), reverse=True)
    end = n
    while end < len(ranked) and ranked[end][1] == ranked[n - 1][1]:
        end += 1  # a tie across the cut: the ids decide who stays
    top = ranked[:end]
    order_ties(top, [score for _, score in top], itemgetter(0))
    return dict(top[:n])


def order_ties(ranked: list[T], values: Sequence[float], tie_key: Callable[[T], Any]) -> None:
    """Put each run of equal ``values`` in ``ranked`` (already sorted by ``values``,
    descending) in ``tie_key`` order, in place: the second half of a sort on a C-level
    key, for the ties among float scores."""
    if len(set(values)) == len(values):
        return  # no two equal: nothing to reorder (one C-level pass, not a loop in Python)
    # The runs found in numpy: item-to-item's summed similarities tie often (MovieLens:
    # in almost every request), and a Python loop over every position cost more than the
    # source's own arithmetic. Only the runs of two or more are visited in Python.
    starts = run_starts(np.asarray(values))
    stops = np.append(starts[1:], len(values))
    runs = stops - starts > 1
    for start, stop in zip(starts[runs].tolist(), stops[runs].tolist(), strict=True):
        ranked[start:stop] = sorted(ranked[start:stop], key=tie_key)


def run_starts(ordered: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.intp]]:
    """Where each run of equal values of ``ordered`` (sorted) starts. (``np.r_[True,
    a[1:] != a[:-1]]`` says the same; its index trick cost ~10-45 µs a call.)"""
    starts = np.empty(len(ordered), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    return np.flatnonzero(starts)


def _keep(scores: dict[str, float], restrict: Collection[str] | None, n: int) -> dict[str, float]:
    if restrict is not None:
        return {i: s for i, s in scores.items() if i in restrict}
    return best(scores, n)


def _kept_rows(
    out: SourceOutput,
    rows: Sequence[tuple[str, float]],
    restrict: Collection[str] | None,
    n: int,
    interner: Interner,
    factor: float = 1.0,
) -> None:
    """``out``'s scores: `_keep` of a list's rows, each score times ``factor``. A live
    list's cut is made once per read (and factor) and shared by the requests until the
    next (popularity and trending rebuilt the same dict of 200 every request), with its
    coded twin for the shortlist."""
    if restrict is not None or not isinstance(rows, Rows):
        out.scores = _scaled(_keep(dict(rows), restrict, n), factor)
        return
    if rows.best is None or rows.best[0] != (n, factor):
        rows.best = ((n, factor), _scaled(_keep(dict(rows), None, n), factor), None)
    _, scores, table = rows.best
    if table is None or table.interner is not interner:
        table = Table(
            interner,
            interner.encode(list(scores)),
            np.fromiter(scores.values(), np.float64, len(scores)),
        )
        rows.best = ((n, factor), scores, table)
    out.scores = scores
    out.table = table


def _scaled(scores: dict[str, float], factor: float) -> dict[str, float]:
    return scores if factor == 1.0 else {item: s * factor for item, s in scores.items()}


class Sources:
    """The candidate sources of one process, with their in-process caches."""

    def __init__(
        self,
        redis: aioredis.Redis,
        item_cache_ttl_s: float,
        reads: Reads | None = None,
        live_ttl_s: float = LIVE_TTL_S,
        decay: ForwardDecay = DEFAULT_DECAY,
    ) -> None:
        self.redis = redis
        self.decay = decay
        """The agents' forward decay: the live popularity lists' scale, brought to
        training's (the published lists', the learned ranker's) at the request's time."""
        self.reads: Reads = set() if reads is None else reads
        """The detached reads running (`serving.pipeline.detach`), ended on close."""
        # A published version's rows never change (training writes them once), so they
        # are kept as long as the version may serve; the TTL only bounds memory.
        self._row_ttl_s = max(item_cache_ttl_s, NEIGHBOUR_TTL_S)
        self._vocabularies: dict[tuple[str, str], Vocabulary] = {}
        self._interner = Interner()
        self.lists = LiveLists(redis, self.reads, ttl=live_ttl_s)
        self.category_lists: TTLCache[tuple[str, str, str], list[tuple[str, float]]] = TTLCache(
            item_cache_ttl_s, size=10_000
        )

    @property
    def interner(self) -> Interner:
        """The process's numbering of item ids (for the live lists' arrays); a full one
        is replaced by an empty one."""
        if self._interner.full:
            self._interner = Interner()
        return self._interner

    @staticmethod
    def table(rows: Sequence[tuple[str, float]], interner: Interner) -> Table:
        """A live list (unique members, best first) as arrays by ``interner``, kept with
        the list."""
        cached = rows.table if isinstance(rows, Rows) else None
        if cached is not None and cached.interner is interner:
            return cached
        table = Table(
            interner,
            interner.encode([member for member, _ in rows]),
            np.fromiter((score for _, score in rows), np.float64, len(rows)),
        )
        if isinstance(rows, Rows):
            rows.table = table
        return table

    # --- live sorted sets written by the agents (serving/pipeline/live.py) -------------
    def zsets_now(self, keys: Sequence[str], n: int) -> list[Rows] | None:
        """Top ``n`` of each sorted set from memory; None when one must be read."""
        return self.lists.now(keys, n)

    async def zsets(self, keys: Sequence[str], n: int) -> list[Rows]:
        """Top ``n`` of each sorted set, the ones not in memory read in one round trip."""
        return await self.lists.get(keys, n)

    # --- recently viewed ----------------------------------------------------------------
    @staticmethod
    def repeat(history: Sequence[str], model: Published | None) -> SourceOutput:
        params = model.params if model is not None else {}
        decay = float(params.get("decay", 0.8))
        history_len = int(params.get("history_len", 50))
        last_weight = float(params.get("last_weight", 1.0))
        recent = list(history[-history_len:]) if history_len > 0 else []
        # decay**age, oldest first: the same powers and sums as before, the powers
        # computed once per age (a server samples ~5 % of its time here otherwise)
        powers = _powers(decay, len(recent))
        scores: dict[str, float] = {}
        get = scores.get
        for item, power in zip(recent, reversed(powers), strict=True):
            scores[item] = get(item, 0.0) + power
        if recent:
            scores[recent[-1]] *= last_weight
        return SourceOutput("recently_viewed", scores, origin="window")

    # --- item-to-item -------------------------------------------------------------------
    @staticmethod
    def _item2item_recent(history: Sequence[str], model: Published | None) -> list[str]:
        # a just-promoted version's params load in the background: meanwhile the previous
        # version's are closer than the defaults
        history_len = int(model.param("history_len", 10)) if model is not None else 10
        return list(history[-history_len:]) if history_len > 0 else []

    async def item2item(
        self,
        namespace: str,
        history: Sequence[str],
        version: str | None,
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
    ) -> SourceOutput:
        if version is None or not history:
            return SourceOutput("item2item", origin=f"published:{version}")
        recent = self._item2item_recent(history, model)
        rows = await self.neighbour_rows(namespace, version, recent)
        return self._item2item(namespace, version, recent, rows, model, restrict, n)

    def item2item_now(
        self,
        namespace: str,
        history: Sequence[str],
        version: str | None,
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
    ) -> SourceOutput | None:
        """`item2item` from the cached rows alone; None when a row must be read."""
        if version is None or not history:
            return SourceOutput("item2item", origin=f"published:{version}")
        recent = self._item2item_recent(history, model)
        rows = self.cached_rows(namespace, version, recent)
        if rows is None:
            return None
        return self._item2item(namespace, version, recent, rows, model, restrict, n)

    def _item2item(
        self,
        namespace: str,
        version: str,
        recent: list[str],
        rows: Mapping[str, NeighbourRow],
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
    ) -> SourceOutput:
        out = SourceOutput("item2item", origin=f"published:{version}")
        recency = bool(model.param("recency", True)) if model is not None else True
        vocab = self.vocabulary(namespace, version)
        used: list[NeighbourRow] = []
        weights: list[float] = []
        sources: list[int] = []
        for position, item in enumerate(recent):
            row = rows.get(item)
            if row is None or not len(row.codes):
                continue
            used.append(row)
            weights.append((position + 1) / len(recent) if recency else 1.0)
            sources.append(position)
        if not used:
            return out
        # One concatenation per array and one multiply, not three numpy calls per row:
        # the same products (each similarity times its row's weight, in float64).
        lengths = [len(row.codes) for row in used]
        code = np.concatenate([row.codes for row in used])
        contribution = np.array(weights).repeat(lengths) * np.concatenate(
            [row.sims for row in used]
        )
        # Summed in array order from 0.0 (serving/pipeline/kernels.py): the very sums, and
        # floats, the offline loop `scores[i] = scores.get(i, 0.0) + w * sim` gives,
        # history oldest first. With no restriction, the best n (ties across the cut all
        # there, by sum then id; the runs of ids the kernel's id order does not cover yet
        # ordered here); else every one, in the order of its first contribution, as the
        # dict the plain loop builds.
        found, sums, runs = neighbour_sums(
            code, contribution, vocab.slots(), n, restrict is None, vocab.order.of(vocab.ids)
        )
        ids = vocab.ids
        if restrict is None and not len(runs):
            # (no tie left to order by id: the kernel's arrays as they are, no lists)
            kept_codes, kept_sums = found[:n], sums[:n]
        else:
            kept = found.tolist()
            scores = sums.tolist()
            if restrict is None:
                for start, stop in runs.tolist():
                    kept[start:stop] = sorted(kept[start:stop], key=ids.__getitem__)
                kept, scores = kept[:n], scores[:n]
            else:
                allowed = [i for i, c in enumerate(kept) if ids[c] in restrict]
                kept = [kept[i] for i in allowed]
                scores = [scores[i] for i in allowed]
            kept_codes = np.array(kept, dtype=np.int64)
            kept_sums = np.array(scores, dtype=np.float64)
        if not len(kept_codes):
            return out
        # handed over coded: the shortlist keeps a few of these 200, only those decoded
        interner = self.interner
        out.table = Table(interner, vocab.interned(interner)[kept_codes], kept_sums)

        def because(items: Collection[str]) -> dict[str, str]:
            # for each item, the history item that contributed most (the first such one
            # on ties, as the loop's strict `>` kept), over those items' contributions
            known = vocab.code
            scored = set(kept_codes.tolist())
            asked = [known[i] for i in items if i in known and known[i] in scored]
            if not asked:
                return {}
            contributor = np.array(sources, dtype=np.int64).repeat(lengths)
            by = strongest(
                code, contribution, contributor, np.array(asked, np.int64), vocab.slots()
            )
            return {ids[c]: recent[s] for c, s in zip(asked, by.tolist(), strict=True)}

        out.because_of = because
        return out

    def vocabulary(self, namespace: str, version: str) -> Vocabulary:
        """The numbering of one published item2item version's ids, with its cached rows."""
        key = (namespace, version)
        vocab = self._vocabularies.get(key)
        if vocab is None:
            vocab = self._vocabularies[key] = Vocabulary(self._row_ttl_s)
            while len(self._vocabularies) > MAX_VERSIONS:
                # the oldest version's, its rows with it (they are numbered by it)
                del self._vocabularies[next(iter(self._vocabularies))]
        return vocab

    def cached_rows(
        self, namespace: str, version: str, items: Sequence[str]
    ) -> dict[str, NeighbourRow] | None:
        """Each item's cached ``nbr:{item}`` row of ``version``; None when one is not."""
        return self.vocabulary(namespace, version).rows.get_all(items)

    async def neighbour_rows(
        self, namespace: str, version: str, items: Sequence[str]
    ) -> dict[str, NeighbourRow]:
        """``nbr:{item}`` of each item, numbered by ``version``'s `Vocabulary` and cached
        with it; the uncached ones are read in one call through the pointer (so never
        from a version being deleted)."""
        vocab = self.vocabulary(namespace, version)
        rows: dict[str, NeighbourRow] = {}
        missing = []
        for item in dict.fromkeys(items):
            cached = vocab.rows.get(item)
            if cached is None:
                missing.append(item)
            else:
                rows[item] = cached
        if missing:
            found = await detached(
                read_current_many(
                    self.redis, Keys(namespace), "item2item", [f"nbr:{i}" for i in missing]
                ),
                self.reads,
            )
            if found is not None:
                for item in missing:
                    record = found[f"nbr:{item}"]
                    pairs = record.value if isinstance(record.value, list) else []
                    row = NeighbourRow(
                        vocab.encode([member for member, _ in pairs]),
                        np.fromiter((score for _, score in pairs), np.float64, len(pairs)),
                    )
                    rows[item] = row
                    # the pointer moved since the state read: serve the row, cache nothing
                    if record.version == version:
                        vocab.rows.put(item, row)
        return rows

    # --- session kNN --------------------------------------------------------------------
    @staticmethod
    def sknn(
        history: Sequence[str], model: Published | None, restrict: Collection[str] | None, n: int
    ) -> SourceOutput:
        out = SourceOutput("sknn", origin=f"published:{model.version if model else None}")
        if model is None or model.index is None or not history:
            return out
        lookup = model.lookup
        query = np.array([lookup[i] for i in history if i in lookup], dtype=np.int32)
        scores = knn_scores(
            model.index,
            query,
            k=int(model.param("k", 100)),
            last_n=int(model.param("last_n", 10)),
            normalize=bool(model.param("normalize", False)),
            idf_weight=float(model.param("idf_weight", 0.0)),
        )
        out.scores = _pick(scores, model.item_ids, lookup, restrict, n)
        return out

    # --- ALS fold-in --------------------------------------------------------------------
    @staticmethod
    def als(
        history: Sequence[str],
        embedding: Mapping[str, bytes],
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
    ) -> SourceOutput:
        out = SourceOutput("als", origin=f"published:{model.version if model else None}")
        if model is None or model.factors is None or model.yty is None:
            return out
        history_len = int(model.param("history_len", 50))
        known = [model.lookup[i] for i in history if i in model.lookup]
        recent = np.array(known[-history_len:] if history_len > 0 else [], dtype=np.int32)
        if recent.size:
            alpha = float(model.param("alpha", 1.0))
            vector = fold_in(
                model.factors,
                recent,
                np.full(recent.size, alpha),
                float(model.param("regularization", 0.1)),
                model.yty,
            )
            out.origin += ",window"
        elif embedding.get("v") == model.version.encode() and "x" in embedding:
            # No known item in the window (e.g. it expired): the agents' live embedding,
            # a decayed mean of the touched items' factors, from this very version.
            vector = np.frombuffer(embedding["x"], dtype="<f4").astype(np.float64)
            out.origin += ",embedding"
            if vector.shape[0] != model.factors.shape[1]:
                return out
        else:
            return out
        if not vector.any():
            return out
        scores = model.factors @ vector
        out.scores = _pick(scores, model.item_ids, model.lookup, restrict, n)
        return out

    # --- popularity and trending ----------------------------------------------------------
    @staticmethod
    def _popular_keys(namespace: str) -> list[str]:
        keys = Keys(namespace)
        return [keys.popularity_decayed, keys.popularity]

    async def popular(
        self,
        namespace: str,
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
        clock: float,
    ) -> SourceOutput:
        """The live decayed popularity at ``clock`` (the request's time), else the live
        counts, else the published list."""
        lists = await self.zsets(self._popular_keys(namespace), n)
        return self._popular(lists, model, restrict, n, clock)

    def popular_now(
        self,
        namespace: str,
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
        clock: float,
    ) -> SourceOutput | None:
        lists = self.zsets_now(self._popular_keys(namespace), n)
        return None if lists is None else self._popular(lists, model, restrict, n, clock)

    def _popular(
        self,
        lists: Sequence[list[tuple[str, float]]],
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
        clock: float,
    ) -> SourceOutput:
        decayed, counted = lists
        out = SourceOutput("popularity")
        if decayed:
            # on training's scale: the learned ranker splits on this score
            out.origin = "live:pop:decayed"
            _kept_rows(out, decayed, restrict, n, self.interner, self.decay.factor(clock))
            return out
        if counted:
            out.origin, rows = "live:pop", counted
        elif model is not None and model.top:
            out.origin, rows = f"published:{model.version}", model.top
        else:
            return out
        _kept_rows(out, rows, restrict, n, self.interner)
        return out

    async def trending(
        self,
        namespace: str,
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
        window: str | None = None,
        category: str | None = None,
    ) -> SourceOutput:
        order = self._trend_windows(model, window)
        lists = await self.zsets([Keys(namespace).trending(w, category) for w in order], n)
        return self._trending(order, lists, model, restrict, n, category)

    def trending_now(
        self,
        namespace: str,
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
    ) -> SourceOutput | None:
        """`trending` (overall, the tuned window) from the cache alone; None when a list
        must be read."""
        order = self._trend_windows(model, None)
        lists = self.zsets_now([Keys(namespace).trending(w, None) for w in order], n)
        return None if lists is None else self._trending(order, lists, model, restrict, n, None)

    @staticmethod
    def _trend_windows(model: Published | None, window: str | None) -> list[str]:
        if window is None:
            # the agents' window closest to the one training tuned (default 24 h)
            span = float(model.param("window_s", 86400.0)) if model is not None else 86400.0
            window = "1h" if span <= 3600 else "24h"
        return [window, "24h" if window == "1h" else "1h"]

    def _trending(
        self,
        order: Sequence[str],
        lists: Sequence[list[tuple[str, float]]],
        model: Published | None,
        restrict: Collection[str] | None,
        n: int,
        category: str | None,
    ) -> SourceOutput:
        out = SourceOutput("trending")
        for name, rows in zip(order, lists, strict=True):
            if rows:
                out.origin = f"live:trend:{name}"
                _kept_rows(out, rows, restrict, n, self.interner)
                return out
        if category is None and model is not None and model.top:
            out.origin = f"published:{model.version}"
            _kept_rows(out, model.top, restrict, n, self.interner)
        return out

    # --- category popularity --------------------------------------------------------------
    @staticmethod
    def affinity_items(history: Sequence[str], model: Published | None) -> list[str]:
        """The history items `affinities` reads (the model's ``history_len`` newest): the
        only ones whose categories a request needs from the catalog."""
        history_len = int(model.param("history_len", 20)) if model is not None else 20
        return list(history[-history_len:]) if history_len > 0 else []

    @staticmethod
    def affinities(
        history: Sequence[str],
        categories: Mapping[str, str],
        features: Mapping[str, str],
        model: Published | None,
        now: float,
    ) -> dict[str, float]:
        """affinity(c) as training's CategoryPopularity computes it from the history and
        the catalog; else the feature hash's decayed ``a:cat:*`` affinities."""
        decay = float(model.param("decay", 0.8)) if model is not None else 0.8
        recent = Sources.affinity_items(history, model)
        affinity: dict[str, float] = {}
        for position, item in enumerate(recent):
            category = categories.get(item)
            if category is not None:
                age = len(recent) - 1 - position
                affinity[category] = affinity.get(category, 0.0) + decay**age
        if affinity:
            return affinity
        for name, value in features.items():
            if not name.startswith("a:cat:"):
                continue
            score, _, ts = value.partition("@")
            try:
                decayed = float(score) * 2 ** (-(now - float(ts or now)) / AFFINITY_HALF_LIFE_S)
            except ValueError:
                continue
            if decayed > 0:
                affinity[name[len("a:cat:") :]] = decayed
        return affinity

    async def category_popularity(
        self,
        namespace: str,
        affinity: Mapping[str, float],
        popularity: Published | None,
        restrict: Collection[str] | None,
        n: int,
        clock: float,
    ) -> SourceOutput:
        """Category popularity, the live lists at ``clock`` (the request's time)."""
        chosen = sorted(affinity, key=lambda c: (-affinity[c], c))[:MAX_CATEGORIES]
        if not chosen:
            return SourceOutput("category_popularity")
        keys = Keys(namespace)
        live = await self.zsets([keys.popularity_category(c) for c in chosen], n)
        lists, missing = _listed(chosen, live, popularity)
        live_count = len(lists)
        if missing and popularity is not None:
            lists.update(await self._published_category_lists(namespace, popularity, missing, n))
        return self._category_scores(
            affinity, lists, live_count, clock, bool(missing), popularity, restrict, n
        )

    def category_popularity_now(
        self,
        namespace: str,
        affinity: Mapping[str, float],
        popularity: Published | None,
        restrict: Collection[str] | None,
        n: int,
        clock: float,
    ) -> SourceOutput | None:
        """`category_popularity` from the cached lists alone; None when one must be read."""
        chosen = sorted(affinity, key=lambda c: (-affinity[c], c))[:MAX_CATEGORIES]
        if not chosen:
            return SourceOutput("category_popularity")
        keys = Keys(namespace)
        live = self.zsets_now([keys.popularity_category(c) for c in chosen], n)
        if live is None:
            return None
        lists, missing = _listed(chosen, live, popularity)
        live_count = len(lists)
        if missing and popularity is not None:
            published, unread = self._cached_category_lists(namespace, popularity, missing)
            if unread:
                return None
            lists.update(published)
        return self._category_scores(
            affinity, lists, live_count, clock, bool(missing), popularity, restrict, n
        )

    def _cached_category_lists(
        self, namespace: str, popularity: Published, categories: Sequence[str]
    ) -> tuple[dict[str, list[tuple[str, float]]], list[str]]:
        """The published ``top:cat:{c}`` lists cached (the empty ones left out), and the
        categories whose list is not."""
        lists: dict[str, list[tuple[str, float]]] = {}
        missing = []
        for category in categories:
            cached = self.category_lists.get((namespace, popularity.version, category))
            if cached is None:
                missing.append(category)
            elif cached:
                lists[category] = cached
        return lists, missing

    async def _published_category_lists(
        self, namespace: str, popularity: Published, categories: Sequence[str], n: int
    ) -> dict[str, list[tuple[str, float]]]:
        lists, missing = self._cached_category_lists(namespace, popularity, categories)
        if missing:
            found = await detached(
                read_current_many(
                    self.redis,
                    Keys(namespace),
                    "popularity",
                    [f"top:cat:{c}" for c in missing],
                    limit=n,
                ),
                self.reads,
            )
            if found is not None:
                for category in missing:
                    record = found[f"top:cat:{category}"]
                    rows = record.value if isinstance(record.value, list) else []
                    if rows:
                        lists[category] = rows
                    self.category_lists.put((namespace, record.version, category), rows)
        return lists

    def _category_scores(
        self,
        affinity: Mapping[str, float],
        lists: Mapping[str, list[tuple[str, float]]],
        live_count: int,
        clock: float,
        published: bool,
        popularity: Published | None,
        restrict: Collection[str] | None,
        n: int,
    ) -> SourceOutput:
        """``lists``: the first ``live_count`` the agents' (forward-decayed, brought to
        training's scale at ``clock``), the rest published."""
        out = SourceOutput("category_popularity")
        if not lists:
            return out
        out.origin = "live+published" if published else "live"
        factor = self.decay.factor(clock) if live_count else 1.0
        scale = [factor] * live_count + [1.0] * (len(lists) - live_count)
        # training's share: count / (max count + 1), the max over every item
        top = max(
            [s * f for rows, f in zip(lists.values(), scale, strict=True) for _, s in rows[:1]]
            + ([popularity.top[0][1]] if popularity is not None and popularity.top else [])
        )
        # Up to five lists of 200 were a loop of ~1,000 dictionary updates a request, then
        # a dozen numpy calls; now one compiled loop (serving/pipeline/kernels.py). The
        # same floats (the same three operations per pair) and the same choice: each
        # item's best score, the first list's on ties (the loop's strict `>`), items in
        # order of first sight, then `_keep`: those of ``restrict``, else `best`'s cut
        # (highest, ties by id). One numbering for every list of the call (a full one is
        # replaced at the next call).
        interner = self.interner
        names = tuple(lists)
        tables = [self.table(rows, interner) for rows in lists.values()]
        lengths = [len(t) for t in tables]
        codes = np.concatenate([t.codes for t in tables])
        counts = np.concatenate(
            [t.values if f == 1.0 else t.values * f for t, f in zip(tables, scale, strict=True)]
        )
        affinities = np.array([affinity[c] for c in names]).repeat(lengths)
        scored = affinities * (1.0 + counts / (top + 1.0))
        found, runs = best_entries(
            codes, scored, interner.scratch(), n, restrict is None, interner.order.of(interner.ids)
        )
        ids = interner.ids
        entries = found.tolist()
        if restrict is not None:
            entries = [
                e for e, c in zip(entries, codes[found].tolist(), strict=True) if ids[c] in restrict
            ]
        else:
            code_of = codes.tolist() if len(runs) else []
            for start, stop in runs.tolist():
                entries[start:stop] = sorted(entries[start:stop], key=lambda e: ids[code_of[e]])
            entries = entries[:n]
        chosen = np.array(entries, dtype=np.intp)
        group = np.arange(len(names)).repeat(lengths)
        # handed over coded: the shortlist keeps a few of these 200, only those decoded
        out.table = Table(interner, codes[chosen], scored[chosen])
        out.groups = (names, group[chosen])
        return out


def _listed(
    chosen: Sequence[str],
    live: Sequence[list[tuple[str, float]]],
    popularity: Published | None,
) -> tuple[dict[str, list[tuple[str, float]]], list[str]]:
    """The chosen categories' live lists, and those with none that the published
    popularity may list instead."""
    lists: dict[str, list[tuple[str, float]]] = {}
    missing = []
    for category, rows in zip(chosen, live, strict=True):
        if rows:
            lists[category] = rows
        elif popularity is not None:
            missing.append(category)
    return lists, missing


def _pick(
    scores: np.ndarray[Any, Any],
    item_ids: Sequence[str],
    lookup: Mapping[str, int],
    restrict: Collection[str] | None,
    n: int,
) -> dict[str, float]:
    """Finite scores as {item: score}: the top ``n``, or those of ``restrict``."""
    if restrict is not None:
        return {
            item: float(scores[lookup[item]])
            for item in restrict
            if item in lookup and np.isfinite(scores[lookup[item]])
        }
    return {item_ids[i]: float(scores[i]) for i in top_k(scores, n)}
