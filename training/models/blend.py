"""A tuned linear blend of the candidate models: the baseline the final ranker builds on.

    blend(i) = Σ_c weight_c · s_c(i) / max_j |s_c(j)|

over the components c (by default recently viewed, item-to-item, session kNN, ALS and
popularity), each component's scores scaled by its largest magnitude for this request,
and a component's non-candidates contributing 0. An item no component scores is not a
candidate. The weights are tuned on a validation split (`training.tuning.tune_blend`).

Redis records: only ``weights`` (HASH component → weight) and ``params``; serving
combines the components' own published records with these weights, so a blend never
duplicates their data. The saved files hold every component, for offline use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from recstream.errors import ConfigurationError
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.als import ALS
from training.models.common import ItemScorer
from training.models.item2item import ItemToItem
from training.models.popularity import CategoryPopularity, Popularity
from training.models.repeat import RecentlyViewed
from training.models.sknn import SessionKNN
from training.models.trending import Trending

__all__ = ["COMPONENTS", "DEFAULT_WEIGHTS", "Blend", "normalised"]

COMPONENTS: dict[str, type[ItemScorer]] = {
    cls.name: cls
    for cls in (
        RecentlyViewed,
        ItemToItem,
        SessionKNN,
        ALS,
        Popularity,
        Trending,
        CategoryPopularity,
    )
}
DEFAULT_WEIGHTS: dict[str, float] = {
    "recently_viewed": 1.0,
    "item2item": 1.0,
    "sknn": 1.0,
    "als": 0.5,
    "popularity": 0.1,
}


def normalised(scores: FloatArray) -> FloatArray:
    """Scores / their largest finite magnitude; non-candidates → NaN."""
    finite = np.isfinite(scores)
    out = np.full(scores.shape, np.nan)
    if finite.any():
        scale = np.abs(scores[finite]).max()
        out[finite] = scores[finite] / (scale if scale > 0 else 1.0)
    return out


def combine(parts: Mapping[str, FloatArray], weights: Mapping[str, float]) -> FloatArray:
    """The blend of normalised component scores (NaN = not a candidate)."""
    total: FloatArray | None = None
    any_candidate: np.ndarray[Any, np.dtype[np.bool_]] | None = None
    for name, part in parts.items():
        weight = weights.get(name, 0.0)
        if weight == 0:
            continue
        present = ~np.isnan(part)
        contribution = np.where(present, part * weight, 0.0)
        total = contribution if total is None else total + contribution
        any_candidate = present if any_candidate is None else any_candidate | present
    if total is None or any_candidate is None:
        size = len(next(iter(parts.values()))) if parts else 0
        return np.full(size, -np.inf)
    return np.where(any_candidate, total, -np.inf)


class Blend(ItemScorer):
    """Weighted sum of normalised component scores."""

    name: ClassVar[str] = "blend"
    keeps_users = True

    def __init__(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        components: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(weights) - set(COMPONENTS)
        if unknown:
            raise ConfigurationError(
                f"blend components {sorted(unknown)} are unknown; use {sorted(COMPONENTS)}"
            )
        components = {name: dict((components or {}).get(name, {})) for name in weights}
        super().__init__(weights=weights, components=components)
        self.weights = weights
        self.models: dict[str, ItemScorer] = {
            name: COMPONENTS[name](**components[name]) for name in weights if weights[name]
        }

    def _fit(self, log: InteractionLog) -> None:
        for model in self.models.values():
            model.fit(log)

    def parts(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> dict[str, FloatArray]:
        return {
            name: normalised(model.score_items(history, user=user, now=now))
            for name, model in self.models.items()
        }

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        return combine(self.parts(history, user=user, now=now), self.weights)

    def redis_records(self) -> Iterator[RedisRecord]:
        yield RedisRecord("weights", "hash", {k: float(v) for k, v in self.weights.items()})
        yield self.params_record()

    def save(self, directory: Path) -> None:
        super().save(directory)
        for name, model in self.models.items():
            model.save(directory / name)

    @classmethod
    def load(cls, directory: Path) -> Self:
        blend = super().load(directory)
        blend.models = {
            name: COMPONENTS[name].load(directory / name)
            for name in json.loads((directory / "params.json").read_text())["params"]["weights"]
            if (directory / name).is_dir()
        }
        return blend
