"""Attribution and identity stitching end to end: HTTP → collector → Kinesis (moto) → a
real `recstream agents` worker → Redis + DynamoDB → recommendations and counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from recstream.aws import sync_client
from recstream.keys import Keys
from tests.conftest import RunningApi
from tests.integration.test_spine import agent_worker, eventually


async def test_a_visitor_keeps_context_across_login_and_clicks_are_attributed(
    api: RunningApi, tmp_path: Path
) -> None:
    settings = api.settings
    ns = settings.namespace
    log = tmp_path / "agents.log"
    crowd = [
        {"event_type": "view", "user_id": f"crowd{n}", "item_id": f"pop{n % 5}"} for n in range(30)
    ]
    anonymous = [
        {"event_type": "click", "session_id": "visit1", "item_id": item}
        for item in ("boots", "scarf")
    ]
    login = {"event_type": "login", "user_id": "carol", "session_id": "visit1"}
    redis = aioredis.from_url(settings.redis_url)
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:

        async def recommend() -> dict[str, Any]:
            r = await client.get("/v1/recommendations", params={"user_id": "carol"})
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body

        async def carol_sees(*wanted: str) -> dict[str, Any] | None:
            body = await recommend()
            top = [i["item_id"] for i in body["items"][: len(wanted)]]
            return body if sorted(top) == sorted(wanted) else None

        try:
            with agent_worker(settings, log):
                for batch in (crowd, anonymous):
                    assert (await client.post("/v1/events", json=batch)).status_code == 202

                async def session_window() -> int:
                    return int(await redis.llen(Keys(ns).window("session:visit1")))

                await eventually(session_window, "the anonymous clicks reaching the session", log)
                assert (await client.post("/v1/events", json=[login])).status_code == 202
                body = await eventually(
                    lambda: carol_sees("boots", "scarf"), "the login stitching the session", log
                )
                assert all("recently_interacted" in i["reasons"] for i in body["items"][:2])

                # An anonymous event of the same session after the login: carol's too.
                later = {"event_type": "click", "session_id": "visit1", "item_id": "gloves"}
                assert (await client.post("/v1/events", json=[later])).status_code == 202
                body = await eventually(
                    lambda: carol_sees("gloves", "boots", "scarf"), "a post-login click", log
                )

                # Serving logged what it answered (serving/pipeline/log, in the background),
                # then carol clicks one of them with its id and buys another without it.
                rid = body["recommendation_id"]
                served = [i["item_id"] for i in body["items"]]

                async def logged() -> Any:
                    return await redis.get(Keys(ns).served(rid))

                assert (
                    orjson.loads(await eventually(logged, "the served log", log))["items"] == served
                )
                click = {
                    "event_type": "click",
                    "user_id": "carol",
                    "session_id": "visit1",
                    "item_id": served[0],
                    "recommendation_id": rid,
                }
                purchase = {
                    "event_type": "purchase",
                    "user_id": "carol",
                    "item_id": served[1],
                    "event_value": 42.5,
                }
                assert (await client.post("/v1/events", json=[click, purchase])).status_code == 202

                async def attributed() -> dict[Any, Any] | None:
                    counters = await redis.hgetall(Keys(ns).attribution("recommendations"))
                    return counters if counters.get(b"purchases") == b"1" else None

                counters = await eventually(attributed, "the click and purchase attributed", log)
                dynamodb = sync_client(settings, "dynamodb")

                async def durable() -> tuple[str, dict[str, Any]] | None:
                    # Durable copies: carol's stitched window and the counters.
                    window = dynamodb.get_item(
                        TableName=settings.windows_table,
                        Key={"pk": {"S": f"{ns}#carol"}},
                        ConsistentRead=True,
                    ).get("Item", {})
                    item = dynamodb.get_item(
                        TableName=settings.attribution_table,
                        Key={"pk": {"S": Keys(ns).attribution("recommendations")}},
                        ConsistentRead=True,
                    ).get("Item", {})
                    done = '"gloves"' in window.get("window", {}).get("S", "") and item.get(
                        "purchases"
                    ) == {"N": "1"}
                    return (window["window"]["S"], item) if done else None

                window, item = await eventually(durable, "the durable copies", log)
        finally:
            await redis.aclose()
    # Every answer carol was given counted its items (the polls above asked several times).
    assert int(counters[b"impressions"]) >= len(served)
    assert (counters[b"clicks"], float(counters[b"revenue"])) == (b"1", 42.5)
    assert all(f'"{name}"' in window for name in ("boots", "scarf", "gloves"))
    assert (item["clicks"]["N"], item["revenue"]["N"]) == ("1", "42.5")
