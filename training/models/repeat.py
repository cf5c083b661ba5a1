"""Recently viewed: re-show the user's (or session's) own recent items.

score(i) = Σ over the occurrences of i among the last ``history_len`` history items of
``decay ** age``, where ``age`` is 0 for the newest item, 1 for the one before, ... Items
not in the history are not candidates. The item just seen gets its score times
``last_weight``: where a log never repeats an item twice in a row (Taobao's), it is the one
history item the next view is not. Nothing is learnt; serving computes it from the
live window, so the only Redis record is ``params``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from training.data import FloatArray, IntArray, InteractionLog
from training.models.common import ItemScorer

__all__ = ["RecentlyViewed", "repeat_scores"]


def repeat_scores(
    history: IntArray, n_items: int, *, decay: float, history_len: int, last_weight: float = 1.0
) -> FloatArray:
    """The recently-viewed scores of a history (oldest first) over ``n_items`` codes."""
    scores = np.full(n_items, -np.inf)
    recent = history[-history_len:] if history_len > 0 else history[:0]
    if recent.size:
        ages = np.arange(recent.size - 1, -1, -1, dtype=np.float64)
        sums = np.bincount(recent, weights=decay**ages, minlength=n_items)
        present = np.bincount(recent, minlength=n_items) > 0
        scores[present] = sums[present]
        scores[recent[-1]] *= last_weight
    return scores


class RecentlyViewed(ItemScorer):
    """Repeat the history, most recent and most repeated first."""

    name: ClassVar[str] = "recently_viewed"

    def __init__(
        self, *, decay: float = 0.8, history_len: int = 50, last_weight: float = 1.0
    ) -> None:
        super().__init__(decay=decay, history_len=history_len, last_weight=last_weight)
        self.decay = decay
        self.history_len = history_len
        self.last_weight = last_weight

    def _fit(self, log: InteractionLog) -> None:
        pass

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        return repeat_scores(
            history,
            self.n_items,
            decay=self.decay,
            history_len=self.history_len,
            last_weight=self.last_weight,
        )
