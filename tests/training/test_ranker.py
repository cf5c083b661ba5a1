"""The learned ranker: it fits, beats a trivial baseline, round-trips through files, its
request-time scoring is LightGBM's own, and serving builds exactly the features training
fitted it on (the same history through the agents' Redis window and serving's reader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from agents.state import RedisHotStore
from recstream.ranking import FeatureSpec, History, feature_matrix
from recstream.settings import Settings
from serving.pipeline.features import assemble
from serving.pipeline.state import read_state
from serving.pipeline.types import Candidate, RankContext
from streams.schema import Event
from training.data import InteractionLog, LogBuilder
from training.evaluate import NextView, SessionNextClick, evaluate_model, fit_for
from training.models import LearnedRanker, Popularity

T0 = 1_700_000_000.0
SMALL = {
    "candidates": 50,
    "trees": 30,
    "num_leaves": 7,
    "min_data_in_leaf": 5,
    "learning_rate": 0.1,
}


def cycles(sessions: int = 240, clusters: int = 12, size: int = 5) -> InteractionLog:
    """Sessions walk one cluster's items in order (c3-0 → c3-1 → …, wrapping): the next
    click follows from the last one, which popularity cannot know."""
    builder = LogBuilder()
    t = T0
    rng = np.random.default_rng(7)
    for s in range(sessions):
        cluster = int(rng.integers(clusters))
        start = int(rng.integers(size))
        for step in range(4):
            builder.add(f"s{s}", f"c{cluster}-{(start + step) % size}", t, session=f"s{s}")
            t += 30
        t += 600
    return builder.build()


def ranker(**params: object) -> LearnedRanker:
    return LearnedRanker(
        dataset="yoochoose",
        components={"recently_viewed": {}, "item2item": {"window": 2}, "popularity": {}},
        **{**SMALL, **params},  # type: ignore[arg-type]
    )


def test_the_ranker_fits_and_beats_popularity() -> None:
    log = cycles()
    protocol = SessionNextClick()
    train, test = protocol.split(log)
    queries = protocol.queries(train, test)
    assert len(queries) > 50
    learned = fit_for(ranker(min_gain=-1.0), train, test)
    assert isinstance(learned, LearnedRanker)
    assert learned.scorer == "lightgbm"
    assert learned.record["validation"]["queries"] > 10
    ours = evaluate_model(learned, queries)
    baseline = evaluate_model(Popularity().fit(train), queries)
    assert ours["hr@10"] > 0.9
    assert ours["hr@10"] > baseline["hr@10"] + 0.3
    assert ours["mrr@20"] > baseline["mrr@20"] + 0.3


def test_the_ranker_keeps_the_blend_unless_it_wins_by_min_gain() -> None:
    learned = ranker(min_gain=10.0).fit(cycles())  # NDCG@10 cannot gain 10
    assert learned.scorer == "blend"
    records = {r.suffix: r for r in learned.redis_records()}
    assert "booster" not in records  # serving keeps the linear blend
    params = records["params"].value
    assert isinstance(params, dict)
    assert params["scorer"] == b'"blend"'


def test_saved_and_loaded_ranker_scores_the_same(tmp_path: Path) -> None:
    log = cycles()
    protocol = SessionNextClick()
    train, test = protocol.split(log)
    queries = protocol.queries(train, test)[:20]
    learned = ranker(min_gain=-1.0).fit(train)
    learned.save(tmp_path / "ranker")
    loaded = LearnedRanker.load(tmp_path / "ranker")
    assert loaded.scorer == "lightgbm"
    for query in queries:
        np.testing.assert_array_equal(learned.score_query(query), loaded.score_query(query))


def test_request_time_scores_are_lightgbm_s_and_contributions_add_up() -> None:
    log = cycles()
    learned = ranker(min_gain=-1.0).fit(log)
    assert learned.ranking is not None
    protocol = SessionNextClick()
    train, test = protocol.split(log)
    query = protocol.queries(train, test)[0]
    _, matrix = learned.features(query)
    scores, parts = learned.ranking.predict(matrix)
    raw = learned.ranking.booster.predict(matrix, raw_score=True)
    np.testing.assert_allclose(scores, raw, rtol=1e-9, atol=1e-9)
    assert parts.shape == (matrix.shape[0], len(learned.ranking.sources) + 1)
    np.testing.assert_allclose(learned.ranking.base + parts.sum(axis=1), scores, atol=1e-9)
    assert np.abs(parts[:, :-1]).sum() > 0  # the sources explain something


def test_history_features_follow_the_issue_s_history_score() -> None:
    spec = FeatureSpec(("recently_viewed",), history_cap=10)
    now = T0 + 100
    history = History(
        ("a", "b", "a", "c"),  # newest first
        ("view", "add_to_cart", "view", "view"),
        np.array([now - 10, now - 20, now - 30, now - 4000]),
        np.array([1.0, 3.0, 1.0, 1.0]),
    )
    matrix = feature_matrix(spec, ["a", "b", "c", "z"], {}, history, now)
    column = {name: matrix[:, j] for j, name in enumerate(spec.names)}
    # a: positions 0 and 2, the very last item (demoted by 0.01)
    assert column["u:history"][0] == np.float64((1.0 + 0.8**2) * 0.01)
    assert column["u:history"][1] == 3.0 * 0.8  # b: an add-to-cart one step back
    assert column["u:last"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert column["u:count"].tolist() == [2.0, 1.0, 1.0, 0.0]
    assert column["u:n:add_to_cart"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert column["u:session"].tolist() == [2.0, 1.0, 0.0, 0.0]  # c is an older session
    assert np.isnan(column["u:age_s"][3])  # z was never seen
    assert column["u:age_s"][0] == 10.0
    assert column["h:length"].tolist() == [4.0] * 4
    assert np.isnan(column["score:recently_viewed"]).all()  # no source scores given


async def test_serving_builds_the_features_training_fitted_on(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """One user's events of several types, through the agents' Redis window and serving's
    state reader, against the training query's history from the log: same matrix."""
    ns = settings.namespace
    kinds = ["view", "view", "add_to_cart", "view", "like", "view", "purchase", "view"]
    items = ["a", "b", "a", "c", "b", "d", "a", "e"]
    builder = LogBuilder(weights=settings.event_weights)
    events = []
    t = T0
    for n, (item, kind) in enumerate(zip(items, kinds, strict=True)):
        builder.add("u1", item, t, event_type=kind)
        events.append(
            Event(
                namespace=ns,
                event_id=f"e{n}",
                event_type=kind,
                user_id="u1",
                item_id=item,
                timestamp=t,
            )
        )
        t += 700 if n != 3 else 4000  # a session break after the fourth event
    builder.add("u1", "f", t, event_type="view")  # the target
    log = builder.build()
    protocol = NextView()
    train, test = protocol.split(log, test_start=t - 1)
    [query] = protocol.queries(train, test)

    learned = LearnedRanker(
        dataset="taobao",
        components={"recently_viewed": {}, "popularity": {}},
        history_cap=6,  # shorter than the history: both sides must cut it alike
    )
    learned.item_ids, learned.user_ids = log.item_ids, log.user_ids
    for model in learned.models.values():
        model.fit(train)
    learned.fitted = True
    pool, offline = learned.features(query)

    await RedisHotStore(redis_client, settings).apply(events)
    state = await read_state(redis_client, ns, "u1", settings.window_size)
    candidates = [Candidate(item_id) for item_id in pool.ids]
    for source, column in pool.scores.items():
        for candidate, value in zip(candidates, column, strict=True):
            if not np.isnan(value):
                candidate.sources[source] = float(value)
    served = assemble(
        candidates, state.window, RankContext(), settings.weight, query.now, learned.spec
    )
    assert served.shape == offline.shape
    np.testing.assert_array_equal(np.isnan(served), np.isnan(offline))
    np.testing.assert_allclose(np.nan_to_num(served), np.nan_to_num(offline), rtol=1e-12)
    names = learned.spec.names
    row = pool.ids.index("a")
    assert served[row, names.index("u:n:purchase")] == 1.0  # the event types made it across
    # the cart and the purchase; the first view of "a" is beyond the cap of 6 events
    assert served[row, names.index("u:weight")] == 3.0 + 5.0
