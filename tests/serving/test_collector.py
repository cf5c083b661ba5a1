"""POST /v1/events against a real uvicorn server, moto's Kinesis, and real boto3 reads."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings
from streams.envelope import decode
from streams.schema import Event
from tests.conftest import LocalStack, RunningApi, make_settings, serve_in_thread


def raw_records(settings: Settings) -> list[dict[str, Any]]:
    """The test's stream's Kinesis records as they are (single or aggregated), shard by
    shard, read with plain boto3; each with its ``ShardId``."""
    kinesis = sync_client(settings, "kinesis")
    out: list[dict[str, Any]] = []
    try:
        for shard in kinesis.list_shards(StreamName=settings.stream_name)["Shards"]:
            iterator = kinesis.get_shard_iterator(
                StreamName=settings.stream_name,
                ShardId=shard["ShardId"],
                ShardIteratorType="TRIM_HORIZON",
            )["ShardIterator"]
            while iterator:
                answer = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
                out += [{**record, "ShardId": shard["ShardId"]} for record in answer["Records"]]
                if not answer["Records"]:
                    break
                iterator = answer.get("NextShardIterator")
    finally:
        kinesis.close()  # its sockets, not the garbage collector's (a ResourceWarning)
    return out


def read_stream(settings: Settings) -> list[tuple[str, Event]]:
    """Every (key, event) on the test's stream, read with plain boto3: the key the
    event's message carries (its actor, which routed it to its shard), whether its record
    is its own or an aggregated one (the producer's default)."""
    return [
        ((message.key or b"").decode(), Event.from_json(message.value))
        for record in raw_records(settings)
        for message in decode(record["Data"])
    ]


def click(user: str | None = "u1", item: str = "i1", **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"event_type": "click", "item_id": item, **extra}
    if user is not None:
        event["user_id"] = user
    return event


async def post(api: RunningApi, body: Any, path: str = "/v1/events", **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        if isinstance(body, bytes):
            return await client.post(path, content=body, **kw)
        return await client.post(path, json=body, **kw)


async def test_single_event_lands_on_kinesis_partitioned_by_user(api: RunningApi) -> None:
    response = await post(api, click(user="alice", item="m1", event_id="evt-1"))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == [{"index": 0, "event_id": "evt-1"}]
    assert body["rejected"] == []
    assert body["failed"] == []
    [(key, event)] = read_stream(api.settings)
    assert key == "alice"
    assert event.event_id == "evt-1"
    assert event.item_id == "m1"
    assert event.namespace == api.settings.namespace


async def test_batch_gets_server_generated_ids_and_namespace_route(api: RunningApi) -> None:
    batch = {"events": [click("u1", "a"), click("u2", "b"), click(None, "c", session_id="s9")]}
    response = await post(api, batch, path="/v1/shop-eu/events")
    assert response.status_code == 202, response.text
    accepted = response.json()["accepted"]
    assert [a["index"] for a in accepted] == [0, 1, 2]
    assert len({a["event_id"] for a in accepted}) == 3
    on_stream = read_stream(api.settings)
    assert {e.event_id for _, e in on_stream} == {a["event_id"] for a in accepted}
    assert {e.namespace for _, e in on_stream} == {"shop-eu"}
    assert ("session:s9", "c") in {(k, e.item_id) for k, e in on_stream}


async def test_malformed_body_is_422_with_a_fix(api: RunningApi) -> None:
    response = await post(api, b'{"event_type": "click",')
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "malformed_body"
    assert "valid JSON" in error["message"]
    assert read_stream(api.settings) == []


async def test_missing_user_id_names_the_field(api: RunningApi) -> None:
    response = await post(api, {"event_type": "click", "item_id": "i1"})
    assert response.status_code == 422
    [rejected] = response.json()["rejected"]
    [problem] = rejected["errors"]
    assert problem["field"] == "user_id"
    assert "session_id" in problem["problem"]
    assert problem["fix"]


async def test_oversized_batch_is_refused_whole(api: RunningApi) -> None:
    response = await post(api, [click(f"u{i}") for i in range(501)])
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "batch_too_large"
    assert "500" in response.json()["error"]["message"]
    assert read_stream(api.settings) == []


async def test_wrong_types_name_every_bad_field(api: RunningApi) -> None:
    event = click(
        event_value="lots",
        timestamp="yesterday",
        impression="i2,i3",
        properties={"k": {"nested": 1}},
    )
    response = await post(api, event)
    assert response.status_code == 422
    fields = {p["field"] for p in response.json()["rejected"][0]["errors"]}
    assert {"event_value", "timestamp", "impression"} <= fields
    assert any(f.startswith("properties") for f in fields)


@pytest.mark.parametrize(
    ("event", "field", "words"),
    [
        (click(timestamp=time.time() * 1000), "timestamp", "milliseconds"),
        (click(timestamp=42), "timestamp", "before 1990"),
        (click(user="x" * 257), "user_id", "256"),
        (click(impression=[f"i{i}" for i in range(26)]), "impression", "25"),
        (click(userid="u1"), "userid", "remove this field"),
        ({"event_type": "purchase", "user_id": "u1"}, "item_id", "item_id"),
        (click(event_type="Bad Type"), "event_type", "lower_snake_case"),
    ],
)
async def test_personalize_limits(
    api: RunningApi, event: dict[str, Any], field: str, words: str
) -> None:
    response = await post(api, event)
    assert response.status_code == 422, response.text
    problems = response.json()["rejected"][0]["errors"]
    matching = [p for p in problems if p["field"] == field]
    assert matching, problems
    assert any(words in p["problem"] + p["fix"] for p in matching), matching


async def test_mixed_batch_accepts_valid_and_lists_rejected(api: RunningApi) -> None:
    batch = [click("u1", "a"), {"event_type": "click"}, click("u2", "b"), "not an object"]
    response = await post(api, batch)
    assert response.status_code == 202
    body = response.json()
    assert [a["index"] for a in body["accepted"]] == [0, 2]
    assert [r["index"] for r in body["rejected"]] == [1, 3]
    assert len(read_stream(api.settings)) == 2


async def test_atomic_batch_accepts_nothing_if_any_is_invalid(api: RunningApi) -> None:
    response = await post(api, [click("u1"), {"event_type": "click"}], params={"atomic": "true"})
    assert response.status_code == 422
    assert response.json()["accepted"] == []
    assert read_stream(api.settings) == []


async def test_namespace_mismatch_is_rejected(api: RunningApi) -> None:
    response = await post(api, click(namespace="other"), path="/v1/mine/events")
    assert response.status_code == 422
    assert response.json()["rejected"][0]["errors"][0]["field"] == "namespace"


async def test_huge_body_is_refused_before_reading(api: RunningApi) -> None:
    body = b"[" + b" " * (6 * 1024 * 1024) + b"]"
    response = await post(api, body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


async def test_huge_chunked_body_is_refused_without_a_length(api: RunningApi) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"["
        for _ in range(7):
            yield b" " * (1024 * 1024)
        yield b"]"

    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        response = await client.post("/v1/events", content=chunks())
    assert "content-length" not in response.request.headers
    assert response.status_code == 413


async def test_namespace_allow_list_and_trailing_newline(local_stack: LocalStack) -> None:
    from serving.app import create_app

    settings = make_settings(local_stack, namespaces=["shop"])
    port = stack.free_port()
    with serve_in_thread(create_app(settings), port):
        api = RunningApi(url=f"http://127.0.0.1:{port}", settings=settings)
        assert (await post(api, click(), path="/v1/shop/events")).status_code == 202
        other = await post(api, click(), path="/v1/other/events")
        assert other.status_code == 404
        assert "shop" in other.json()["error"]["message"]
        newline = await post(api, click(), path="/v1/shop%0A/events")
        assert newline.status_code == 404


async def test_a_missing_stream_is_a_500_that_lists_every_event(settings: Settings) -> None:
    from serving.app import create_app

    broken = settings.model_copy(update={"stream_name": "no-such-stream"})
    port = stack.free_port()
    with serve_in_thread(create_app(broken), port):
        api = RunningApi(url=f"http://127.0.0.1:{port}", settings=broken)
        response = await post(api, [click("u1"), click("u2")])
    assert response.status_code == 500
    body = response.json()
    assert [f["index"] for f in body["failed"]] == [0, 1]
    assert "recstream up" in body["failed"][0]["error"]
