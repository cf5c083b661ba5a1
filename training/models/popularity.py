"""Popularity with time decay, globally and per category: the fallback of every request.

score(i) = Σ over i's interactions e of  weight(e) · 2^(-(T - t_e) / half_life)

where T is the newest timestamp of the training log. With ``half_life_days=None`` it is
the plain weighted count. The per-category lists rank the items of one category the same
way (an item's category is its first one in the catalog).

Redis records (under ``rs:{ns}:model:popularity:{version}:``):

- ``top``: ZSET item → score, the ``top_n`` best items;
- ``top:cat:{category}``: ZSET item → score, the ``per_category_n`` best of a category;
- ``params``: HASH of the hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.common import ItemScorer, top_k, zset_of

__all__ = ["CategoryPopularity", "Popularity"]

DAY = 86400.0


class Popularity(ItemScorer):
    """Time-decayed weighted counts; `recommend` ignores the history."""

    name: ClassVar[str] = "popularity"

    def __init__(
        self,
        *,
        half_life_days: float | None = 30.0,
        top_n: int = 1000,
        per_category_n: int = 200,
    ) -> None:
        super().__init__(half_life_days=half_life_days, top_n=top_n, per_category_n=per_category_n)
        self.half_life_days = half_life_days
        self.top_n = top_n
        self.per_category_n = per_category_n
        self.counts: FloatArray = np.zeros(0)
        self.categories: IntArray = np.zeros(0, np.int32)
        self.category_ids: npt.NDArray[np.object_] = np.zeros(0, dtype=object)

    def _fit(self, log: InteractionLog) -> None:
        # negative feedback lowers no count (the live agents do the same)
        weights = np.maximum(log.weights, 0).astype(np.float64)
        if self.half_life_days is not None:
            age = float(log.timestamps.max()) - log.timestamps
            weights = weights * np.exp2(-age / (self.half_life_days * DAY))
        self.counts = np.bincount(log.items, weights=weights, minlength=log.n_items).astype(
            np.float64
        )
        self.categories = log.category_of()
        self.category_ids = log.category_ids

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        return np.where(self.counts > 0, self.counts, -np.inf)

    def category_scores(self, category: str) -> FloatArray:
        """Scores restricted to one category (``-inf`` elsewhere)."""
        self._check_fitted()
        matches = np.flatnonzero(self.category_ids == category)
        scores = self.score_items(np.zeros(0, np.int32))
        if matches.size == 0:
            return np.full_like(scores, -np.inf)
        return np.where(self.categories == matches[0], scores, -np.inf)

    def recommend_category(self, category: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` most popular items of ``category`` (empty for an unknown category)."""
        scores = self.category_scores(category)
        return [(str(self.item_ids[i]), float(scores[i])) for i in top_k(scores, k)]

    def redis_records(self) -> Iterator[RedisRecord]:
        self._check_fitted()
        scores = self.score_items(np.zeros(0, np.int32))
        yield RedisRecord("top", "zset", zset_of(self.item_ids, scores, self.top_n))
        for code, category in enumerate(self.category_ids):
            masked = np.where(self.categories == code, scores, -np.inf)
            top = zset_of(self.item_ids, masked, self.per_category_n)
            if top:
                yield RedisRecord(f"top:cat:{category}", "zset", top)
        yield self.params_record()

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        return {
            "counts": self.counts,
            "categories": self.categories,
            "category_ids": np.asarray([str(c) for c in self.category_ids], dtype=str),
        }

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        self.counts = state["counts"]
        self.categories = state["categories"]
        ids = np.empty(len(state["category_ids"]), dtype=object)
        ids[:] = [str(c) for c in state["category_ids"]]
        self.category_ids = ids


class CategoryPopularity(ItemScorer):
    """Popularity within the categories of the user's recent items.

    affinity(c) = Σ over the last ``history_len`` history items h of ``decay ** age(h)``
    where h's category is c (age 0 = the newest), and

        score(i) = affinity(category(i)) x (1 + count(i) / (max count + 1))

    so items of the categories the user is browsing rank first, the more recent and
    frequent the category the higher, and within a category by plain count. Candidates are
    the items seen in training and the history's own items, of the history's categories.
    Serving needs only the ``top:cat:{category}`` lists of `Popularity` and the live window.
    """

    name: ClassVar[str] = "category_popularity"

    def __init__(self, *, decay: float = 0.8, history_len: int = 20) -> None:
        super().__init__(decay=decay, history_len=history_len)
        self.decay = decay
        self.history_len = history_len
        self.share: FloatArray = np.zeros(0)
        self.categories: IntArray = np.zeros(0, np.int32)

    def _fit(self, log: InteractionLog) -> None:
        counts = np.bincount(log.items, weights=np.maximum(log.weights, 0), minlength=log.n_items)
        self.share = counts.astype(np.float64) / (float(counts.max()) + 1.0)
        self.categories = log.category_of()

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        recent = history[-self.history_len :] if self.history_len > 0 else history[:0]
        cats = self.categories[recent] if recent.size else np.zeros(0, np.int32)
        keep = cats >= 0
        if not keep.any():
            return np.full(self.n_items, -np.inf)
        ages = np.arange(recent.size - 1, -1, -1, dtype=np.float64)[keep]
        n_cats = int(self.categories.max()) + 1
        affinity = np.bincount(cats[keep], weights=self.decay**ages, minlength=n_cats)
        item_affinity = np.where(self.categories >= 0, affinity[self.categories], 0.0)
        scores = item_affinity * (1.0 + self.share)
        # candidates: items seen in training, and the history's own items
        known = self.share > 0
        known[recent] = True
        return np.where((item_affinity > 0) & known, scores, -np.inf)

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        return {"share": self.share, "categories": self.categories}

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        self.share, self.categories = state["share"], state["categories"]
