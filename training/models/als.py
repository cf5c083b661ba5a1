"""User personalization: implicit-feedback matrix factorization with `implicit`'s ALS.

The user x item matrix holds each pair's summed event weights; `implicit` uses
``alpha x weight`` as the confidence of a positive. Known users are scored with their
fitted factors. Anyone else (a brand-new user, an anonymous session, or a user whose live
window serving has) is *folded in*: `fold_in` solves the user's least-squares step
against the fixed item factors, exactly the step ALS itself makes for a user
(`recstream.scoring.fold_in`, shared with serving):

    x = (YᵀY + λI + Σ_i (c_i - 1) y_i y_iᵀ)⁻¹ Σ_i c_i y_i,   c_i = alpha x weight_i

Items never seen in training are not candidates (their factors are random noise).

Redis records (what serving needs to fold in a live user):

- ``factors``: HASH item → little-endian float32 bytes of its factor vector;
- ``yty``: STRING, YᵀY as float32 bytes (factors x factors, row-major);
- ``params``: HASH (factors, regularization, alpha, iterations, seed, dtype "float32").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from recstream.scoring import fold_in
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.common import ItemScorer

__all__ = ["ALS", "fold_in"]

log = logging.getLogger(__name__)


class ALS(ItemScorer):
    """`implicit.cpu.als.AlternatingLeastSquares`, fitted single-threaded for determinism."""

    name: ClassVar[str] = "als"
    keeps_users: ClassVar[bool] = True

    def __init__(
        self,
        *,
        factors: int = 64,
        regularization: float = 0.1,
        alpha: float = 1.0,
        iterations: int = 15,
        seed: int = 42,
        use_user_factors: bool = True,
        history_len: int = 50,
    ) -> None:
        super().__init__(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            seed=seed,
            use_user_factors=use_user_factors,
            history_len=history_len,
        )
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.seed = iterations, seed
        self.use_user_factors, self.history_len = use_user_factors, history_len
        self.item_factors: npt.NDArray[np.float32] = np.zeros((0, factors), np.float32)
        self.user_factors: npt.NDArray[np.float32] = np.zeros((0, factors), np.float32)
        self.seen: npt.NDArray[np.bool_] = np.zeros(0, bool)
        self.user_seen: npt.NDArray[np.bool_] = np.zeros(0, bool)
        """Users with training rows. Others (in the vocabulary only because a later part of
        the log has them) have an all-zero factor row and must be folded in instead."""
        self._yty: FloatArray | None = None

    def _fit(self, log: InteractionLog) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        matrix = log.user_item_matrix()
        # One BLAS thread: implicit parallelises over users itself, and warns when BLAS
        # threads would oversubscribe the cores.
        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
                num_threads=1,
            )
            model.fit(matrix, show_progress=False)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.seen = np.bincount(log.items, minlength=log.n_items) > 0
        self.user_seen = np.bincount(log.users, minlength=len(self.user_factors)) > 0
        self._yty = None

    @property
    def yty(self) -> FloatArray:
        if self._yty is None:
            y = self.item_factors.astype(np.float64)
            self._yty = y.T @ y
        return self._yty

    def user_vector(self, history: IntArray, user: int | None) -> FloatArray:
        if (
            self.use_user_factors
            and user is not None
            and user < len(self.user_seen)
            and self.user_seen[user]
        ):
            return np.asarray(self.user_factors[user], dtype=np.float64)
        recent = history[-self.history_len :] if self.history_len > 0 else history[:0]
        confidences = np.full(recent.size, self.alpha)
        return fold_in(self.item_factors, recent, confidences, self.regularization, self.yty)

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        vector = self.user_vector(history, user)
        if not vector.any():
            return np.full(self.n_items, -np.inf)
        scores = self.item_factors.astype(np.float64) @ vector
        return np.where(self.seen, scores, -np.inf)

    def redis_records(self) -> Iterator[RedisRecord]:
        self._check_fitted()
        factors = self.item_factors.astype("<f4")
        yield RedisRecord(
            "factors",
            "hash",
            {str(self.item_ids[i]): factors[i].tobytes() for i in np.flatnonzero(self.seen)},
        )
        yield RedisRecord("yty", "string", self.yty.astype("<f4").tobytes())
        yield self.params_record()

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        return {
            "item_factors": self.item_factors,
            "user_factors": self.user_factors,
            "seen": self.seen,
            "user_seen": self.user_seen,
        }

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        self.item_factors = state["item_factors"]
        self.user_factors = state["user_factors"]
        self.seen = state["seen"]
        # Versions saved before user_seen existed: a trained user has a non-zero row.
        self.user_seen = (
            state["user_seen"] if "user_seen" in state else np.any(self.user_factors != 0, axis=1)
        )
