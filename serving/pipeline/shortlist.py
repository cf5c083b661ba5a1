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

from collections.abc import Collection, Mapping, Sequence

from serving.pipeline.candidates import SourceOutput, order_ties

__all__ = ["shortlist"]


def shortlist(
    outputs: Sequence[SourceOutput],
    weights: Mapping[str, float],
    keep: int,
    seen: Collection[str],
) -> list[SourceOutput]:
    """``outputs`` restricted to the ``keep`` best unseen items (plus the seen ones and
    each source's top item); unchanged when the pool is no larger than that."""
    pool: dict[str, None] = {}
    for out in outputs:
        pool.update(dict.fromkeys(out.scores))
    if len(pool) <= keep:
        return list(outputs)
    blend: dict[str, float] = {}
    anchors: set[str] = set()
    for out in outputs:
        scores = out.scores
        if not scores:
            continue
        top = _largest_magnitude(scores)
        anchors.add(top)
        weight = weights.get(out.name, 0.0)
        if weight == 0:
            continue
        scale = abs(scores[top]) or 1.0
        for item, score in scores.items():
            # the very expression LinearBlend sums, in the same source order: equal floats
            blend[item] = blend.get(item, 0.0) + weight * score / scale
    popularity: Mapping[str, float] = next(
        (out.scores for out in outputs if out.name == "popularity"), {}
    )
    blended = [i for i in pool if i in blend and i not in seen]
    chosen = _top(blended, blend, popularity, keep)
    if len(chosen) < keep:
        # items only zero-weight sources propose follow, by popularity
        rest = [i for i in pool if i not in blend and i not in seen]
        chosen += _top(rest, {i: popularity.get(i, 0.0) for i in rest}, {}, keep - len(chosen))
    kept = anchors.union(chosen)
    kept.update(seen)
    return [
        SourceOutput(
            out.name,
            {i: s for i, s in out.scores.items() if i in kept},
            out.because,
            out.category,
            out.origin,
            out.because_of,
        )
        for out in outputs
    ]


def _largest_magnitude(scores: Mapping[str, float]) -> str:
    """The first item with the largest ``|score|``: a C-level max when no score is
    negative (the common case), else a key per item."""
    top = max(scores, key=scores.__getitem__)
    if scores[min(scores, key=scores.__getitem__)] >= 0:
        return top
    return max(scores, key=lambda i: abs(scores[i]))


def _top(
    items: list[str], key: Mapping[str, float], then: Mapping[str, float], n: int
) -> list[str]:
    """The ``n`` best ``items`` by ``key`` descending, then ``then`` descending, then id
    ascending (the pipeline's order). One sort on a C-level key; only runs of equal keys,
    rare among float scores, are ordered again in Python."""
    if n <= 0 or not items:
        return []
    ranked = sorted(items, key=key.__getitem__, reverse=True)
    end = min(n, len(ranked))
    last = key[ranked[end - 1]]
    while end < len(ranked) and key[ranked[end]] == last:
        end += 1  # a tie across the cut: the tie-breaks decide who stays
    top = ranked[:end]
    order_ties(top, [key[i] for i in top], lambda i: (-then.get(i, 0.0), i))
    return top[:n]
