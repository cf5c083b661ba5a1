"""Category popularity in numpy (serving/pipeline/candidates.py) scores and cuts exactly
as the plain loop does: the same floats, the same item per category, the same order."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recstream.decay import ForwardDecay
from serving.pipeline import codes
from serving.pipeline.candidates import DEFAULT_DECAY, Sources, best
from serving.pipeline.live import Rows

EPOCH = DEFAULT_DECAY.epoch_s
"""The clock at which the agents' forward-decayed lists are on training's scale."""

items = st.sampled_from([f"i{n}" for n in range(40)])
counts = st.one_of(st.floats(0.0, 500.0, allow_nan=False), st.sampled_from([1.0, 2.0, 7.0]))
category_lists = st.dictionaries(
    st.sampled_from(["Drama", "Comedy", "Action", "Horror", "War"]),
    st.dictionaries(items, counts, max_size=30).map(
        lambda d: sorted(d.items(), key=lambda kv: -kv[1])
    ),
    min_size=1,
    max_size=5,
)


def plain(
    affinity: dict[str, float],
    lists: dict[str, list[tuple[str, float]]],
    n: int,
    restrict: set[str] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The loop the arrays replace, as it was written (with `_keep`'s two cuts)."""
    top = max(s for rows in lists.values() for _, s in rows[:1])
    scores: dict[str, float] = {}
    category: dict[str, str] = {}
    for name, rows in lists.items():
        for item, count in rows:
            score = affinity[name] * (1.0 + count / (top + 1.0))
            if score > scores.get(item, -math.inf):
                scores[item] = score
                category[item] = name
    if restrict is not None:
        kept = {i: s for i, s in scores.items() if i in restrict}
    else:
        kept = best(scores, n)
    return kept, {i: category[i] for i in kept}


@settings(max_examples=300, deadline=None)
@given(
    lists=category_lists.filter(lambda ls: all(ls.values())),
    weights=st.lists(st.sampled_from([0.5, 1.0, 1.8, 2.25]), min_size=5, max_size=5),
    n=st.integers(1, 60),
    restrict=st.sets(items, max_size=30),
)
def test_category_popularity_in_arrays_equals_the_loop(
    lists: dict[str, list[tuple[str, float]]], weights: list[float], n: int, restrict: set[str]
) -> None:
    affinity = dict(zip(lists, weights, strict=False))
    sources = Sources(None, 1.0)  # type: ignore[arg-type]  # (no Redis read here)
    live = {name: Rows(rows) for name, rows in lists.items()}
    out = sources._category_scores(affinity, live, len(live), EPOCH, False, None, None, n)
    scores, category = plain(affinity, lists, n)
    assert list(out.scores.items()) == list(scores.items())  # values, and order
    assert out.category == category
    # once more from the arrays kept with the lists: the same
    again = sources._category_scores(affinity, live, len(live), EPOCH, False, None, None, n)
    assert list(again.scores.items()) == list(scores.items())
    # restricted (re-ranking): every given item it scores, in order of first sight
    restricted = sources._category_scores(
        affinity, live, len(live), EPOCH, False, None, set(scores), n
    )
    assert restricted.scores == {i: s for i, s in scores.items()}
    out = sources._category_scores(affinity, live, len(live), EPOCH, False, None, restrict, n)
    scores, category = plain(affinity, lists, n, restrict)
    assert list(out.scores.items()) == list(scores.items())
    assert out.category == category


def test_a_full_numbering_is_replaced_and_the_lists_coded_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a numbering that fills up while the lists are coded: the next call replaces it and
    # codes the lists (whose arrays are kept by the full one) again; the answer is still
    # the loop's
    monkeypatch.setattr(codes, "MAX_CODES", 15)  # full after the first list
    lists = {
        "Drama": [(f"d{n}", float(40 - n)) for n in range(20)],
        "Comedy": [(f"c{n}", float(30 - n)) for n in range(20)] + [("d3", 29.5)],
    }
    affinity = {"Drama": 1.0, "Comedy": 1.5}
    sources = Sources(None, 1.0)  # type: ignore[arg-type]
    live = {name: Rows(rows) for name, rows in lists.items()}
    first = sources.interner
    out = sources._category_scores(affinity, live, len(live), EPOCH, False, None, None, 30)
    scores, category = plain(affinity, lists, 30)
    assert list(out.scores.items()) == list(scores.items())
    assert out.category == category
    assert first.full
    again = sources._category_scores(affinity, live, len(live), EPOCH, False, None, None, 30)
    assert sources._interner is not first  # replaced
    assert all(
        rows.table is not None and rows.table.interner is sources._interner
        for rows in live.values()
    )  # coded again by the new one
    assert list(again.scores.items()) == list(scores.items())
    assert again.category == category


def test_live_lists_are_brought_to_the_published_scale_at_the_request_s_time() -> None:
    """The agents' lists hold Σ w·2^((t - epoch)/half-life), the published ones training's
    decayed counts: the live ones are multiplied by 2^((epoch - clock)/half-life) before
    they meet the published ones (and the learned ranker) in one formula."""
    decay = ForwardDecay(epoch_s=0.0, half_life_s=10.0, tick_s=1.0)
    sources = Sources(None, 1.0, decay=decay)  # type: ignore[arg-type]
    clock = 100.0  # ten half-lives: a factor of 2^-10
    counts = {"Drama": [("d1", 8.0), ("d2", 4.0)], "Comedy": [("c1", 6.0)]}
    live = {"Drama": Rows([(i, c * 2.0**10) for i, c in counts["Drama"]])}
    lists: dict[str, list[tuple[str, float]]] = {**live, "Comedy": counts["Comedy"]}
    affinity = {"Drama": 1.0, "Comedy": 1.2}
    out = sources._category_scores(affinity, lists, 1, clock, True, None, None, 10)
    expected, category = plain(affinity, counts, 10)
    assert out.scores == pytest.approx(expected, rel=1e-12)
    assert list(out.scores) == list(expected)
    assert out.category == category
    # unscaled, the live counts (2^10 larger) would take the top share from Comedy's
    wrong, _ = plain(affinity, {**counts, "Drama": list(live["Drama"])}, 10)
    assert max(expected, key=expected.__getitem__) == "c1"
    assert max(wrong, key=wrong.__getitem__) == "d1"
