"""Catalog routes on a real uvicorn server, stored in real Redis and DynamoDB (moto)."""

from __future__ import annotations

from typing import Any

import httpx
import redis.asyncio as aioredis

from recstream.aws import async_client
from recstream.catalog import RedisDynamoCatalog
from recstream.keys import Keys
from streams.schema import Item
from tests.conftest import RunningApi


def post(api: RunningApi, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{api.url}{path}", content=body, timeout=30)
    return httpx.post(f"{api.url}{path}", json=body, timeout=30)


async def test_one_item_a_list_or_an_items_object(api: RunningApi) -> None:
    ns = api.settings.namespace
    one = post(api, f"/v1/{ns}/items", {"item_id": "a", "title": "A", "categories": "X|Y"})
    assert one.status_code == 200, one.text
    assert one.json() == {"accepted": [{"index": 0, "id": "a"}], "rejected": []}
    listed = post(api, f"/v1/{ns}/items", [{"item_id": "b"}, {"item_id": "c", "price": 2}])
    assert [a["id"] for a in listed.json()["accepted"]] == ["b", "c"]
    wrapped = post(api, f"/v1/{ns}/items", {"items": [{"item_id": "d", "brand": "acme"}]})
    assert wrapped.json()["accepted"] == [{"index": 0, "id": "d"}]

    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        got = (await http.get(f"/v1/{ns}/items/a")).json()
    assert got["categories"] == ["X", "Y"]
    assert got["title"] == "A"
    # Stored where the agreed layout says, durably too.
    client = aioredis.from_url(api.settings.redis_url)
    try:
        assert Item.model_validate_json(await client.get(Keys(ns).item("d")) or b"").brand == "acme"
        async with async_client(api.settings, "dynamodb") as dynamodb:
            cold = RedisDynamoCatalog(client, dynamodb, api.settings, cache_size=0)
            await client.delete(Keys(ns).item("c"))
            assert (await cold.items(ns, ["c"]))["c"].price == 2.0
    finally:
        await client.aclose()


def test_short_routes_use_the_default_namespace(api: RunningApi) -> None:
    assert post(api, "/v1/items", {"item_id": "x/1", "title": "slash"}).status_code == 200
    assert httpx.get(f"{api.url}/v1/items/x/1").json()["title"] == "slash"
    ns = api.settings.namespace  # the test's default namespace
    assert httpx.get(f"{api.url}/v1/{ns}/items/x/1").json()["item_id"] == "x/1"
    assert httpx.get(f"{api.url}/v1/other-ns/items/x/1").status_code == 404


def test_users(api: RunningApi) -> None:
    ns = api.settings.namespace
    response = post(
        api, f"/v1/{ns}/users", {"users": [{"user_id": "u1", "attributes": {"tier": "gold"}}]}
    )
    assert response.status_code == 200, response.text
    assert httpx.get(f"{api.url}/v1/{ns}/users/u1").json() == {
        "user_id": "u1",
        "attributes": {"tier": "gold"},
    }
    missing = httpx.get(f"{api.url}/v1/{ns}/users/u2")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "user_not_found"


def test_mixed_batch_names_every_bad_field(api: RunningApi) -> None:
    ns = api.settings.namespace
    response = post(
        api,
        f"/v1/{ns}/items",
        [
            {"item_id": "ok"},
            {"item_id": "typo", "categroies": ["x"]},
            {"item_id": "neg", "price": -3},
            {"title": "no id"},
            "not an object",
        ],
    )
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == [{"index": 0, "id": "ok"}]
    errors = {r["index"]: r["errors"] for r in body["rejected"]}
    assert errors[1][0]["field"] == "categroies"
    assert "categories" in errors[1][0]["fix"]
    assert errors[2][0]["field"] == "price"
    assert errors[3][0]["field"] == "item_id"
    assert errors[4][0]["field"] == "body"
    assert httpx.get(f"{api.url}/v1/{ns}/items/typo").status_code == 404


def test_refusals(api: RunningApi) -> None:
    ns = api.settings.namespace
    all_bad = post(api, f"/v1/{ns}/items", [{"price": "free"}])
    assert all_bad.status_code == 422
    assert all_bad.json()["error"]["code"] == "invalid_items"
    assert post(api, f"/v1/{ns}/items", b"{nope").json()["error"]["code"] == "malformed_body"
    assert post(api, f"/v1/{ns}/items", []).json()["error"]["code"] == "empty_batch"
    assert post(api, f"/v1/{ns}/items", {"items": "x"}).status_code == 422
    too_many = post(api, f"/v1/{ns}/items", [{"item_id": str(n)} for n in range(501)])
    assert too_many.status_code == 413
    assert "500" in too_many.json()["error"]["message"]
    assert httpx.get(f"{api.url}/v1/{ns}/items/0").status_code == 404
    assert post(api, "/v1/bad ns!/items", {"item_id": "a"}).status_code == 404
