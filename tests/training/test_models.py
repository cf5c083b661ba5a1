"""Every model on tiny hand-made logs whose right answers are known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recstream.errors import ConfigurationError
from training.base import Model, RedisRecord
from training.data import InteractionLog, LogBuilder
from training.models import (
    ALS,
    MODELS,
    Blend,
    CategoryPopularity,
    ItemScorer,
    ItemToItem,
    Popularity,
    RecentlyViewed,
    SessionIndex,
    SessionKNN,
    Trending,
    UserSegmentation,
    fold_in,
    score_session,
    top_k,
    trend_scores,
)

T0 = 1_700_000_000.0
DAY = 86400.0
A = ["a1", "a2", "a3", "a4"]
B = ["b1", "b2", "b3", "b4"]


def clusters() -> InteractionLog:
    """Users u0..u5 only touch A items, v0..v5 only B items, each in one session, in a
    rotated order so every pair of a cluster co-occurs; category = the cluster."""
    builder = LogBuilder()
    t = T0
    for prefix, items in (("u", A), ("v", B)):
        for n in range(6):
            for step in range(4):
                item = items[(n + step) % 4]
                builder.add(f"{prefix}{n}", item, t, "view", category=prefix)
                t += 60
            t += DAY / 24
    return builder.build()


def alternating() -> InteractionLog:
    """clusters() with the A and B users taking turns, so both halves hold both clusters."""
    builder = LogBuilder()
    t = T0
    for n in range(6):
        for prefix, items in (("u", A), ("v", B)):
            for step in range(4):
                builder.add(f"{prefix}{n}", items[(n + step) % 4], t, "view", category=prefix)
                t += 60
            t += DAY / 24
    return builder.build()


def ids(recs: list[tuple[str, float]]) -> list[str]:
    return [item for item, _ in recs]


def test_top_k_is_deterministic_and_skips_non_candidates() -> None:
    scores = np.array([1.0, 3.0, -np.inf, 3.0, 2.0, np.nan])
    assert top_k(scores, 3).tolist() == [1, 3, 4]
    assert top_k(scores, 10).tolist() == [1, 3, 4, 0]
    assert top_k(np.full(3, -np.inf), 2).tolist() == []


def test_popularity_decay_and_categories() -> None:
    builder = LogBuilder({"view": 1.0, "purchase": 5.0})
    builder.add("u", "old", T0, "purchase", category="c1")  # 5, 10 days old
    builder.add("u", "new", T0 + 10 * DAY, "view", category="c1")
    builder.add("v", "new", T0 + 10 * DAY, "view")
    builder.add("v", "other", T0 + 10 * DAY, "view", category="c2")
    log = builder.build()
    plain = Popularity(half_life_days=None).fit(log)
    assert plain.recommend([], 3) == [("old", 5.0), ("new", 2.0), ("other", 1.0)]
    decayed = Popularity(half_life_days=5).fit(log)  # two half-lives: 5 -> 1.25
    assert decayed.recommend([], 2) == [("new", 2.0), ("old", 1.25)]
    assert ids(decayed.recommend_category("c1", 5)) == ["new", "old"]
    assert decayed.recommend_category("nope", 5) == []
    records = {r.suffix: r for r in decayed.redis_records()}
    assert records["top"].value == {"new": 2.0, "old": 1.25, "other": 1.0}
    assert records["top:cat:c2"].value == {"other": 1.0}


def test_trending_formula() -> None:
    recent, previous = np.array([4.0, 1.0, 0.0, 0.0]), np.array([0.0, 3.0, 2.0, 0.0])
    trend = trend_scores(recent, previous, 0.5)
    assert trend.tolist()[:3] == [6.0, 0.0, -1.0]
    assert trend[3] == -np.inf
    builder = LogBuilder()
    # "rising": 0 the day before, 3 in the last day; "falling": 3 then 1; "steady": 2 and 2
    for item, before, last in (("rising", 0, 3), ("falling", 3, 1), ("steady", 2, 2)):
        for n in range(before):
            builder.add(f"u{n}", item, T0 + DAY + 100 * n)
        for n in range(last):
            builder.add(f"v{n}", item, T0 + 2 * DAY + 100 * n)
    builder.add("w", "ancient", T0 - 30 * DAY)
    model = Trending(window_s=DAY, gamma=1.0).fit(builder.build())
    now = T0 + 3 * DAY
    recs = model.recommend([], 4, now=now)
    # rising 3 + 3 = 6, steady 2 + 0 = 2, falling 1 - 2 = -1, then the fallback by count
    assert ids(recs) == ["rising", "steady", "falling", "ancient"]
    assert [round(s) for _, s in recs[:3]] == [6, 2, -1]
    # at an earlier time only what came before counts
    assert ids(model.recommend([], 1, now=T0 + 2 * DAY)) == ["falling"]


def test_category_popularity_follows_the_recent_categories() -> None:
    builder = LogBuilder()
    for n, (item, category) in enumerate(
        [("s1", "shoes"), ("s1", "shoes"), ("s2", "shoes"), ("h1", "hats"), ("h2", "hats")]
    ):
        builder.add(f"u{n}", item, T0 + n, category=category)
    builder.add("late", "s3", T0 + 10, category="shoes")
    log = builder.build()
    train = log.select(log.timestamps < T0 + 10)  # s3 is never seen in training
    model = CategoryPopularity(decay=0.5, history_len=5).fit(train)
    # history h1 (older), s2 (newest): shoes affinity 1, hats 0.5; within shoes by count
    # (s1 twice: share 2/3; s2 once: 1/3); s3 unseen in training: not a candidate
    recs = model.recommend(["h1", "s2"], 10)
    assert ids(recs) == ["s1", "s2", "h1", "h2"]
    assert recs[0][1] == pytest.approx(1 + 2 / 3)
    assert recs[2][1] == pytest.approx(0.5 * (1 + 1 / 3))
    assert model.recommend([], 5) == []


def test_recently_viewed_orders_by_recency_and_repeats() -> None:
    model = RecentlyViewed(decay=0.5, history_len=10).fit(clusters())
    recs = model.recommend(["a1", "b1", "a1", "a2"], 5)
    # a2: 1; a1: 0.5 + 0.125 = 0.625; b1: 0.25
    assert recs == [("a2", 1.0), ("a1", 0.625), ("b1", 0.25)]
    assert model.recommend([], 5) == []
    skip_last = RecentlyViewed(decay=0.5, last_weight=0.1).fit(clusters())
    assert ids(skip_last.recommend(["a1", "b1", "a1", "a2"], 5)) == ["a1", "b1", "a2"]


@pytest.mark.parametrize("normalize", ["cosine", "bm25"])
@pytest.mark.parametrize("window", [0, 2])
def test_item2item_finds_the_cluster(normalize: str, window: int) -> None:
    model = ItemToItem(window=window, normalize=normalize, neighbours=3).fit(clusters())  # type: ignore[arg-type]
    neighbours = model.neighbours_of("a1", 10)
    assert set(ids(neighbours)) <= set(A) - {"a1"}
    assert len(neighbours) >= 2
    assert set(ids(model.recommend(["b2"], 10))) <= set(B) - {"b2"}
    records = {r.suffix: r for r in model.redis_records()}
    assert set(records) == {f"nbr:{i}" for i in A + B} | {"params"}


def test_item2item_cosine_by_hand() -> None:
    builder = LogBuilder()
    # x and y co-occur in two users, x and z in one; occurrences x 3, y 2, z 1
    for user, items in (("u1", "xy"), ("u2", "xy"), ("u3", "xz")):
        for step, item in enumerate(items):
            builder.add(user, item, T0 + step)
    model = ItemToItem(window=0).fit(builder.build())
    got = dict(model.neighbours_of("x", 5))
    assert got == pytest.approx({"y": 2 / np.sqrt(3 * 2), "z": 1 / np.sqrt(3 * 1)})


def test_item2item_shrink_demotes_a_pair_seen_once() -> None:
    builder = LogBuilder()
    # x and y co-occur in four users but y is everywhere (20 users); x and w once, and w
    # nowhere else: cosine puts w first (1/sqrt(5·1) > 4/sqrt(5·20)), on one user's evidence
    for u in range(20):
        builder.add(f"u{u}", "y", T0)
        if u < 4:
            builder.add(f"u{u}", "x", T0 + 1)
    builder.add("u20", "x", T0)
    builder.add("u20", "w", T0 + 1)
    plain = dict(ItemToItem(window=0).fit(builder.build()).neighbours_of("x", 5))
    assert plain == pytest.approx({"w": 1 / np.sqrt(5), "y": 4 / np.sqrt(100)})
    assert max(plain, key=plain.__getitem__) == "w"
    shrunk = dict(ItemToItem(window=0, shrink=5).fit(builder.build()).neighbours_of("x", 5))
    # each similarity times c/(c + 5): 4/9 for the pair seen four times, 1/6 for w's
    assert shrunk == pytest.approx({"w": 1 / np.sqrt(5) / 6, "y": 0.4 * 4 / 9})
    assert max(shrunk, key=shrunk.__getitem__) == "y"
    with pytest.raises(ConfigurationError, match="applies to normalize='cosine' only"):
        ItemToItem(normalize="bm25", shrink=5)


def test_session_knn_neighbours_and_published_index() -> None:
    log = clusters()
    model = SessionKNN(k=3, last_n=5).fit(log)
    recs = model.recommend(["a1", "a2"], 10)
    assert set(ids(recs)) == set(A)  # repeats included; never a B item
    blob = next(r for r in model.redis_records() if r.suffix == "index").value
    assert isinstance(blob, bytes)
    index = SessionIndex.from_bytes(blob)
    assert score_session(index, ["a1", "a2"], 10, neighbours=3, last_n=5) == recs
    assert score_session(index, ["unknown"], 10) == []
    by_user = SessionKNN(unit="user").fit(log)
    assert set(ids(by_user.recommend(["b3"], 10))) == set(B)


def test_session_knn_similarity_by_hand() -> None:
    builder = LogBuilder()
    for session, items in (("s1", "pq"), ("s2", "pr"), ("s3", "qrt")):
        for step, item in enumerate(items):
            builder.add(session, item, T0 + step, session=session)
    model = SessionKNN(k=2, last_n=2).fit(builder.build())
    # query [p, q]: weights p 1/2, q 1; s1 has both (1.5), s3 has q (1.0), s2 has p (0.5)
    # neighbours s1, s3: p 1.5, q 1.5 + 1.0, r 1.0, t 1.0
    assert dict(model.recommend(["p", "q"], 10)) == pytest.approx(
        {"q": 2.5, "p": 1.5, "r": 1.0, "t": 1.0}
    )


def test_als_recommends_the_cluster_and_fold_in_matches_implicit() -> None:
    log = clusters()
    model = ALS(factors=8, regularization=0.01, iterations=10, alpha=5.0).fit(log)
    assert set(ids(model.recommend([], 4, user_id="u0"))) == set(A)
    assert set(ids(model.recommend(["b1", "b2"], 4))) == set(B)  # a new user, folded in
    again = ALS(factors=8, regularization=0.01, iterations=10, alpha=5.0).fit(log)
    assert np.array_equal(again.item_factors, model.item_factors)  # seeded

    # fold-in reproduces implicit's own user step (up to its conjugate-gradient solver)
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    matrix = log.user_item_matrix()
    with threadpool_limits(limits=1, user_api="blas"):
        reference = AlternatingLeastSquares(
            factors=8,
            regularization=0.01,
            iterations=5,
            alpha=5.0,
            random_state=1,
            num_threads=1,
            use_cg=False,
        )
        reference.fit(matrix, show_progress=False)
        expected = reference.recalculate_user(0, matrix[0])
    codes = matrix[0].indices
    mine = fold_in(reference.item_factors, codes, 5.0 * matrix[0].data, 0.01)
    assert np.allclose(mine, np.asarray(expected).ravel(), rtol=1e-3, atol=1e-4)

    records = {r.suffix: r for r in model.redis_records()}
    factors = records["factors"].value
    assert isinstance(factors, dict)
    assert set(factors) == set(A + B)
    assert np.frombuffer(factors["a1"], "<f4").shape == (8,)
    assert isinstance(records["yty"].value, bytes)
    assert len(records["yty"].value) == 8 * 8 * 4


def test_segmentation_finds_the_users_of_a_cluster(tmp_path: Path) -> None:
    model = UserSegmentation(factors=8, regularization=0.01, iterations=10, alpha=5.0).fit(
        clusters()
    )
    assert {u for u, _ in model.users_for_item("a1", 6)} == {f"u{n}" for n in range(6)}
    assert {u for u, _ in model.users_for_category("v", 6)} == {f"v{n}" for n in range(6)}
    assert model.users_for_item("nope") == []
    out = tmp_path / "segments.jsonl"
    assert {u for u, _ in model.users_for_items(["b2", "b3"], 6)} == {f"v{n}" for n in range(6)}
    written = model.write_segments(
        out, items=["b1"], categories=["u"], attributes={"brand=x": ["a1", "a2"]}, n=3
    )
    assert written == 3
    import json

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["query"] == {"item_id": "b1"}
    assert {u["user_id"][0] for u in lines[0]["users"]} == {"v"}
    assert len(lines[0]["users"]) == 3
    assert lines[1]["query"] == {"category": "u"}
    assert lines[2]["query"] == {"attribute": "brand=x"}
    assert {u["user_id"][0] for u in lines[2]["users"]} == {"u"}
    model.save(tmp_path / "saved")
    saved_text = (tmp_path / "saved" / "segments.jsonl").read_text()
    saved = [json.loads(line) for line in saved_text.splitlines()]
    assert [line["query"] for line in saved] == [{"category": "u"}, {"category": "v"}]
    seg = {r.suffix for r in model.redis_records()}
    assert {"seg:cat:u", "seg:cat:v", "params"} <= seg


def test_blend_combines_normalised_components() -> None:
    log = clusters()
    # repeat alone ranks the history; item2item adds the rest of the cluster after it
    blend = Blend(
        weights={"recently_viewed": 1.0, "item2item": 0.1},
        components={"item2item": {"window": 0}},
    ).fit(log)
    recs = ids(blend.recommend(["a1", "a2"], 10))
    assert recs[:2] == ["a2", "a1"]
    assert set(recs[2:]) == {"a3", "a4"}
    assert {r.suffix for r in blend.redis_records()} == {"weights", "params"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    small = name in ("als", "segmentation")
    params: dict[str, Any] = {"factors": 4, "iterations": 3} if small else {}
    log = clusters()
    if name == "ranker":
        # the ranker learns from the later half's queries, which must share items with
        # the earlier half (in clusters() the later half is all of cluster B)
        params = {"min_data_in_leaf": 2, "trees": 5, "min_gain": -1.0}
        log = alternating()
    model: Model = MODELS[name](**params).fit(log)  # mypy checks the protocol
    model.save(tmp_path / name)
    loaded = MODELS[name].load(tmp_path / name)
    history = ["a1", "a2"]
    now = T0 + 30 * DAY
    assert loaded.recommend(history, 5, user_id="u1", now=now) == model.recommend(
        history, 5, user_id="u1", now=now
    )
    assert loaded.params() == model.params()
    original = list(model.redis_records())
    assert [r.suffix for r in loaded.redis_records()] == [r.suffix for r in original]
    assert all(isinstance(r, RedisRecord) for r in original)


def test_unfitted_and_misnamed_models_explain(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="fit"):
        Popularity().recommend([], 3)
    Popularity().fit(clusters()).save(tmp_path)
    with pytest.raises(ConfigurationError, match="popularity"):
        Trending.load(tmp_path)
    assert issubclass(Popularity, ItemScorer)


def test_als_folds_in_users_who_have_no_training_rows() -> None:
    log = clusters()
    newcomer = list(log.user_ids).index("v0")
    train = log.select(log.users != newcomer)  # v0 stays in the vocabulary, without rows
    model = ALS(factors=8, regularization=0.01, iterations=10, alpha=5.0).fit(train)
    recs = model.recommend(["b1", "b2"], 4, user_id="v0")
    assert set(ids(recs)) == set(B)  # folded in from the history, not a zero vector
