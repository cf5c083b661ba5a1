"""User segmentation (Personalize's USER_SEGMENTATION), batch: for an item, or an item
attribute such as a category, the users most likely to interact with it.

It fits the same ALS as `training.models.als` and scores users against an item's factor
vector, or against the mean factor vector of an attribute's items (the average affinity
to that attribute): a category from the log, or any attribute given as its items
(`users_for_items`, e.g. the catalog's items of one brand). `write_segments` writes the
answers to a JSON-lines file, one line per query::

    {"query": {"item_id": "42"}, "users": [{"user_id": "7", "score": 0.91}, ...]}
    {"query": {"category": "shoes"}, "users": [...]}
    {"query": {"attribute": "brand=acme"}, "users": [...]}

Saving a fitted model also writes ``segments.jsonl`` for every category beside it, so each
published version carries its segments file in S3. Redis records: ``seg:cat:{category}``
(ZSET user → score, the ``top_users`` best users of each category) and ``params``;
`recommend` is ALS's (items for a user).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.als import ALS
from training.models.common import top_k, zset_of

__all__ = ["UserSegmentation"]


class UserSegmentation(ALS):
    """Users most likely to interact with an item or with an item attribute."""

    name: ClassVar[str] = "segmentation"

    def __init__(self, *, top_users: int = 100, **als: Any) -> None:
        super().__init__(**als)
        self._params["top_users"] = top_users
        self.top_users = top_users
        self.categories: IntArray = np.zeros(0, np.int32)
        self.category_ids: npt.NDArray[np.object_] = np.zeros(0, dtype=object)

    def _fit(self, log: InteractionLog) -> None:
        super()._fit(log)
        self.categories = log.category_of()
        self.category_ids = log.category_ids

    def user_scores(self, vector: FloatArray) -> FloatArray:
        return self.user_factors.astype(np.float64) @ vector

    def users_for_item(self, item_id: str, n: int | None = None) -> list[tuple[str, float]]:
        """The ``n`` users most likely to interact with ``item_id`` (empty if unknown)."""
        self._check_fitted()
        codes = self.codes([item_id])
        if not codes.size or not self.seen[codes[0]]:
            return []
        scores = self.user_scores(self.item_factors[codes[0]].astype(np.float64))
        return self._top_users(scores, n)

    def users_for_category(self, category: str, n: int | None = None) -> list[tuple[str, float]]:
        """The ``n`` users most likely to interact with items of ``category``."""
        vector = self._category_vector(category)
        return [] if vector is None else self._top_users(self.user_scores(vector), n)

    def users_for_items(self, items: list[str], n: int | None = None) -> list[tuple[str, float]]:
        """The users most likely to interact with a set of items: any attribute value
        (a brand, a price band) given as the catalog's items that have it."""
        self._check_fitted()
        codes = self.codes(items)
        codes = codes[self.seen[codes]] if codes.size else codes
        if not codes.size:
            return []
        vector = np.asarray(self.item_factors[codes].astype(np.float64).mean(axis=0))
        return self._top_users(self.user_scores(vector), n)

    def _category_vector(self, category: str) -> FloatArray | None:
        self._check_fitted()
        match = np.flatnonzero(self.category_ids == category)
        if match.size == 0:
            return None
        members = np.flatnonzero((self.categories == match[0]) & self.seen)
        if members.size == 0:
            return None
        return np.asarray(self.item_factors[members].astype(np.float64).mean(axis=0))

    def _top_users(self, scores: FloatArray, n: int | None) -> list[tuple[str, float]]:
        return [
            (str(self.user_ids[u]), float(scores[u])) for u in top_k(scores, n or self.top_users)
        ]

    def write_segments(
        self,
        path: Path,
        *,
        items: Iterable[str] = (),
        categories: Iterable[str] = (),
        attributes: Mapping[str, list[str]] | None = None,
        n: int | None = None,
    ) -> int:
        """Write one JSON line per queried item, category and attribute (name → the items
        that have it, e.g. ``{"brand=acme": [...]}``); returns the lines written."""
        lines = 0
        with path.open("w", encoding="utf-8") as out:
            queries: list[tuple[dict[str, str], list[tuple[str, float]]]] = []
            queries += [({"item_id": i}, self.users_for_item(i, n)) for i in items]
            queries += [({"category": c}, self.users_for_category(c, n)) for c in categories]
            queries += [
                ({"attribute": name}, self.users_for_items(members, n))
                for name, members in (attributes or {}).items()
            ]
            for query, users in queries:
                record = {"query": query, "users": [{"user_id": u, "score": s} for u, s in users]}
                out.write(json.dumps(record) + "\n")
                lines += 1
        return lines

    def save(self, directory: Path) -> None:
        """The model, plus ``segments.jsonl``: the top users of every category (the batch
        output, uploaded with the version's files)."""
        super().save(directory)
        self.write_segments(directory / "segments.jsonl", categories=self.category_ids.tolist())

    def redis_records(self) -> Iterator[RedisRecord]:
        self._check_fitted()
        for category in self.category_ids:
            vector = self._category_vector(str(category))
            if vector is not None:
                scores = self.user_scores(vector)
                yield RedisRecord(
                    f"seg:cat:{category}", "zset", zset_of(self.user_ids, scores, self.top_users)
                )
        yield self.params_record()

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        return {
            **super()._state(),
            "categories": self.categories,
            "category_ids": np.asarray([str(c) for c in self.category_ids], dtype=str),
        }

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        super()._restore(state)
        self.categories = state["categories"]
        ids = np.empty(len(state["category_ids"]), dtype=object)
        ids[:] = [str(c) for c in state["category_ids"]]
        self.category_ids = ids
