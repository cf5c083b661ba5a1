"""The learned ranker in the served pipeline, on real Redis and moto's S3 with the models
published through training's real publish path: a published ``ranker`` version ranks
(the debug view names it), its scores are the booster's on the features serving built,
every shown item is explained, and rolling the ranker back to a version that chose the
blend brings the linear blend back."""

from __future__ import annotations

import numpy as np

from recstream.keys import Keys
from recstream.settings import Settings
from serving.pipeline.rank import LinearBlend
from tests.conftest import LocalStack, make_settings
from tests.serving.helpers import ROOMY, apply, event, fitted, publish, ranker_for
from training.data import InteractionLog, LogBuilder
from training.models import LearnedRanker
from training.publish import open_registry

T0 = 1_700_000_000.0
COMPONENTS: dict[str, dict[str, object]] = {
    "recently_viewed": {"decay": 0.7},
    "item2item": {"window": 3},
    "popularity": {"half_life_days": None},
}
REASONS = {"recently_interacted", "popular"}


def clusters(users: int = 30) -> InteractionLog:
    """Users browse one of two clusters in order (a1 → a2 → …), a few views each, over
    two days, so the ranker has validation queries to learn from."""
    builder = LogBuilder()
    t = T0
    for n in range(users):
        prefix = "a" if n % 2 else "b"
        for step in range(5):
            builder.add(f"u{n}", f"{prefix}{(n + step) % 5 + 1}", t, category=prefix)
            t += 60
        t += 3 * 3600
    return builder.build()


def learned(log: InteractionLog, min_gain: float) -> LearnedRanker:
    return LearnedRanker(
        dataset="taobao",
        components=COMPONENTS,
        candidates=50,
        trees=20,
        num_leaves=7,
        min_data_in_leaf=3,
        min_gain=min_gain,
    ).fit(log)


def roomy(local_stack: LocalStack) -> Settings:
    return make_settings(local_stack, **ROOMY)  # type: ignore[arg-type]


async def test_a_published_ranker_ranks_and_explains(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    log = clusters()
    models = fitted(log)
    ranker = learned(log, min_gain=-1.0)  # always the booster, whatever it measured
    assert ranker.scorer == "lightgbm"
    assert ranker.ranking is not None
    await publish(settings, [*models.values(), ranker], log)
    await apply(
        settings,
        [event(1, "newbie", "a1", ns, "click"), event(2, "newbie", "a2", ns, "add_to_cart")],
    )
    async with ranker_for(settings) as pipeline:
        await pipeline.warm(ns)
        result = await pipeline.recommend(ns, "newbie", 10, debug=True)
    assert result.degraded == []
    assert result.debug is not None
    version = result.debug["versions"]["ranker"]
    assert result.debug["scorer"] == f"ranker@{version}"
    # only the ranker's own sources ran (popularity always does)
    assert set(result.debug["sources"]) == {"recently_viewed", "item2item", "popularity"}
    shown = result.debug["candidates"]
    assert shown
    # the served scores are the booster's on the features serving built (the shared spec)
    spec = ranker.spec
    for entry in shown:
        assert entry["contributions"], entry  # every shown item is explained
        assert set(entry["reasons"]) <= REASONS | {"similar_to:a1", "similar_to:a2"}
    matrix = np.array([[c["features"].get(name, np.nan) for name in spec.names] for c in shown])
    expected = ranker.ranking.predict(matrix)[0]
    np.testing.assert_allclose([c["score"] for c in shown], expected, atol=1e-5)
    # the seen items carry their history features, and the ranker credits them
    a2 = next(c for c in shown if c["item_id"] == "a2")
    assert a2["features"]["u:n:add_to_cart"] == 1.0
    assert a2["features"]["u:last"] == 1.0
    assert "recently_viewed" in a2["contributions"]


async def test_rolling_the_ranker_back_brings_the_blend_back(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    log = clusters()
    models = fitted(log)
    # a first run where the booster did not beat the blend, then one where it did
    kept_blend = learned(log, min_gain=10.0)
    assert kept_blend.scorer == "blend"
    await publish(settings, [*models.values(), kept_blend], log)
    await publish(settings, [learned(log, min_gain=-1.0)], log)
    await apply(settings, [event(1, "newbie", "b1", ns, "click")])
    async with ranker_for(settings) as pipeline:
        assert isinstance(pipeline.scorer, LinearBlend)
        first = await pipeline.recommend(ns, "newbie", 5, debug=True)
        assert first.debug is not None
        assert first.debug["scorer"].startswith("ranker@")

        async with open_registry(settings) as registry:
            back = await registry.rollback("ranker")
        assert back == (await _pointer(settings))
        # a new version loads in the background while the one in memory serves: wait
        await pipeline.warm(ns)
        second = await pipeline.recommend(ns, "newbie", 5, debug=True)
        assert second.debug is not None
        blend_version = second.debug["versions"]["blend"]
        assert second.debug["versions"]["ranker"] == back
        assert second.debug["scorer"] == f"blend@{blend_version}"
        assert second.items  # the blend answers
        for item in second.items:
            assert item.reasons


async def _pointer(settings: Settings) -> str:
    import redis.asyncio as aioredis

    client = aioredis.from_url(settings.redis_url)
    try:
        raw = await client.get(Keys(settings.namespace).model_pointer("ranker"))
    finally:
        await client.aclose()
    assert raw is not None
    return raw.decode() if isinstance(raw, bytes) else str(raw)
