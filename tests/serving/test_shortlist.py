"""The shortlist (serving/pipeline/shortlist.py) never changes what the linear blend serves."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.pipeline.candidates import SourceOutput, best
from serving.pipeline.rank import LinearBlend
from serving.pipeline.ranker import Ranker, _order
from serving.pipeline.shortlist import shortlist

SOURCES = ["recently_viewed", "item2item", "sknn", "popularity", "trending"]
items = st.sampled_from([f"i{n}" for n in range(60)])
# negative scores too (ALS fold-in has them), and ties
scores = st.dictionaries(
    items,
    st.one_of(st.floats(-5.0, 10.0, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5])),
    max_size=40,
)


def served(
    outputs: list[SourceOutput], weights: dict[str, float], seen: set[str], n: int
) -> list[str]:
    candidates = Ranker._merge(outputs)
    LinearBlend().score(candidates, weights)
    ranked = [c.item_id for c in sorted(candidates, key=_order) if c.item_id not in seen]
    return ranked[:n]


@settings(max_examples=300, deadline=None)
@given(
    lists=st.lists(scores, min_size=len(SOURCES), max_size=len(SOURCES)),
    weights=st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0, 2.0]), min_size=5, max_size=5),
    seen=st.sets(items, max_size=15),
    keep=st.integers(1, 30),
)
def test_the_blend_serves_the_same_top_items_from_the_shortlist(
    lists: list[dict[str, float]], weights: list[float], seen: set[str], keep: int
) -> None:
    outputs = [SourceOutput(name, dict(s)) for name, s in zip(SOURCES, lists, strict=True)]
    weight_of = dict(zip(SOURCES, weights, strict=True))
    cut = shortlist(outputs, weight_of, keep, seen)
    kept = {i for out in cut for i in out.scores}
    assert len(kept - seen) <= keep + len(SOURCES)  # the cut does cut
    # seen items excluded (policy "exclude"), or ranked with the rest ("keep")
    assert served(cut, weight_of, seen, keep) == served(outputs, weight_of, seen, keep)
    assert served(cut, weight_of, set(), keep) == served(outputs, weight_of, set(), keep)


def test_a_small_pool_is_left_alone() -> None:
    outputs = [SourceOutput("item2item", {"a": 1.0, "b": 0.5})]
    assert shortlist(outputs, {"item2item": 1.0}, 5, set()) == outputs


@settings(max_examples=300, deadline=None)
@given(
    scores=st.dictionaries(items, st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), max_size=60),
    n=st.integers(1, 70),
)
def test_best_keeps_the_top_n_by_score_then_id(scores: dict[str, float], n: int) -> None:
    # many ties on purpose: the ids must decide, also across the cut
    got = best(scores, n)
    if len(scores) <= n:
        assert got == scores
    else:
        assert list(got.items()) == sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
