"""The ranking core's loops, compiled by numba.

A request pools ~850 (item, score) pairs from its sources and keeps a few dozen. In
Python, or in numpy (a few dozen calls of 1-3 µs each over arrays of that size), the
pooling and the blend cost ~200 µs a request however they were written (sessions 8 and
12 in docs/serving-speed.md); as one compiled loop they cost ~10 µs. numba compiles
these functions at their first call and keeps the machine code in ``__pycache__``
(``cache=True``), so later processes load it (~0.1 s) instead of compiling (~2 s);
`warm` makes that happen at start-up, not in a request.

Everything here works on dense integer codes (serving/pipeline/codes.py) and float64
arrays, and adds floats in the same order as the Python it replaces, so its results are
the same floats (tests/serving/test_shortlist.py checks it against a plain reference).
What needs item ids (ties ordered by id) stays in Python, on the few items it concerns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

__all__ = [
    "Pooled",
    "best_entries",
    "kept_entries",
    "neighbour_sums",
    "pool_blend",
    "strongest",
    "top_rows",
    "warm",
]

F = TypeVar("F", bound=Callable[..., Any])

Ints = np.ndarray[Any, np.dtype[np.int64]]
Ints32 = np.ndarray[Any, np.dtype[np.int32]]
Floats = np.ndarray[Any, np.dtype[np.float64]]
Bools = np.ndarray[Any, np.dtype[np.bool_]]

Pooled = tuple[Ints, Ints, Floats, Bools, Bools, Ints, Ints, Ints, Floats]
"""`pool_blend`'s result: pool, rows, blend, blended, unseen, anchors, seen rows,
contenders, popularity by row."""


def _compiled(fn: F) -> F:
    # nogil: a compiled call never needs the interpreter; no fastmath: the floats must be
    # the ones the Python reference gives, in the same order of operations
    return cast(F, numba.njit(cache=True, nogil=True)(fn))


@_compiled
def _number(codes: Ints | Ints32, scratch: Ints) -> tuple[Ints, Ints]:
    """Each entry's place among the distinct ``codes``, numbered in order of first sight,
    and those codes. ``scratch`` maps a code to its number: -1 everywhere on entry, set
    here for the distinct codes; `_unnumber` resets them (only those, so a call costs
    what it touches, not what the numbering holds)."""
    m = len(codes)
    rows = np.empty(m, np.int64)
    distinct = np.empty(m, np.int64)
    n = 0
    for j in range(m):
        c = codes[j]
        r = scratch[c]
        if r < 0:
            r = n
            scratch[c] = n
            distinct[n] = c
            n += 1
        rows[j] = r
    return rows, distinct[:n]


@_compiled
def _unnumber(distinct: Ints, scratch: Ints) -> None:
    for c in distinct:
        scratch[c] = -1


@_compiled
def pool_blend(
    codes: Ints,
    values: Floats,
    offsets: Ints,
    weights: Floats,
    seen: Ints,
    scratch: Ints,
    keep: int,
    seen_compete: bool,
    popularity: int,
) -> Pooled:
    """The shortlist's pool and blend (serving/pipeline/shortlist.py).

    ``codes``/``values`` are every source's (item, score) pairs, source after source;
    source ``s`` is ``offsets[s]:offsets[s + 1]`` and has blend weight ``weights[s]``.
    ``scratch`` as `_number`'s: -1 everywhere on entry and again on return.
    ``seen_compete`` is the ``keep`` policy (seen items are not set apart);
    ``popularity`` the index of the popularity source, or -1.

    Returns, by pool row (items in order of first sight): the pool's codes, each pair's
    row, the blend (Σ weight·score/scale, from 0.0, in source order), whether a weighted
    source proposed the row, whether it is unseen (or seen items compete), each source's
    anchor row (its first item of largest ``|score|``; -1 when empty), the seen items'
    rows, the contenders (the allowed rows whose blend reaches the ``keep``-th best,
    ascending), and each row's popularity score (0.0 when it has none).
    """
    rows, pool = _number(codes, scratch)
    n = len(pool)
    blend = np.zeros(n)
    blended = np.zeros(n, np.bool_)
    by_popularity = np.zeros(n)
    sources = len(offsets) - 1
    anchors = np.full(sources, -1, np.int64)
    for s in range(sources):
        start, stop = offsets[s], offsets[s + 1]
        if start == stop:
            continue
        # argmax of |score|: the first largest, and the first NaN if any (as numpy's)
        first = start
        largest = abs(values[start])
        for j in range(start + 1, stop):
            if largest != largest:
                break
            v = abs(values[j])
            if v > largest or v != v:
                largest = v
                first = j
        anchors[s] = rows[first]
        if s == popularity:
            for j in range(start, stop):
                by_popularity[rows[j]] = values[j]
        weight = weights[s]
        if weight == 0:
            continue
        scale = largest if largest != 0 else 1.0
        for j in range(start, stop):
            r = rows[j]
            blend[r] += weight * values[j] / scale
            blended[r] = True
    unseen = np.ones(n, np.bool_)
    seen_rows = np.empty(len(seen), np.int64)
    k = 0
    for c in seen:
        if c < len(scratch) and scratch[c] >= 0:
            seen_rows[k] = scratch[c]
            k += 1
            if not seen_compete:
                unseen[scratch[c]] = False
    _unnumber(pool, scratch)
    allowed = np.empty(n, np.int64)
    count = 0
    for r in range(n):
        if blended[r] and unseen[r]:
            allowed[count] = r
            count += 1
    contenders = allowed[:count]
    if count > keep:
        candidate = blend[contenders]
        nth = np.partition(candidate, count - keep)[count - keep]
        contenders = contenders[candidate >= nth]
    return (
        pool,
        rows,
        blend,
        blended,
        unseen,
        anchors,
        seen_rows[:k],
        contenders,
        by_popularity,
    )


@_compiled
def kept_entries(rows: Ints, offsets: Ints, kept: Bools) -> tuple[Ints, Ints]:
    """The pairs whose row is ``kept``, source after source, each source's in row order
    (the pool's); and where each source's run starts and ends (``len(offsets)`` bounds)."""
    out = np.empty(len(rows), np.int64)
    bounds = np.empty(len(offsets), np.int64)
    k = 0
    bounds[0] = 0
    for s in range(len(offsets) - 1):
        start = k
        for j in range(offsets[s], offsets[s + 1]):
            if kept[rows[j]]:
                out[k] = j
                k += 1
        # insertion sort by row: a source keeps a few dozen pairs at most
        for x in range(start + 1, k):
            y = out[x]
            z = x - 1
            while z >= start and rows[out[z]] > rows[y]:
                out[z + 1] = out[z]
                z -= 1
            out[z + 1] = y
        bounds[s + 1] = k
    return out[:k], bounds


@_compiled
def top_rows(
    rows: Ints, key: Floats, then: Floats, codes: Ints, rank: Ints, n: int
) -> tuple[Ints, bool]:
    """The shortlist's cut (serving/pipeline/shortlist.py): the ``n`` best of ``rows``
    by ``key`` descending, then ``then`` descending, then id (``rank`` of the row's code
    in ``codes``, as `_settle_ties`), in no particular order; and whether that was
    decided here. It is not (False) when rows equal on both keys straddle the cut and
    one of their codes is newer than ``rank``: the caller then cuts by id itself."""
    m = len(rows)
    if m <= n:
        return rows.copy(), True
    order = rows[np.argsort(-key[rows], kind="mergesort")]
    # `then` within runs of equal `key`: insertion sort, the input sorted but for them
    for x in range(1, m):
        r = order[x]
        z = x - 1
        while z >= 0 and key[order[z]] == key[r] and then[order[z]] < then[r]:
            order[z + 1] = order[z]
            z -= 1
        order[z + 1] = r
    # the run of rows equal on both keys around the cut: the id decides who stays
    last = order[n - 1]
    start = n - 1
    while start > 0 and key[order[start - 1]] == key[last] and then[order[start - 1]] == then[last]:
        start -= 1
    stop = n
    while stop < m and key[order[stop]] == key[last] and then[order[stop]] == then[last]:
        stop += 1
    if stop > n:
        covered = len(rank)
        for x in range(start, stop):
            if codes[order[x]] >= covered:
                return order[:n], False
        for x in range(start + 1, stop):
            r = order[x]
            z = x - 1
            while z >= start and rank[codes[order[z]]] > rank[codes[r]]:
                order[z + 1] = order[z]
                z -= 1
            order[z + 1] = r
    return order[:n], True


_warmed = False


def warm() -> None:
    """Compile (or load from the cache) every kernel now, on tiny inputs, so the first
    request does not wait for it (a request that compiled them would miss its deadline).
    Once per process; later calls return at once."""
    global _warmed
    if _warmed:
        return
    codes = np.array([0, 1, 1], np.int64)
    offsets = np.array([0, 2, 3], np.int64)
    scratch = np.full(2, -1, np.int64)
    pooled = pool_blend(
        codes,
        np.array([1.0, 0.5, 2.0]),
        offsets,
        np.array([1.0, 0.0]),
        np.array([0], np.int64),
        scratch,
        1,
        False,
        1,
    )
    kept_entries(pooled[1], offsets, np.ones(len(pooled[0]), np.bool_))
    top_rows(pooled[7], pooled[2], pooled[8], pooled[0], np.zeros(0, np.int64), 1)
    neighbours = np.array([0, 1, 1], np.int32)
    sums = np.array([0.5, 0.25, 0.25])
    rank = np.array([1, 0], np.int64)
    neighbour_sums(neighbours, sums, scratch, 1, True, rank)
    strongest(neighbours, sums, np.array([0, 0, 1], np.int64), np.array([1], np.int64), scratch)
    best_entries(codes, sums, scratch, 1, True, rank)
    _warmed = True


@_compiled
def _settle_ties(order: Ints, codes: Ints, values: Floats, rank: Ints) -> Ints:
    """Put each run of equal ``values`` (sorted descending) in id order, in place:
    ``order`` and ``codes`` (the code of each position) are reordered together, by
    ``rank`` (each code's id's place in id order, `serving.pipeline.codes.IdOrder`). A
    run holding a code ``rank`` does not cover yet (numbered since it was built) is left
    for the caller and returned as a ``[start, stop)`` row."""
    unsettled = np.empty((len(order), 2), np.int64)
    r = 0
    start = 0
    covered = len(rank)
    for j in range(1, len(order) + 1):
        if j < len(order) and values[j] == values[start]:
            continue
        if j - start > 1:
            ranked = True
            for x in range(start, j):
                if codes[x] >= covered:
                    ranked = False
            if ranked:
                # insertion sort: runs are short (a few items)
                for x in range(start + 1, j):
                    o, c = order[x], codes[x]
                    z = x - 1
                    while z >= start and rank[codes[z]] > rank[c]:
                        order[z + 1] = order[z]
                        codes[z + 1] = codes[z]
                        z -= 1
                    order[z + 1] = o
                    codes[z + 1] = c
            else:
                unsettled[r, 0] = start
                unsettled[r, 1] = j
                r += 1
        start = j
    return unsettled[:r]


@_compiled
def neighbour_sums(
    code: Ints32, contribution: Floats, slot: Ints, n: int, top: bool, rank: Ints
) -> tuple[Ints, Floats, Ints]:
    """Item-to-item's scores (serving/pipeline/candidates.py): each neighbour's summed
    contributions, added in array order from 0.0 (the floats `np.bincount` and the
    offline loop give), the positive ones kept.

    ``slot`` as `_number`'s scratch: -1 everywhere on entry and on return. With ``top``
    and more than ``n`` positive sums, the result is every item whose sum reaches the
    ``n``-th best, by sum descending then id (``rank``, as `_settle_ties`), and the runs
    of equal sums left for the caller to order by id; otherwise every positive one in
    the order of its first contribution, and no runs."""
    rows, items = _number(code, slot)
    _unnumber(items, slot)
    k = len(items)
    sums = np.zeros(k)
    for j in range(len(code)):
        sums[rows[j]] += contribution[j]
    count = 0
    for j in range(k):
        if sums[j] > 0:
            items[count] = items[j]
            sums[count] = sums[j]
            count += 1
    items, sums = items[:count], sums[:count]
    if not top or count <= n:
        return items, sums, np.empty((0, 2), np.int64)
    nth = np.partition(sums, count - n)[count - n]
    chosen = 0
    for j in range(count):
        if sums[j] >= nth:
            items[chosen] = items[j]
            sums[chosen] = sums[j]
            chosen += 1
    ranked = np.argsort(-sums[:chosen])  # (ties in any order: `_settle_ties` orders them)
    items, sums = items[:chosen][ranked], sums[:chosen][ranked]
    return items, sums, _settle_ties(items, items.copy(), sums, rank)


@_compiled
def strongest(code: Ints32, contribution: Floats, source: Ints, asked: Ints, slot: Ints) -> Ints:
    """For each ``asked`` code, the ``source`` of its largest contribution (the first
    such one in array order on ties); -1 for a code with none. ``slot`` as in
    `neighbour_sums`."""
    best = np.full(len(asked), -np.inf)
    found = np.full(len(asked), -1, np.int64)
    for i in range(len(asked)):
        slot[asked[i]] = i
    for j in range(len(code)):
        s = slot[code[j]]
        if s >= 0 and contribution[j] > best[s]:
            best[s] = contribution[j]
            found[s] = source[j]
    for i in range(len(asked)):
        slot[asked[i]] = -1
    return found


@_compiled
def best_entries(
    codes: Ints, values: Floats, slot: Ints, n: int, top: bool, rank: Ints
) -> tuple[Ints, Ints]:
    """Category popularity's merge (serving/pipeline/candidates.py): for each code, its
    entry of largest value (the first such one on ties), in the order of the code's
    first entry. With ``top`` and more than ``n`` codes, the entries whose value reaches
    the ``n``-th best instead, by value descending then id (``rank``, as `_settle_ties`),
    and the runs of equal values left for the caller to order by id. ``slot`` as in
    `neighbour_sums` (a map of ``codes``' numbering)."""
    rows, distinct = _number(codes, slot)
    _unnumber(distinct, slot)
    k = len(distinct)
    chosen = np.full(k, -1, np.int64)
    for j in range(len(codes)):
        r = rows[j]
        if chosen[r] < 0 or values[j] > values[chosen[r]]:
            chosen[r] = j
    if not top or k <= n:
        return chosen, np.empty((0, 2), np.int64)
    best = values[chosen]
    nth = np.partition(best, k - n)[k - n]
    chosen = chosen[best >= nth]
    chosen = chosen[np.argsort(-values[chosen])]  # (ties: `_settle_ties`)
    return chosen, _settle_ties(chosen, codes[chosen], values[chosen], rank)
