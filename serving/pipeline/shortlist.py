"""Stage 2½: the shortlist, a cheap first cut of the merged pool before the costly stages.

Every source proposes up to ``Settings.candidates_per_source`` items, so a request with
five sources pools several hundred, while it answers twenty. Catalog lookups, features,
the scorer and the sort cost CPU per candidate, and at 1,000 requests a second that per-
candidate work was most of the server's time (docs/serving-speed.md). So before them, the
pool is cut to the ``keep`` best by the linear blend's formula over the raw source scores
(serving/pipeline/rank.py), computed on item codes in one compiled loop
(serving/pipeline/kernels.py), without building a `Candidate`; only the kept items are
decoded.

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

import numpy as np

from recstream.settings import SeenPolicy
from serving.pipeline.candidates import SourceOutput, order_ties
from serving.pipeline.codes import Codes, Interner, Values
from serving.pipeline.kernels import kept_entries, pool_blend, top_rows

__all__ = ["shortlist"]

_NO_CODES: Codes = np.zeros(0, np.int64)
_NO_VALUES: Values = np.zeros(0)


def shortlist(
    outputs: Sequence[SourceOutput],
    weights: Mapping[str, float],
    keep: int,
    seen: Collection[str],
    policy: SeenPolicy | None = None,
    interner: Interner | None = None,
) -> list[SourceOutput]:
    """``outputs`` restricted to the ``keep`` best items ``policy`` may show (plus each
    source's top item, and every seen item when ``policy`` is None); unchanged when the
    pool is no larger than that. ``interner`` numbers the items (the one the sources'
    tables use, so theirs are read as they are); a source without a table is numbered
    here."""
    if interner is None:
        interner = next((o.table.interner for o in outputs if o.table is not None), Interner())
    # The pool and the blend in one compiled loop (serving/pipeline/kernels.py): in
    # Python or numpy they were ~200 µs a request whatever the form. Same floats: each
    # part is `weight * score / scale`, added from 0.0 in source order, as LinearBlend
    # adds them.
    code_parts: list[Codes] = []
    value_parts: list[Values] = []
    ends = [0]
    for out in outputs:
        table = out.table
        if table is not None and table.interner is interner:
            part, part_values = table.codes, table.values
        else:
            scores = out.scores
            if not scores:
                ends.append(ends[-1])
                continue
            part = interner.encode(list(scores))
            part_values = np.fromiter(scores.values(), np.float64, len(scores))
        code_parts.append(part)
        value_parts.append(part_values)
        ends.append(ends[-1] + len(part))
    names = [out.name for out in outputs]
    offsets = np.array(ends, np.int64)
    codes = np.concatenate(code_parts) if code_parts else _NO_CODES
    values = np.concatenate(value_parts) if value_parts else _NO_VALUES
    known = interner.code
    seen_codes = np.array([known[i] for i in seen if i in known], np.int64)
    pool, rows, blend, blended, unseen, anchors, seen_rows, contenders, popularity = pool_blend(
        codes,
        values,
        offsets,
        np.array([weights.get(name, 0.0) for name in names]),
        seen_codes,
        interner.scratch(),
        keep,
        policy == "keep",
        names.index("popularity") if "popularity" in names else -1,
    )
    if len(pool) <= keep:
        return list(outputs)
    # the cut on codes (ties by id through the interner's id order), decoding nothing
    rank = interner.order.of(interner.ids)
    kept = np.zeros(len(pool), dtype=bool)
    chosen = _cut(contenders, blend, popularity, pool, rank, keep, interner)
    kept[chosen] = True
    if len(chosen) < keep:
        # items only zero-weight sources propose follow, by popularity
        rest = np.flatnonzero(~blended & unseen)
        no_then = np.zeros(len(pool))
        kept[_cut(rest, popularity, no_then, pool, rank, keep - len(chosen), interner)] = True
        chosen = np.flatnonzero(kept)
    kept[anchors[anchors >= 0]] = True
    if policy is None or (policy == "demote" and len(chosen) < keep):
        kept[seen_rows] = True  # (under demote: too few unseen to fill)
    # each source's kept items in the pool's order, so the result does not depend on
    # set order; only those are decoded
    entries, bounds = kept_entries(rows, offsets, kept)
    kept_ids = interner.decode(codes[entries].tolist())
    kept_values = values[entries].tolist()
    at = bounds.tolist()
    cut = []
    for s, out in enumerate(outputs):
        start, stop = at[s], at[s + 1]
        items = kept_ids[start:stop]
        category = out.category if out.groups is None else {}
        if out.groups is not None:
            names_of, groups = out.groups
            positions = (entries[start:stop] - offsets[s]).tolist()
            category = dict(
                zip(items, [names_of[g] for g in groups[positions].tolist()], strict=True)
            )
        cut.append(
            SourceOutput(
                out.name,
                dict(zip(items, kept_values[start:stop], strict=True)),
                out.because,
                category,
                out.origin,
                out.because_of,
            )
        )
    return cut


def _cut(
    rows: Codes, key: Values, then: Values, pool: Codes, rank: Codes, n: int, interner: Interner
) -> Codes:
    """The ``n`` best of ``rows`` by ``key``, then ``then``, then id (`_top`'s order), as
    rows: in the kernel, or by id here when a tie across the cut holds an item the id
    order does not cover yet."""
    if n <= 0:
        return _NO_CODES
    chosen, settled = top_rows(rows, key, then, pool, rank, n)
    if settled:
        return chosen
    ids = interner.decode(pool[rows].tolist())
    row_of = dict(zip(ids, rows.tolist(), strict=True))
    picked = _top(
        dict(zip(ids, key[rows].tolist(), strict=True)),
        dict(zip(ids, then[rows].tolist(), strict=True)),
        n,
    )
    return np.array([row_of[i] for i in picked], np.int64)


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
