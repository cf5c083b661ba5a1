"""Stage 2½: the shortlist, a cheap first cut of the merged pool before the costly stages.

Every source proposes up to ``Settings.candidates_per_source`` items, so a request with
five sources pools several hundred, while it answers twenty. Catalog lookups, features,
the scorer and the sort cost CPU per candidate, and at 1,000 requests a second that per-
candidate work was most of the server's time (docs/serving-speed.md). So before them, the
pool is cut to the ``keep`` best by the linear blend's formula over the raw source scores
(serving/pipeline/rank.py), computed on plain dicts, without building a `Candidate`.

The cut never changes what the linear blend serves:

- the blend divides each source's scores by that source's largest ``|score|`` in the
  pool; the item holding it is always kept, so every scale, and so every kept item's
  score, is the one the full pool gives;
- ``keep`` counts only items the user has not interacted with: the ones in the window are
  kept on top of it, because the seen-item policy may still drop them all;
- items only zero-weight sources propose (the popularity fallback) follow by their
  popularity score, as `serving.pipeline.ranker._order` orders them.

The learned ranker (serving/pipeline/rank.py) is not given the shortlist: it was fitted
on every source's full list, so it scores the whole pool (docs/serving.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence

from serving.pipeline.candidates import SourceOutput

__all__ = ["shortlist"]


def shortlist(
    outputs: Sequence[SourceOutput],
    weights: Mapping[str, float],
    keep: int,
    seen: Collection[str],
) -> list[SourceOutput]:
    """``outputs`` restricted to the ``keep`` best unseen items (plus the seen ones and
    each source's top item); unchanged when the pool is no larger than that."""
    pool_size = len({item for out in outputs for item in out.scores})
    if pool_size <= keep:
        return list(outputs)
    blend: dict[str, float] = {}
    anchors: set[str] = set()
    for out in outputs:
        if not out.scores:
            continue
        top = max(out.scores, key=lambda i: abs(out.scores[i]))
        anchors.add(top)
        weight = weights.get(out.name, 0.0)
        if weight == 0:
            continue
        scale = abs(out.scores[top]) or 1.0
        for item, score in out.scores.items():
            # the very expression LinearBlend sums, in the same source order: equal floats
            blend[item] = blend.get(item, 0.0) + weight * score / scale
    popularity: Mapping[str, float] = next(
        (out.scores for out in outputs if out.name == "popularity"), {}
    )
    unseen = {item for out in outputs for item in out.scores if item not in seen}
    chosen = heapq.nlargest(
        keep,
        unseen,
        key=lambda i: (i in blend, blend.get(i, 0.0), popularity.get(i, 0.0), _reverse(i)),
    )
    kept = anchors.union(chosen)
    kept.update(seen)
    return [
        SourceOutput(
            out.name,
            {i: s for i, s in out.scores.items() if i in kept},
            out.because,
            out.category,
            out.origin,
        )
        for out in outputs
    ]


class _reverse(str):
    """Ties by item id ascending, as the pipeline's sorts break them, inside `nlargest`."""

    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)

    def __gt__(self, other: str) -> bool:
        return str.__lt__(self, other)
