"""Stage 3: the features of each candidate, named so a ranking can be explained by them.

Per candidate (``Candidate.features``):

- ``score:{source}`` and ``rank:{source}`` for every source that scored it (rank 1 = best);
- the user's own interactions with it, from the live window: ``u:count``, ``u:weight``
  (Σ event weights), ``u:age_s`` (seconds since the newest one), ``u:position`` (0 = the
  window's newest entry), ``u:n:{event_type}``;
- the item's live popularity and trend, scaled to the request's maximum: ``item:pop``,
  ``item:trend`` (from the popularity and trending sources, cached in-process);
- the request context: ``ctx:hour`` and ``ctx:device:{device}`` = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agents.state import WindowEntry
from serving.pipeline.types import Candidate, RankContext

__all__ = ["assemble"]


def assemble(
    candidates: Sequence[Candidate],
    window: Sequence[WindowEntry],
    context: RankContext,
    weight: Callable[[str], float],
    now: float,
) -> None:
    """Fill ``features`` (and ``ranks``, ``seen``) of every candidate in place."""
    by_source: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        for source in candidate.sources:
            by_source.setdefault(source, []).append(candidate)
    for source, members in by_source.items():
        members.sort(key=lambda c: (-c.sources[source], c.item_id))
        for rank, candidate in enumerate(members, start=1):
            candidate.ranks[source] = rank
    scale = {
        source: max((abs(c.sources[source]) for c in members), default=0.0) or 1.0
        for source, members in by_source.items()
    }
    interactions: dict[str, list[tuple[int, WindowEntry]]] = {}
    for position, entry in enumerate(window):
        interactions.setdefault(entry.item_id, []).append((position, entry))
    shared: dict[str, float] = {}
    if context.hour is not None:
        shared["ctx:hour"] = float(context.hour)
    if context.device:
        shared[f"ctx:device:{context.device}"] = 1.0
    for candidate in candidates:
        features = candidate.features
        for source, score in candidate.sources.items():
            features[f"score:{source}"] = score
            features[f"rank:{source}"] = float(candidate.ranks[source])
        if "popularity" in candidate.sources:
            features["item:pop"] = candidate.sources["popularity"] / scale["popularity"]
        if "trending" in candidate.sources:
            features["item:trend"] = candidate.sources["trending"] / scale["trending"]
        mine = interactions.get(candidate.item_id)
        if mine:
            candidate.seen = True
            features["u:count"] = float(len(mine))
            features["u:weight"] = sum(weight(e.event_type) for _, e in mine)
            features["u:position"] = float(mine[0][0])
            features["u:age_s"] = max(0.0, now - mine[0][1].timestamp)
            for _, entry in mine:
                key = f"u:n:{entry.event_type}"
                features[key] = features.get(key, 0.0) + 1.0
        features.update(shared)
