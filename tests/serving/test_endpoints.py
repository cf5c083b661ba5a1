"""The ranking endpoints on a real uvicorn server, real Redis and moto: every request
kind, clear 4xx errors, and a paused Redis answered with a degraded list, never a 500."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from recstream import stack
from recstream.keys import Keys
from tests.conftest import LocalStack, RunningApi, make_settings, serve_in_thread
from tests.serving.helpers import ROOMY, apply, event, fitted, get, post, publish, two_clusters


@pytest.fixture
def roomy_api(local_stack: LocalStack) -> Iterator[RunningApi]:
    """The API with budgets a loaded test machine never misses."""
    from serving.app import create_app

    overrides: dict[str, Any] = dict(ROOMY)
    settings = make_settings(local_stack, **overrides)
    port = stack.free_port()
    with serve_in_thread(create_app(settings), port):
        yield RunningApi(url=f"http://127.0.0.1:{port}", settings=settings)


async def published_api(api: RunningApi) -> None:
    log = two_clusters()
    await publish(api.settings, fitted(log).values(), log)


def ids(body: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in body["items"]]


async def test_a_user_with_history(roomy_api: RunningApi) -> None:
    ns = roomy_api.settings.namespace
    await published_api(roomy_api)
    await apply(
        roomy_api.settings, [event(n, "regular", i, ns) for n, i in enumerate(["a1", "a2"])]
    )
    response = await get(roomy_api.url, "/v1/recommendations", user_id="regular", num_results="6")
    assert response.status_code == 200
    body = response.json()
    assert body["degraded"] == []
    assert body["actor"] == "regular"
    assert set(ids(body)[:4]) == {"a1", "a2", "a3", "a4"}
    reasons = {r for item in body["items"] for r in item["reasons"]}
    assert {"recently_interacted", "session_neighbours", "als"} <= reasons
    assert any(r.startswith("similar_to:") for r in reasons)
    assert set(body) == {"recommendation_id", "namespace", "actor", "items", "degraded", "took_ms"}


async def test_a_brand_new_user_with_two_live_clicks(roomy_api: RunningApi) -> None:
    ns = roomy_api.settings.namespace
    await published_api(roomy_api)
    await apply(
        roomy_api.settings,
        [event(1, "fresh", "b1", ns, "click"), event(2, "fresh", "b2", ns, "click")],
    )
    body = (
        await get(roomy_api.url, "/v1/recommendations", user_id="fresh", num_results="4")
    ).json()
    assert body["degraded"] == []
    assert set(ids(body)) == {"b1", "b2", "b3", "b4"}  # the cluster the clicks are in
    metrics = (await get(roomy_api.url, "/metrics")).text
    assert "recstream_freshness_seconds_count" in metrics


async def test_an_anonymous_session_and_the_namespaced_path(roomy_api: RunningApi) -> None:
    ns = roomy_api.settings.namespace
    await published_api(roomy_api)
    await apply(roomy_api.settings, [event(1, "session:s-1", "a3", ns, "click")])
    response = await get(roomy_api.url, f"/v1/{ns}/recommendations", session_id="s-1")
    body = response.json()
    assert body["actor"] == "session:s-1"
    assert ids(body)[0] == "a3"
    assert body["degraded"] == []


async def test_a_session_that_logged_in_reads_the_users_history(roomy_api: RunningApi) -> None:
    """After a login the agents stitch the session into the user (agents/identity.py) and
    record the alias; the session's requests then read the user's window."""
    ns = roomy_api.settings.namespace
    await published_api(roomy_api)
    await apply(roomy_api.settings, [event(1, "session:s-2", "a3", ns, "click")])
    await apply(roomy_api.settings, [event(2, "alice", "b1", ns, "click")])
    before = (await get(roomy_api.url, "/v1/recommendations", session_id="s-2")).json()
    assert before["actor"] == "session:s-2"
    redis = aioredis.from_url(roomy_api.settings.redis_url)
    try:
        await redis.set(Keys(ns).alias("s-2"), "alice")
    finally:
        await redis.aclose()
    after = (await get(roomy_api.url, "/v1/recommendations", session_id="s-2")).json()
    assert after["actor"] == "alice"
    assert ids(after)[0] == "b1"
    # an explicit user id is never replaced
    mine = (await get(roomy_api.url, "/v1/recommendations", user_id="bob", session_id="s-2")).json()
    assert mine["actor"] == "bob"


async def test_an_empty_install_answers_every_endpoint(roomy_api: RunningApi) -> None:
    url = roomy_api.url
    for response in (
        await get(url, "/v1/recommendations", user_id="nobody"),
        await post(url, "/v1/recommendations", {"session_id": "s"}),
        await get(url, "/v1/related-items", item_id="nothing"),
        await post(url, "/v1/personalized-ranking", {"user_id": "u", "item_ids": ["x", "y"]}),
        await get(url, "/v1/trending", window="1h"),
    ):
        assert response.status_code == 200, response.text
        assert response.json()["degraded"] == []
    ranked = await post(url, "/v1/personalized-ranking", {"user_id": "u", "item_ids": ["x", "y"]})
    assert ids(ranked.json()) == ["x", "y"]


async def test_post_with_context_and_the_debug_view(roomy_api: RunningApi) -> None:
    ns = roomy_api.settings.namespace
    await published_api(roomy_api)
    await apply(roomy_api.settings, [event(1, "dbg", "a1", ns)])
    response = await post(
        roomy_api.url,
        "/v1/recommendations",
        {
            "user_id": "dbg",
            "num_results": 3,
            "exclude": ["a2"],
            "context": {"device": "mobile", "hour": "7"},
            "debug": True,
        },
    )
    body = response.json()
    assert response.status_code == 200
    assert "a2" not in ids(body)
    debug = body["debug"]
    assert debug["context"] == {"values": {"device": "mobile", "hour": "7"}, "hour": 7}
    first = debug["candidates"][0]
    assert first["item_id"] == body["items"][0]["item_id"]
    assert first["features"]["ctx:device:mobile"] == 1.0
    assert first["features"]["ctx:hour"] == 7.0
    assert set(first["sources"]) >= {"recently_viewed"}
    assert first["sources"]["recently_viewed"]["rank"] == 1
    assert set(debug["versions"]) >= {"item2item", "als", "sknn", "blend", "popularity"}
    # GET: context.* parameters, debug=true
    got = await get(
        roomy_api.url,
        "/v1/recommendations",
        user_id="dbg",
        debug="true",
        **{"context.device": "tv"},
    )
    assert got.json()["debug"]["context"]["values"] == {"device": "tv"}
    assert "debug" not in (await get(roomy_api.url, "/v1/recommendations", user_id="dbg")).json()


async def test_related_items_and_an_unknown_item(roomy_api: RunningApi) -> None:
    await published_api(roomy_api)
    body = (await get(roomy_api.url, "/v1/related-items", item_id="b2", num_results="3")).json()
    assert set(ids(body)) == {"b1", "b3", "b4"}
    assert "similar_to:b2" in body["items"][0]["reasons"]
    unknown = await get(roomy_api.url, "/v1/related-items", item_id="no-such-item")
    assert unknown.status_code == 200
    assert ids(unknown.json())[0] == "hit"
    assert unknown.json()["items"][0]["reasons"] == ["popular"]


async def test_personalized_ranking_returns_every_item_once(roomy_api: RunningApi) -> None:
    ns = roomy_api.settings.namespace
    await published_api(roomy_api)
    await apply(roomy_api.settings, [event(1, "ranker", "b1", ns), event(2, "ranker", "b2", ns)])
    given = ["a1", "b3", "unknown", "hit", "b3", "a4"]
    response = await post(
        roomy_api.url, "/v1/personalized-ranking", {"user_id": "ranker", "item_ids": given}
    )
    body = response.json()
    assert response.status_code == 200
    assert sorted(ids(body)) == sorted(set(given))
    assert ids(body)[0] == "b3"  # the user's cluster first
    assert ids(body)[-1] == "unknown"  # nothing scores it: last, in the given order


async def test_trending_from_the_agents_keys(roomy_api: RunningApi) -> None:
    keys = Keys(roomy_api.settings.namespace)
    client = aioredis.from_url(roomy_api.settings.redis_url)
    try:
        await client.zadd(keys.trending("24h"), {"x": 3.0, "y": 7.0})
        await client.zadd(keys.trending("24h", "shoes"), {"boot": 1.5})
    finally:
        await client.aclose()
    day = (await get(roomy_api.url, "/v1/trending")).json()
    assert ids(day) == ["y", "x"]
    assert day["items"][0]["reasons"] == ["trending"]
    shoes = (await get(roomy_api.url, "/v1/trending", window="24h", category="shoes")).json()
    assert ids(shoes) == ["boot"]


async def test_bad_requests_say_what_to_fix(roomy_api: RunningApi) -> None:
    url = roomy_api.url
    missing = await get(url, "/v1/recommendations")
    assert missing.status_code == 422
    assert "user_id" in missing.json()["error"]["message"]
    bad = await get(url, "/v1/recommendations", user_id="u", num_results="lots")
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "bad_num_results"
    too_many = await get(url, "/v1/recommendations", user_id="u", num_results="501")
    assert too_many.json()["error"]["code"] == "bad_num_results"
    typo = await get(url, "/v1/recommendations", user_id="u", num_result="5")
    assert typo.status_code == 422
    assert typo.json()["error"]["code"] == "unknown_parameter"
    assert "num_result" in typo.json()["error"]["message"]
    window = await get(url, "/v1/trending", window="7d")
    assert window.json()["error"]["code"] == "bad_window"
    no_item = await get(url, "/v1/related-items")
    assert no_item.json()["error"]["code"] == "bad_item_id"
    no_items = await post(url, "/v1/personalized-ranking", {"user_id": "u", "item_ids": []})
    assert no_items.json()["error"]["code"] == "bad_item_ids"
    async with httpx.AsyncClient(base_url=url) as client:
        garbage = await client.post("/v1/recommendations", content=b"{not json")
    assert garbage.status_code == 422
    assert garbage.json()["error"]["code"] == "malformed_body"
    unknown = await get(url, "/v1/recommendations", user_id="u", filter="no-such-filter")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "filter_not_found"


async def block_redis(url: str, seconds: float) -> None:
    """Keep redis-server busy for ``seconds`` from another connection. A busy Lua script
    blocks the server exactly like ``DEBUG SLEEP``, which Redis 7 disables by default;
    after ``lua-time-limit`` (5 s) other clients get BUSY errors instead of waiting, which
    the API must degrade on just the same."""
    client = aioredis.from_url(url, socket_timeout=seconds + 30)
    try:
        await client.eval(
            "local s = redis.call('TIME') local t0 = s[1] + s[2] / 1e6 "
            "while true do local n = redis.call('TIME') "
            "if n[1] + n[2] / 1e6 - t0 > tonumber(ARGV[1]) then break end end return 1",
            0,
            seconds,
        )
    finally:
        await client.aclose()


async def test_a_paused_redis_gives_a_degraded_answer_not_a_hang(api: RunningApi) -> None:
    # The default budget (50 ms) on purpose: the request must not wait for Redis.
    ns = api.settings.namespace
    await apply(api.settings, [event(1, "patient", "p1", ns)])
    assert (await get(api.url, "/v1/recommendations", user_id="patient")).status_code == 200
    blocker = asyncio.create_task(block_redis(api.settings.redis_url, 8.0))
    await asyncio.sleep(0.2)  # the script is running
    try:
        # concurrently, so all four are asked while Redis is paused even on a slow machine
        responses = await asyncio.gather(
            get(api.url, "/v1/recommendations", user_id="patient"),
            get(api.url, "/v1/related-items", item_id="p1"),
            post(api.url, "/v1/personalized-ranking", {"user_id": "p", "item_ids": ["a"]}),
            get(api.url, "/v1/trending"),
        )
        finished_early = not blocker.done()
    finally:
        await blocker
    assert finished_early, "Redis was not paused for all requests; lengthen the pause"
    for response in responses:
        assert response.status_code == 200, response.text
    degraded = [set(r.json()["degraded"]) for r in responses]
    assert "window" in degraded[0]
    assert "models" in degraded[1]
    assert "window" in degraded[2]
    assert "models" in degraded[3]
    assert ids(responses[2].json()) == ["a"]


async def test_as_of_ranks_for_the_given_time(roomy_api: RunningApi) -> None:
    """A replay asks as of each logged event's time: the features' ages and the hour
    count from ``as_of``, not from the server's clock; a bad time is a 422 with its fix."""
    ns = roomy_api.settings.namespace
    await published_api(roomy_api)
    then = 1_400_000_000.0  # 2014-05-13 16:53:20 UTC
    await apply(roomy_api.settings, [event(1, "replayed", "a1", ns, timestamp=then)])
    body = {"user_id": "replayed", "num_results": 3, "debug": True}
    asked = (await post(roomy_api.url, "/v1/recommendations", {**body, "as_of": then + 90})).json()
    now = (await post(roomy_api.url, "/v1/recommendations", body)).json()
    assert asked["debug"]["context"]["hour"] == 16
    [seen] = [c for c in asked["debug"]["candidates"] if c["item_id"] == "a1"]
    assert seen["features"]["u:age_s"] == 90.0
    [later] = [c for c in now["debug"]["candidates"] if c["item_id"] == "a1"]
    assert later["features"]["u:age_s"] > 365 * 86_400
    ranked = await post(
        roomy_api.url,
        "/v1/personalized-ranking",
        {"user_id": "replayed", "item_ids": ["a1", "a2"], "as_of": "2014-05-13T17:00:00Z",
         "debug": True},
    )  # fmt: skip
    assert ranked.status_code == 200
    assert ranked.json()["debug"]["context"]["hour"] == 17
    for bad in ("soon", then * 1000, 12.0):
        refused = await get(
            roomy_api.url, "/v1/recommendations", user_id="replayed", as_of=str(bad)
        )
        assert refused.status_code == 422, bad
        assert refused.json()["error"]["code"] == "bad_as_of"
        assert "unix seconds" in refused.json()["error"]["message"]
