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

__all__ = ["Popularity"]

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
        weights = log.weights.astype(np.float64)
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
