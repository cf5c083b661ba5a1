"""The shortlist (serving/pipeline/shortlist.py) never changes what the linear blend serves."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from itertools import chain, islice

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recstream.settings import SeenPolicy
from serving.pipeline.candidates import SourceOutput, Sources, best
from serving.pipeline.codes import Interner
from serving.pipeline.rank import LinearBlend
from serving.pipeline.ranker import Ranker, _order
from serving.pipeline.seen import apply_seen
from serving.pipeline.shortlist import _top, shortlist

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


# --- the compiled shortlist against the plain Python it replaced ---------------------------
# (session 11's `shortlist`, dictionaries and numpy, kept here as the reference: the
# compiled one must give the very same dictionaries, in the same order)


def reference(
    outputs: Sequence[SourceOutput],
    weights: Mapping[str, float],
    keep: int,
    seen: Collection[str],
    policy: SeenPolicy | None = None,
) -> list[tuple[str, list[tuple[str, float]], dict[str, str]]]:
    pool = dict.fromkeys(chain.from_iterable(out.scores for out in outputs))
    if len(pool) <= keep:
        return [(o.name, list(o.scores.items()), o.category) for o in outputs]
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
        first = int(magnitudes.argmax())
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
        unseen[seen_rows] = False
    popularity: Mapping[str, float] = next(
        (out.scores for out in outputs if out.name == "popularity"), {}
    )
    ids = list(pool)
    allowed = np.flatnonzero(blended & unseen)
    if len(allowed) > keep:
        values = blend[allowed]
        nth = np.partition(values, len(values) - keep)[len(values) - keep]
        allowed = allowed[values >= nth]
    contenders = dict(zip([ids[i] for i in allowed.tolist()], blend[allowed].tolist(), strict=True))
    chosen = _top(contenders, popularity, keep)
    if len(chosen) < keep:
        rest = [ids[i] for i in np.flatnonzero(~blended & unseen).tolist()]
        chosen += _top({i: popularity.get(i, 0.0) for i in rest}, {}, keep - len(chosen))
    kept = anchors.union(chosen)
    if policy is None or (policy == "demote" and len(chosen) < keep):
        kept.update(ids[i] for i in seen_rows)
    order = sorted(kept, key=index.__getitem__)
    return [
        (
            out.name,
            [(i, out.scores[i]) for i in order if i in out.scores],
            {i: out.category[i] for i in order if i in out.category},
        )
        for out in outputs
    ]


def _coded(out: SourceOutput, interner: Interner, groups: bool) -> SourceOutput:
    """``out`` as a source that made arrays hands it over (the table, and the categories
    as groups when ``groups``)."""
    table = Sources.table(list(out.scores.items()), interner)
    if not groups:
        return SourceOutput(out.name, origin=out.origin, table=table)
    names = sorted({f"c{len(i) % 3}" for i in out.scores})
    index = np.array([names.index(f"c{len(i) % 3}") for i in out.scores], dtype=np.intp)
    return SourceOutput(out.name, origin=out.origin, table=table, groups=(names, index))


@settings(max_examples=400, deadline=None)
@given(
    lists=source_lists,
    weights=source_weights,
    seen=st.sets(items, max_size=30),
    keep=st.integers(1, 30),
    policy=st.sampled_from([*POLICIES, None]),
    coded=st.lists(st.booleans(), min_size=len(SOURCES), max_size=len(SOURCES)),
)
def test_the_compiled_shortlist_gives_the_references_very_dictionaries(
    lists: list[dict[str, float]],
    weights: list[float],
    seen: set[str],
    keep: int,
    policy: SeenPolicy | None,
    coded: list[bool],
) -> None:
    interner = Interner()
    interner.encode(sorted(seen))  # (seen items the pool lacks are numbered too)
    plain = [SourceOutput(name, dict(s)) for name, s in zip(SOURCES, lists, strict=True)]
    given_outputs = [
        _coded(out, interner, groups=n % 2 == 0) if c else out
        for n, (out, c) in enumerate(zip(plain, coded, strict=True))
    ]
    expected = reference(
        given_outputs, dict(zip(SOURCES, weights, strict=True)), keep, seen, policy
    )
    cut = shortlist(
        given_outputs, dict(zip(SOURCES, weights, strict=True)), keep, seen, policy, interner
    )
    got = [(o.name, list(o.scores.items()), o.category) for o in cut]
    assert got == expected
