"""The shortlist (serving/pipeline/shortlist.py) never changes what the linear blend serves."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from recstream.settings import SeenPolicy
from serving.pipeline.candidates import SourceOutput, best
from serving.pipeline.rank import LinearBlend
from serving.pipeline.ranker import Ranker, _order
from serving.pipeline.seen import apply_seen
from serving.pipeline.shortlist import shortlist

POLICIES: list[SeenPolicy] = ["keep", "demote", "exclude"]
SOURCES = ["recently_viewed", "item2item", "sknn", "popularity", "trending"]
items = st.sampled_from([f"i{n}" for n in range(60)])
# negative scores too (ALS fold-in has them), and ties
scores = st.dictionaries(
    items,
    st.one_of(st.floats(-5.0, 10.0, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5])),
    max_size=40,
)
source_lists = st.lists(scores, min_size=len(SOURCES), max_size=len(SOURCES))
"""One score list per source."""
source_weights = st.lists(
    st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0, 2.0]), min_size=len(SOURCES), max_size=len(SOURCES)
)
"""One blend weight per source."""


def served(
    outputs: list[SourceOutput],
    weights: dict[str, float],
    seen: set[str],
    n: int,
    policy: SeenPolicy = "exclude",
) -> list[str]:
    candidates = Ranker._merge(outputs)
    for candidate in candidates:
        candidate.seen = candidate.item_id in seen
    LinearBlend().score(candidates, weights)
    return [c.item_id for c in apply_seen(sorted(candidates, key=_order), policy, ())][:n]


@settings(max_examples=300, deadline=None)
@given(
    lists=source_lists,
    weights=source_weights,
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
    # with no policy the seen items are kept: any policy applied after serves the same
    for policy in POLICIES:
        assert served(cut, weight_of, seen, keep, policy) == served(
            outputs, weight_of, seen, keep, policy
        )
    assert served(cut, weight_of, set(), keep) == served(outputs, weight_of, set(), keep)


@settings(max_examples=300, deadline=None)
@given(
    lists=source_lists,
    weights=source_weights,
    seen=st.sets(items, max_size=40),
    keep=st.integers(1, 30),
    policy=st.sampled_from(POLICIES),
)
def test_a_policy_aware_shortlist_serves_the_same_and_keeps_fewer_seen_items(
    lists: list[dict[str, float]],
    weights: list[float],
    seen: set[str],
    keep: int,
    policy: SeenPolicy,
) -> None:
    outputs = [SourceOutput(name, dict(s)) for name, s in zip(SOURCES, lists, strict=True)]
    weight_of = dict(zip(SOURCES, weights, strict=True))
    cut = shortlist(outputs, weight_of, keep, seen, policy)
    kept = {i for out in cut for i in out.scores}
    pool = {i for out in outputs for i in out.scores}
    if len(pool) > keep:
        # every source's top item may be kept besides the `keep` best (the scales)
        assert len(kept) <= keep + len(SOURCES) or (
            policy == "demote" and len(kept - seen) < keep + len(SOURCES)
        )
    assert served(cut, weight_of, seen, keep, policy) == served(
        outputs, weight_of, seen, keep, policy
    )


def test_the_seen_items_are_cut_when_the_policy_never_shows_them() -> None:
    # ten unseen items beat nothing seen: under "exclude" no seen item is needed, and
    # under "demote" the two best unseen fill the two places
    unseen = {f"u{n}": 1.0 + n for n in range(10)}
    seen = {f"s{n}": 0.5 + n for n in range(10)}
    outputs = [SourceOutput("item2item", {**unseen, **seen})]
    for policy in ("exclude", "demote"):
        cut = shortlist(outputs, {"item2item": 1.0}, 2, set(seen), policy)
        assert set(cut[0].scores) == {"u9", "u8"}
    cut = shortlist(outputs, {"item2item": 1.0}, 2, set(seen), "keep")
    assert set(cut[0].scores) == {"s9", "u9"}  # 9.5 and 10.0: seen ones compete
    assert set(seen) <= set(shortlist(outputs, {"item2item": 1.0}, 2, set(seen))[0].scores)


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
