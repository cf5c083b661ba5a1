"""Scoring formulas shared by training (offline), the agents and serving (live).

One definition each, so an offline evaluation and a live answer agree on the same
events. Training re-exports them from `training.models`; agents and serving import them
from here, because the lower layers must not import training.

- `trend_scores`: the trending formula (training.models.trending, agents/trending);
- `top_k`: deterministic top-k of a dense score vector (ties by lower index);
- `fold_in`: ALS's least-squares step for one user against fixed item factors
  (training.models.als; serving folds the live window in);
- `SessionIndex`, `knn_scores`, `score_session`: session kNN's published index and its
  request-time scoring (training.models.sknn builds the index; serving loads it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse

__all__ = ["SessionIndex", "fold_in", "knn_scores", "score_session", "top_k", "trend_scores"]

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.integer[Any]]
Float64Array = npt.NDArray[np.float64]


def trend_scores(recent: FloatArray, previous: FloatArray, gamma: float) -> FloatArray:
    """The trending formula on per-item window counts (``-inf`` where both are zero):
    ``recent + gamma · (recent - previous)``, the next window's count extrapolated
    linearly from the last two (``gamma=0``: plain windowed counts). Computed as
    ``(1 + gamma) · recent - gamma · previous``, the form the agents' materializer has
    Redis compute (a weighted ZUNIONSTORE, agents/trending.py)."""
    trend = (1.0 + gamma) * recent - gamma * previous
    return np.where((recent > 0) | (previous > 0), trend, -np.inf)


def top_k(scores: FloatArray, k: int) -> npt.NDArray[np.int64]:
    """Indices of the ``k`` highest finite scores, best first, ties by lower index."""
    finite = np.flatnonzero(np.isfinite(scores))
    if k <= 0 or finite.size == 0:
        return np.zeros(0, np.int64)
    values = scores[finite]
    if finite.size > k:
        # the k-th largest value; keep everything >= it so ties are resolved by index
        threshold = np.partition(values, finite.size - k)[finite.size - k]
        keep = values >= threshold
        finite, values = finite[keep], values[keep]
    order = np.lexsort((finite, -values))[:k]
    return finite[order].astype(np.int64)


def fold_in(
    item_factors: npt.NDArray[np.floating[Any]],
    items: IntArray,
    confidences: npt.NDArray[np.floating[Any]],
    regularization: float,
    yty: npt.NDArray[np.floating[Any]] | None = None,
) -> Float64Array:
    """A user's factor vector from the items they touched and each item's confidence
    (``alpha x weight``), against fixed item factors; zeros for an empty history."""
    y = np.asarray(item_factors, dtype=np.float64)
    f = y.shape[1]
    if items.size == 0:
        return np.zeros(f)
    gram = y.T @ y if yty is None else np.asarray(yty, dtype=np.float64)
    codes, inverse = np.unique(items, return_inverse=True)
    conf = np.bincount(inverse, weights=np.asarray(confidences, np.float64))
    yi = y[codes]
    a = gram + regularization * np.eye(f) + (yi.T * (conf - 1.0)) @ yi
    b = yi.T @ conf
    return np.asarray(np.linalg.solve(a, b), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class SessionIndex:
    """Past sessions (CSR sessions x items, binary), and per item its recent sessions.
    Built offline by `training.models.sknn.build_session_index`."""

    session_items: Any
    """CSR n_sessions x n_items."""
    item_sessions: Any
    """CSR n_items x n_sessions: the ``sample_size`` most recent sessions of each item."""
    session_lengths: FloatArray
    idf: FloatArray
    item_ids: npt.NDArray[np.object_]

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
) -> Float64Array:
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
