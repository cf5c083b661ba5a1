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
request-time function serving calls with the published index and the live items.

Redis records: ``index`` (STRING: the compressed index, load it with
`SessionIndex.from_bytes`) and ``params``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from scipy import sparse

from recstream.errors import ConfigurationError
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.common import ItemScorer, top_k

__all__ = ["SessionIndex", "SessionKNN", "score_session"]


@dataclass(frozen=True, eq=False)
class SessionIndex:
    """Past sessions (CSR sessions x items, binary), and per item its recent sessions."""

    session_items: Any
    """CSR n_sessions x n_items."""
    item_sessions: Any
    """CSR n_items x n_sessions: the ``sample_size`` most recent sessions of each item."""
    session_lengths: FloatArray
    idf: FloatArray
    item_ids: npt.NDArray[np.object_]

    @classmethod
    def build(cls, log: InteractionLog, sample_size: int, unit: str = "session") -> SessionIndex:
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
        return cls(matrix, inverted, lengths, idf, log.item_ids)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        s, v = self.session_items, self.item_sessions
        np.savez_compressed(
            buffer,
            s_indptr=s.indptr,
            s_indices=s.indices,
            v_indptr=v.indptr,
            v_indices=v.indices,
            shape=np.array(s.shape),
            lengths=self.session_lengths,
            idf=self.idf,
            item_ids=np.array([str(i) for i in self.item_ids], dtype=str),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> SessionIndex:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            n_sessions, n_items = (int(x) for x in data["shape"])
            s = sparse.csr_matrix(
                (np.ones(len(data["s_indices"]), np.float32), data["s_indices"], data["s_indptr"]),
                shape=(n_sessions, n_items),
            )
            v = sparse.csr_matrix(
                (np.ones(len(data["v_indices"]), np.float32), data["v_indices"], data["v_indptr"]),
                shape=(n_items, n_sessions),
            )
            ids = np.empty(n_items, dtype=object)
            ids[:] = [str(i) for i in data["item_ids"]]
            return cls(s, v, data["lengths"], data["idf"], ids)


def knn_scores(
    index: SessionIndex,
    query: IntArray,
    *,
    k: int,
    last_n: int,
    normalize: bool,
    idf_weight: float,
) -> FloatArray:
    """Scores over every item code for the query items (oldest first); ``-inf`` where no
    neighbour session has the item."""
    n_items = index.session_items.shape[1]
    recent = query[-last_n:] if last_n > 0 else query[:0]
    if recent.size == 0:
        return np.full(n_items, -np.inf)
    weights = np.zeros(n_items)
    # the newest occurrence of a repeated item sets its weight (np.maximum over positions)
    np.maximum.at(weights, recent, np.arange(1, recent.size + 1) / recent.size)
    candidates = np.unique(index.item_sessions[np.unique(recent)].indices)
    if candidates.size == 0:
        return np.full(n_items, -np.inf)
    rows = index.session_items[candidates]
    sims = rows @ weights
    if normalize:
        sims = sims / np.sqrt(np.maximum(index.session_lengths[candidates], 1.0))
    best = top_k(np.where(sims > 0, sims, -np.inf), k)
    scores = np.asarray(rows[best].T @ sims[best]).ravel()
    if idf_weight:
        scores = scores * index.idf**idf_weight
    return np.where(scores > 0, scores, -np.inf)


def score_session(
    index: SessionIndex,
    items: Sequence[str],
    k: int = 20,
    *,
    neighbours: int = 100,
    last_n: int = 10,
    normalize: bool = False,
    idf_weight: float = 0.0,
) -> list[tuple[str, float]]:
    """The request-time call: top-``k`` (item, score) for the live session ``items``
    (oldest first) against a published index; pass the model's published params."""
    lookup = {str(item): code for code, item in enumerate(index.item_ids)}
    query = np.array([lookup[i] for i in items if i in lookup], dtype=np.int32)
    scores = knn_scores(
        index, query, k=neighbours, last_n=last_n, normalize=normalize, idf_weight=idf_weight
    )
    return [(str(index.item_ids[i]), float(scores[i])) for i in top_k(scores, k)]


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
        self.index = SessionIndex.build(log, self.sample_size, self.unit)

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
