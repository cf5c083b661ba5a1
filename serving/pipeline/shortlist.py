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
- the seen-item policy decides what ``keep`` counts (serving/pipeline/seen.py): under
  ``keep`` seen and unseen items compete for the same places, so the ``keep`` best of all
  are kept; under ``demote`` and ``exclude`` the ``keep`` best unseen ones, and the seen
  ones besides only under ``demote`` when fewer unseen items than that exist (they follow
  every unseen one). A MovieLens window holds ~50 items, most of them never shown: kept
  regardless, they were two thirds of the candidates every later stage worked on. With
  no policy given (diversity reorders the pool after the policy, so a seen item may
  move ahead of capped unseen ones) every seen item is kept besides the ``keep`` best;
- items only zero-weight sources propose (the popularity fallback) follow by their
  popularity score, as `serving.pipeline.ranker._order` orders them.

The learned ranker (serving/pipeline/rank.py) is not given the shortlist: it was fitted
on every source's full list, so it scores the whole pool (docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from itertools import chain, islice
from typing import Any

import numpy as np

from recstream.settings import SeenPolicy
from serving.pipeline.candidates import SourceOutput, nth_largest, order_ties

__all__ = ["shortlist"]


def shortlist(
    outputs: Sequence[SourceOutput],
    weights: Mapping[str, float],
    keep: int,
    seen: Collection[str],
    policy: SeenPolicy | None = None,
) -> list[SourceOutput]:
    """``outputs`` restricted to the ``keep`` best items ``policy`` may show (plus each
    source's top item, and every seen item when ``policy`` is None); unchanged when the
    pool is no larger than that."""
    pool = dict.fromkeys(chain.from_iterable(out.scores for out in outputs))
    if len(pool) <= keep:
        return list(outputs)
    # The blend over the pool in numpy: a request pools ~1,000 (item, score) pairs and a
    # loop of dict updates was the largest share of the pipeline's own CPU. Same floats:
    # each part is `weight * score / scale`, added from 0.0 in source order, as
    # LinearBlend adds them.
    index = dict(zip(pool, range(len(pool)), strict=True))
    blend = np.zeros(len(pool))
    blended = np.zeros(len(pool), dtype=bool)
    anchors: set[str] = set()
    for out in outputs:
        scores = out.scores
        if not scores:
            continue
        values = np.fromiter(scores.values(), np.float64, len(scores))
        magnitudes = np.abs(values)
        first = int(magnitudes.argmax())  # the first item with the largest |score|
        anchors.add(next(islice(scores, first, None)))
        weight = weights.get(out.name, 0.0)
        if weight == 0:
            continue
        scale = float(magnitudes[first]) or 1.0
        rows = np.fromiter(map(index.__getitem__, scores), np.intp, len(scores))
        blend[rows] += weight * values / scale
        blended[rows] = True
    seen_rows = [index[i] for i in seen if i in index]
    unseen = np.ones(len(pool), dtype=bool)
    if policy != "keep":
        unseen[seen_rows] = False  # (under "keep" every item competes: none is set apart)
    popularity: Mapping[str, float] = next(
        (out.scores for out in outputs if out.name == "popularity"), {}
    )
    ids = list(pool)
    chosen = _top(_contenders(blend, blended & unseen, keep, ids), popularity, keep)
    if len(chosen) < keep:
        # items only zero-weight sources propose follow, by popularity
        rest = [ids[i] for i in np.flatnonzero(~blended & unseen).tolist()]
        chosen += _top({i: popularity.get(i, 0.0) for i in rest}, {}, keep - len(chosen))
    kept = anchors.union(chosen)
    if policy is None or (policy == "demote" and len(chosen) < keep):
        kept.update(ids[i] for i in seen_rows)  # (under demote: too few unseen to fill)
    # the few kept items looked up in each source (not each source's ~200 filtered), in
    # the pool's order, so the result does not depend on set order
    order = sorted(kept, key=index.__getitem__)
    return [
        SourceOutput(
            out.name,
            {i: out.scores[i] for i in order if i in out.scores},
            out.because,
            out.category,
            out.origin,
            out.because_of,
        )
        for out in outputs
    ]


def _contenders(
    blend: np.ndarray[Any, np.dtype[np.float64]],
    allowed: np.ndarray[Any, np.dtype[np.bool_]],
    n: int,
    ids: list[str],
) -> dict[str, float]:
    """The allowed items that may be among the ``n`` best by ``blend``: every one whose
    value reaches the ``n``-th best (so ties across the cut are all there), by id."""
    rows = np.flatnonzero(allowed)
    if len(rows) > n:
        values = blend[rows]
        nth = nth_largest(values, n)
        rows = rows[values >= nth]
    return dict(zip([ids[i] for i in rows.tolist()], blend[rows].tolist(), strict=True))


def _top(key: Mapping[str, float], then: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` best items of ``key`` by their value descending, then ``then``
    descending, then id ascending (the pipeline's order). One sort on a C-level key;
    only runs of equal keys, rare among float scores, are ordered again in Python."""
    if n <= 0 or not key:
        return []
    ranked = sorted(key, key=key.__getitem__, reverse=True)
    end = min(n, len(ranked))
    last = key[ranked[end - 1]]
    while end < len(ranked) and key[ranked[end]] == last:
        end += 1  # a tie across the cut: the tie-breaks decide who stays
    top = ranked[:end]
    order_ties(top, [key[i] for i in top], lambda i: (-then.get(i, 0.0), i))
    return top[:n]
