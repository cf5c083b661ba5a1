"""Session kNN, V-SKNN style: neighbours of the live session, found at request time.

The indexed units are past sessions, or with ``unit="user"`` past users' whole histories
(user-history kNN, for logged-in traffic with long histories).

Training builds an index of past sessions (`SessionIndex`): each session's item set, its
last timestamp, and for each item the ``sample_size`` most recent sessions that contain
it. At request time, for the live session's last ``last_n`` items s_1..s_m (oldest first):

1. candidate sessions: the union of the recent sessions of each s_j;
2. similarity of a candidate n: Σ_j w_j · [s_j ∈ n], with the position weight
   w_j = j / m (V-SKNN's linear decay: the newest item counts most), divided by
   sqrt(|n|) when ``normalize``;
3. the ``k`` most similar candidates are the neighbours;
4. score(i) = Σ over neighbours n containing i of sim(n) · idf(i)^idf_weight, with
   idf(i) = log(#sessions / #sessions containing i).

`SessionIndex.to_bytes` / `from_bytes` is what is published, and `score_session` is the
request-time function serving calls with the published index and the live items. Both
live in `recstream.scoring` (serving must not import training) and are re-exported here.

Redis records: ``index`` (STRING: the compressed index, load it with
`SessionIndex.from_bytes`) and ``params``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from scipy import sparse

from recstream.errors import ConfigurationError
from recstream.scoring import SessionIndex, knn_scores, score_session
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.common import ItemScorer

__all__ = ["SessionIndex", "SessionKNN", "build_session_index", "knn_scores", "score_session"]


def build_session_index(
    log: InteractionLog, sample_size: int, unit: str = "session"
) -> SessionIndex:
    """Index the log's sessions, or with ``unit="user"`` each user's whole history."""
    groups = log.users if unit == "user" else log.sessions
    n_sessions = log.n_users if unit == "user" else log.n_sessions
    n_items = log.n_items
    matrix = sparse.csr_matrix(
        (np.ones(len(log), np.float32), (groups, log.items)),
        shape=(n_sessions, n_items),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    last_seen = np.full(n_sessions, -np.inf)
    np.maximum.at(last_seen, groups, log.timestamps)
    coo = matrix.tocoo()
    # per item: sessions newest first (ties: higher session code), keep sample_size
    order = np.lexsort((-coo.row, -last_seen[coo.row], coo.col))
    items_sorted, sessions_sorted = coo.col[order], coo.row[order]
    counts = np.bincount(items_sorted, minlength=n_items)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(order.size) - np.repeat(starts, counts)
    keep = rank < sample_size
    inverted = sparse.csr_matrix(
        (
            np.ones(int(keep.sum()), np.float32),
            (items_sorted[keep], sessions_sorted[keep]),
        ),
        shape=(n_items, n_sessions),
    )
    lengths = np.asarray(matrix.sum(axis=1)).ravel().astype(np.float64)
    containing = np.bincount(coo.col, minlength=n_items).astype(np.float64)
    active = max(int((lengths > 0).sum()), 1)
    idf = np.log(np.maximum(active / np.maximum(containing, 1.0), 1.0))
    return SessionIndex(matrix, inverted, lengths, idf, log.item_ids)


class SessionKNN(ItemScorer):
    """V-SKNN over past sessions (or, for logged-in users, their recent history)."""

    name: ClassVar[str] = "sknn"

    def __init__(
        self,
        *,
        k: int = 100,
        sample_size: int = 500,
        last_n: int = 10,
        normalize: bool = False,
        idf_weight: float = 0.0,
        unit: Literal["session", "user"] = "session",
    ) -> None:
        if unit not in ("session", "user"):
            raise ConfigurationError(f"unit={unit!r}: use 'session' or 'user'")
        super().__init__(
            k=k,
            sample_size=sample_size,
            last_n=last_n,
            normalize=normalize,
            idf_weight=idf_weight,
            unit=unit,
        )
        self.unit = unit
        self.k, self.sample_size, self.last_n = k, sample_size, last_n
        self.normalize, self.idf_weight = normalize, idf_weight
        self.index: SessionIndex | None = None

    def _fit(self, log: InteractionLog) -> None:
        self.index = build_session_index(log, self.sample_size, self.unit)

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        assert self.index is not None
        return knn_scores(
            self.index,
            history,
            k=self.k,
            last_n=self.last_n,
            normalize=self.normalize,
            idf_weight=self.idf_weight,
        )

    def redis_records(self) -> Iterator[RedisRecord]:
        self._check_fitted()
        assert self.index is not None
        yield RedisRecord("index", "string", self.index.to_bytes())
        yield self.params_record()

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        assert self.index is not None
        return {"index": np.frombuffer(self.index.to_bytes(), dtype=np.uint8)}

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        self.index = SessionIndex.from_bytes(state["index"].tobytes())
