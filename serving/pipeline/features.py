"""Stage 3: the features of each candidate, named so a ranking can be explained by them.

The definition is `recstream.ranking` (shared with training, so the learned ranker is
fitted on exactly these values): per source ``score:``, ``norm:`` and ``rank:``, the user's
own events with the item (``u:*``, including the history score ``u:history``) and the
request's history (``h:*``); see that module for each one. This stage builds the
candidates' feature matrix once, for the learned ranker's `FeatureSpec` when one serves
(else every source and the window's length), and copies each row into
``Candidate.features`` (missing values left out) with the request context, ``ctx:hour`` and
``ctx:device:{device}`` = 1, which is shown but not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from recstream.ranking import SOURCES, FeatureSpec, Float64Array, History, feature_matrix
from recstream.windows import WindowEntry
from serving.pipeline.types import Candidate, RankContext

__all__ = ["assemble"]


def assemble(
    candidates: Sequence[Candidate],
    window: Sequence[WindowEntry],
    context: RankContext,
    weight: Callable[[str], float],
    now: float,
    spec: FeatureSpec | None = None,
    *,
    describe: bool = True,
) -> Float64Array:
    """Fill ``seen`` and, with ``describe`` (the debug view shows them), ``features`` and
    ``ranks`` of every candidate in place; return the feature matrix (rows in
    ``candidates`` order, columns ``spec.names``). The per-candidate dictionaries cost
    more than the matrix (~1.5 ms for 300 candidates), so a request without ``debug``
    skips them. Without a learned ranker (``spec`` None) nothing scores the matrix, so a
    request without ``debug`` gets an empty one and only ``seen`` is filled."""
    # the whole window, not only the spec's newest events, decides the seen policy
    history = {e.item_id for e in window}
    if spec is None and not describe:
        for candidate in candidates:
            candidate.seen = candidate.item_id in history
        return np.empty((len(candidates), 0))
    spec = spec or FeatureSpec(SOURCES, max(len(window), 1))
    ids = [c.item_id for c in candidates]
    scores = {
        source: np.array([c.sources.get(source, np.nan) for c in candidates], dtype=np.float64)
        for source in spec.sources
    }
    matrix = feature_matrix(spec, ids, scores, History.of(window, weight, spec.history_cap), now)
    names = spec.names
    shared: dict[str, float] = {}
    if context.hour is not None:
        shared["ctx:hour"] = float(context.hour)
    if context.device:
        shared[f"ctx:device:{context.device}"] = 1.0
    if not describe:
        for candidate in candidates:
            candidate.seen = candidate.item_id in history
        return matrix
    for candidate, values in zip(candidates, matrix.tolist(), strict=True):
        # v == v: not NaN (a missing feature is left out)
        features = {name: v for name, v in zip(names, values, strict=True) if v == v}
        ranks: dict[str, int] = {}
        for source in candidate.sources:
            rank = features.get(f"rank:{source}")
            if rank is not None:
                ranks[source] = int(rank)
        candidate.ranks = ranks
        features.update(shared)
        candidate.features = features
        candidate.seen = candidate.item_id in history
    return matrix
