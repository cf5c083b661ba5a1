"""Trending: a velocity score over the two most recent windows.

With window length ``w`` and the request time ``now``:

    recent(i)   = Σ weight(e) over i's interactions with  now - w   <= t_e < now
    previous(i) = Σ weight(e) over i's interactions with  now - 2w  <= t_e < now - w
    velocity(i) = recent(i) - previous(i)
    trend(i)    = recent(i) + gamma · velocity(i)
                = (1 + gamma) · recent(i) - gamma · previous(i)

i.e. the next window's count extrapolated linearly from the last two (``gamma=0``: plain
windowed counts; ``gamma=1``: full linear extrapolation). Items with no interaction in
either window are not candidates; equal trends are ordered by all-time counts (each
adds at most 1e-6 to a trend). The streaming agents compute the same formula from two
rolling per-item counters (the current window and the one before it), so an offline and a
live trending list agree on the same events.

Redis records: ``top`` (ZSET item → trend at the newest timestamp of the training log,
``top_n`` items) and ``params`` (HASH: window_s, gamma, top_n).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from recstream.scoring import trend_scores
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.common import ItemScorer, zset_of

__all__ = ["Trending", "trend_scores"]

TIE_BREAK = 1e-6


class Trending(ItemScorer):
    """Windowed counts extrapolated by their velocity, at request time ``now``."""

    name: ClassVar[str] = "trending"
    causal: ClassVar[bool] = True

    def __init__(self, *, window_s: float = 86400.0, gamma: float = 0.5, top_n: int = 1000) -> None:
        super().__init__(window_s=window_s, gamma=gamma, top_n=top_n)
        self.window_s = window_s
        self.gamma = gamma
        self.top_n = top_n
        self.times: FloatArray = np.zeros(0)
        self.items: IntArray = np.zeros(0, np.int32)
        self.weights: npt.NDArray[np.float32] = np.zeros(0, np.float32)

    def _fit(self, log: InteractionLog) -> None:
        order = log.time_order()
        self.times = log.timestamps[order]
        self.items = log.items[order]
        # negative feedback never counts as trending (the live agents do the same)
        self.weights = np.maximum(log.weights[order], 0)

    def window_counts(self, start: float, end: float) -> FloatArray:
        lo, hi = np.searchsorted(self.times, [start, end], side="left")
        weights = self.weights[lo:hi].astype(np.float64)
        counts = np.bincount(self.items[lo:hi], weights=weights, minlength=self.n_items)
        return counts.astype(np.float64)

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        if now is None:
            now = float(self.times[-1]) + 1e-6 if self.times.size else 0.0
        recent = self.window_counts(now - self.window_s, now)
        previous = self.window_counts(now - 2 * self.window_s, now - self.window_s)
        # equal trends (frequent with small counts) are ordered by all-time counts
        total = self.window_counts(-np.inf, now)
        trend = trend_scores(recent, previous, self.gamma)
        active = np.isfinite(trend)
        # items without recent activity follow, by all-time count (the popularity fallback)
        floor = float(trend[active].min()) - 1.0 if active.any() else 0.0
        trend = np.where(active, trend, np.where(total > 0, floor, -np.inf))
        return np.asarray(trend + TIE_BREAK * total / (total.max() + 1), dtype=np.float64)

    def redis_records(self) -> Iterator[RedisRecord]:
        scores = self.score_items(np.zeros(0, np.int32))
        yield RedisRecord("top", "zset", zset_of(self.item_ids, scores, self.top_n))
        yield self.params_record()

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        return {"times": self.times, "items": self.items, "weights": self.weights}

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        self.times, self.items, self.weights = state["times"], state["items"], state["weights"]
