"""Item-to-item similarity, SIMS-like: co-occurrence within sessions and user histories.

Co-occurrence. Each user's interactions are put in time order; every pair of items at
most ``window`` steps apart counts ``user_weight``, plus ``session_weight`` when both are
in the same session, divided by ``distance ** distance_decay``. Pairs are counted in both
directions and an item never co-occurs with itself. ``window=0`` counts every pair of a
user's history once (binary user x item co-occurrence, ``XᵀX``).

Normalisation (``normalize``):

- ``cosine``: sim(i, j) = c(i, j) / sqrt(n(i) · n(j)), n = occurrences of the item,
  times c(i, j) / (c(i, j) + ``shrink``) when ``shrink`` > 0 (a pair seen once between two
  rare items otherwise outranks one seen hundreds of times);
- ``bm25``: sim(i, j) = idf(j) · c(i, j)·(k1 + 1) / (c(i, j) + k1·(1 - b + b·len(i)/avglen)),
  with len(i) the row sum of c, idf(j) = log(1 + N / n(j)) (SIMS-style dampening of
  ubiquitous items).

Each item keeps its ``neighbours`` most similar items. A request sums the neighbour rows
of the last ``history_len`` history items, the newest weighted 1 and older ones linearly
less (position / length), or all weighted 1 with ``recency=False``.

Redis records: ``nbr:{item_id}`` (ZSET neighbour → similarity, one per item with
neighbours) and ``params``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from scipy import sparse

from recstream.errors import ConfigurationError
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.common import ItemScorer

__all__ = ["ItemToItem", "prune_rows"]


def prune_rows(matrix: Any, keep: int) -> Any:
    """A CSR matrix with only the ``keep`` largest entries of each row (ties: lower column)."""
    matrix = sparse.csr_matrix(matrix)
    matrix.eliminate_zeros()
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    lengths = np.diff(indptr)
    if lengths.size == 0 or lengths.max(initial=0) <= keep:
        matrix.sort_indices()
        return matrix
    rows = np.repeat(np.arange(matrix.shape[0]), lengths)
    # within each row: by descending value, then ascending column
    order = np.lexsort((indices, -data, rows))
    rank = np.arange(order.size) - np.repeat(indptr[:-1], lengths)
    chosen = order[rank < keep]
    out = sparse.csr_matrix(
        (data[chosen], (rows[chosen], indices[chosen])), shape=matrix.shape, dtype=data.dtype
    )
    out.sort_indices()
    return out


class ItemToItem(ItemScorer):
    """Top-K neighbours per item from normalised co-occurrence."""

    name: ClassVar[str] = "item2item"

    def __init__(
        self,
        *,
        window: int = 10,
        user_weight: float = 1.0,
        session_weight: float = 1.0,
        distance_decay: float = 0.0,
        normalize: Literal["cosine", "bm25"] = "cosine",
        k1: float = 1.2,
        b: float = 0.75,
        neighbours: int = 100,
        history_len: int = 10,
        recency: bool = True,
        shrink: float = 0.0,
    ) -> None:
        if normalize not in ("cosine", "bm25"):
            raise ConfigurationError(f"normalize={normalize!r}: use 'cosine' or 'bm25'")
        if shrink and normalize != "cosine":
            # bm25 already saturates in c(i, j) through k1; a shrink there would be ignored
            raise ConfigurationError(
                f"shrink={shrink} applies to normalize='cosine' only: drop it or use cosine"
            )
        super().__init__(
            window=window,
            user_weight=user_weight,
            session_weight=session_weight,
            distance_decay=distance_decay,
            normalize=normalize,
            k1=k1,
            b=b,
            neighbours=neighbours,
            history_len=history_len,
            recency=recency,
            shrink=shrink,
        )
        self.recency = recency
        self.shrink = shrink
        self.window = window
        self.user_weight = user_weight
        self.session_weight = session_weight
        self.distance_decay = distance_decay
        self.normalize = normalize
        self.k1, self.b = k1, b
        self.neighbours = neighbours
        self.history_len = history_len
        self.similarity: Any = sparse.csr_matrix((0, 0))

    def cooccurrence(self, log: InteractionLog) -> Any:
        n = log.n_items
        if self.window <= 0:
            users = log.user_item_matrix(binary=True)
            counts = (users.T @ users).tocsr().astype(np.float64)
            counts.setdiag(0)
            counts.eliminate_zeros()
            return counts
        order = np.lexsort((log.row, log.timestamps, log.users))
        items, users, sessions = log.items[order], log.users[order], log.sessions[order]
        rows: list[IntArray] = []
        cols: list[IntArray] = []
        vals: list[FloatArray] = []
        for distance in range(1, min(self.window, len(items) - 1) + 1):
            a, b = items[:-distance], items[distance:]
            same_user = users[:-distance] == users[distance:]
            same_session = sessions[:-distance] == sessions[distance:]
            weight = same_user * self.user_weight + same_session * self.session_weight
            weight = weight / distance**self.distance_decay
            keep = (weight > 0) & (a != b)
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
            vals += [weight[keep], weight[keep]]
        if not rows:
            return sparse.csr_matrix((n, n))
        counts = sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
        )
        counts.sum_duplicates()
        return counts

    def _fit(self, log: InteractionLog) -> None:
        counts = self.cooccurrence(log).tocoo()
        occurrences = np.bincount(log.items, minlength=log.n_items).astype(np.float64)
        i, j, c = counts.row, counts.col, counts.data
        if self.normalize == "cosine":
            sims = c / np.sqrt(occurrences[i] * occurrences[j])
            if self.shrink > 0:
                sims = sims * c / (c + self.shrink)
        else:
            lengths = np.bincount(i, weights=c, minlength=log.n_items)
            avg = lengths[lengths > 0].mean() if (lengths > 0).any() else 1.0
            idf = np.log1p(occurrences.sum() / np.maximum(occurrences, 1.0))
            norm = self.k1 * (1 - self.b + self.b * lengths[i] / avg)
            sims = idf[j] * c * (self.k1 + 1) / (c + norm)
        matrix = sparse.csr_matrix((sims, (i, j)), shape=counts.shape)
        self.similarity = prune_rows(matrix, self.neighbours)

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        self._check_fitted()
        recent = history[-self.history_len :] if self.history_len > 0 else history[:0]
        scores = np.zeros(self.n_items)
        if recent.size:
            positions = (
                np.arange(1, recent.size + 1, dtype=np.float64) / recent.size
                if self.recency
                else np.ones(recent.size)
            )
            weights = sparse.csr_matrix(
                (positions, (np.zeros(recent.size, np.int64), recent)), shape=(1, self.n_items)
            )
            scores = np.asarray((weights @ self.similarity).todense()).ravel()
        return np.where(scores > 0, scores, -np.inf)

    def neighbours_of(self, item: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` most similar items to ``item`` (empty if unknown)."""
        codes = self.codes([item])
        if not codes.size:
            return []
        row = self.similarity.getrow(int(codes[0]))
        order = np.lexsort((row.indices, -row.data))[:k]
        return [(str(self.item_ids[row.indices[o]]), float(row.data[o])) for o in order]

    def redis_records(self) -> Iterator[RedisRecord]:
        self._check_fitted()
        sim = self.similarity
        for code in range(sim.shape[0]):
            lo, hi = sim.indptr[code], sim.indptr[code + 1]
            if hi > lo:
                yield RedisRecord(
                    f"nbr:{self.item_ids[code]}",
                    "zset",
                    {
                        str(self.item_ids[j]): float(v)
                        for j, v in zip(sim.indices[lo:hi], sim.data[lo:hi], strict=True)
                    },
                )
        yield self.params_record()

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        sim = self.similarity
        return {"indptr": sim.indptr, "indices": sim.indices, "data": sim.data}

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        n = len(state["indptr"]) - 1
        self.similarity = sparse.csr_matrix(
            (state["data"], state["indices"], state["indptr"]), shape=(n, n)
        )
