"""Item-to-item at request time (serving/pipeline/candidates.py) adds the neighbour rows
with numpy; it must give the very scores, order and explanations of the plain loop that
mirrors training's ItemToItem.recommend."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.pipeline.candidates import NeighbourRow, Sources, best
from serving.pipeline.models import Published

ITEMS = [f"i{n}" for n in range(40)]
similarity = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 1.0, 1.0 / 3.0, 2.0])
rows_strategy = st.dictionaries(
    st.sampled_from(ITEMS),
    st.lists(st.tuples(st.sampled_from(ITEMS), similarity), max_size=12, unique_by=lambda p: p[0]),
    max_size=15,
)


def plain_loop(
    recent: list[str],
    rows: dict[str, list[tuple[str, float]]],
    recency: bool,
    restrict: Collection[str] | None,
    n: int,
) -> tuple[dict[str, float], dict[str, str]]:
    scores: dict[str, float] = {}
    because: dict[str, str] = {}
    best_of: dict[str, float] = {}
    for position, item in enumerate(recent):
        weight = (position + 1) / len(recent) if recency else 1.0
        for neighbour, sim in rows.get(item, ()):
            contribution = weight * sim
            scores[neighbour] = scores.get(neighbour, 0.0) + contribution
            if contribution > best_of.get(neighbour, -math.inf):
                best_of[neighbour] = contribution
                because[neighbour] = item
    positive = {i: s for i, s in scores.items() if s > 0}
    if restrict is not None:
        kept = {i: s for i, s in positive.items() if i in restrict}
    else:
        kept = best(positive, n)
    return kept, {i: because[i] for i in kept}


class NoRedis:
    """Every row is cached before the call: a Redis read would be a test bug."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"unexpected Redis call {name}")


@settings(max_examples=300, deadline=None)
@given(
    rows=rows_strategy,
    history=st.lists(st.sampled_from(ITEMS), min_size=1, max_size=14),
    recency=st.booleans(),
    restrict=st.one_of(st.none(), st.sets(st.sampled_from(ITEMS), max_size=20)),
    n=st.integers(1, 30),
)
def test_numpy_item2item_equals_the_plain_loop(
    rows: dict[str, list[tuple[str, float]]],
    history: list[str],
    recency: bool,
    restrict: set[str] | None,
    n: int,
) -> None:
    sources = Sources(NoRedis(), 5.0)  # type: ignore[arg-type]
    vocab = sources.vocabulary("ns", "v1")
    for item in ITEMS:  # an item without a row has an empty one, as Redis answers
        pairs = rows.get(item, [])
        codes = vocab.encode([m for m, _ in pairs])
        vocab.rows.put(item, NeighbourRow(codes, np.array([s for _, s in pairs], np.float64)))
    model = Published(
        name="item2item", version="v1", params={"history_len": 10, "recency": recency}
    )
    out = asyncio.run(sources.item2item("ns", history, "v1", model, restrict, n))
    want_scores, want_because = plain_loop(history[-10:], rows, recency, restrict, n)
    assert list(out.scores.items()) == list(want_scores.items())
    because = out.because_of(out.scores) if out.because_of is not None else {}
    assert because == want_because
    # asked for a few of the items only (what the shortlist leaves), the same answers
    some = list(out.scores)[::3]
    if out.because_of is not None:
        assert out.because_of(some) == {i: want_because[i] for i in some}
