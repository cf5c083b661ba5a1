"""Drill: a store that stops answering. Redis, the emulator, or both, are paused.

Real processes: a private redis-server and a private moto (`recstream.emulator`), the API
on uvicorn (budgets of 1 s a store, 3 s a ranking). Pausing is SIGSTOP: the server's
sockets still accept connections but nothing answers, like a store stuck on a disk or a
network partition, the worst case for a client (a refused connection fails fast).

`tests/serving/test_endpoints.py` already keeps Redis busy with a Lua script on the shared
server (other clients then get BUSY errors); this drill adds what that cannot show: a
silent Redis, a silent DynamoDB/Kinesis, both at once, and the collector and health routes
beside the ranking ones.

Checked for every request: it returns (the client's 60 s timeout is the "no hang" line,
never a measurement), no 500; ranking answers are 200 and name what they skipped in
``degraded``; the collector answers 503 with ``Retry-After`` when Kinesis is silent (it
hung for minutes before its calls were bounded); once resumed, answers are whole again.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from recstream import stack
from recstream.aws import async_client
from recstream.windows import DynamoWindows, WindowEntry
from serving.app import create_app
from tests.conftest import serve_in_thread
from tests.reliability.drillkit import (
    drill_settings,
    paused,
    private_moto,
    private_redis,
    wait_for,
)
from tests.serving.helpers import apply, event

Answer = tuple[str, int, dict[str, Any], dict[str, str]]


async def ask_everything(url: str, tag: str) -> list[Answer]:
    """Every kind of request, concurrently (so all of them meet the paused store)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def call(name: str, method: str, path: str, **kwargs: Any) -> Answer:
            response = await client.request(method, path, **kwargs)
            return name, response.status_code, response.json(), dict(response.headers)

        return list(
            await asyncio.gather(
                call("live user", "GET", "/v1/recommendations", params={"user_id": "patient"}),
                call(
                    "durable user",
                    "GET",
                    "/v1/recommendations",
                    params={"user_id": f"keeper-{tag}"},
                ),
                call("related", "GET", "/v1/related-items", params={"item_id": "p1"}),
                call(
                    "ranking",
                    "POST",
                    "/v1/personalized-ranking",
                    json={"user_id": "patient", "item_ids": ["p1", "x"]},
                ),
                call("trending", "GET", "/v1/trending"),
                call(
                    "events",
                    "POST",
                    "/v1/events",
                    json={"event_type": "view", "user_id": f"poster-{tag}", "item_id": "p9"},
                ),
                call("healthz", "GET", "/healthz"),
                call("readyz", "GET", "/readyz"),
            )
        )


def by_name(answers: list[Answer]) -> dict[str, tuple[int, dict[str, Any], dict[str, str]]]:
    return {name: (status, body, headers) for name, status, body, headers in answers}


@pytest.mark.timeout(300)
async def test_silent_stores_degrade_answers_and_never_hang_or_fail(tmp_path: Path) -> None:
    with private_redis(tmp_path) as redis_server, private_moto(tmp_path) as moto:
        # Budgets a healthy store always meets on a loaded machine (so which parts degrade
        # is decided by the fault, not by the load), far below the client's timeout.
        settings = drill_settings(
            f"redis://127.0.0.1:{redis_server.port}/0",
            moto.url,
            ranking_budget_ms=3000.0,
            store_timeout_ms=1000.0,
            source_timeout_ms=1000.0,
        )
        ns = settings.namespace
        await apply(
            settings,
            [event(1, "patient", "p1", ns), event(2, "patient", "p2", ns)]
            + [event(n, f"crowd{n}", f"p{n % 3}", ns) for n in range(9)],
        )
        # Each "keeper-*" has no window in Redis, only a durable copy: its answer needs
        # DynamoDB (once read, serving puts it back in Redis, so one keeper per round).
        keepers = [f"keeper-{tag}" for tag in ("before", "redis", "emulator", "both")]
        async with async_client(settings, "dynamodb") as dynamodb:
            await DynamoWindows(dynamodb, settings).put(
                {(ns, k): [WindowEntry.of(event(1, k, "p2", ns))] for k in keepers}
            )
        port = stack.free_port()
        url = f"http://127.0.0.1:{port}"
        with serve_in_thread(create_app(settings), port):

            async def whole() -> bool:
                answers = by_name(await ask_everything(url, "before"))
                status, body, _ = answers["live user"]
                return status == 200 and not body["degraded"] and answers["events"][0] == 202

            await wait_for(whole, "a whole answer before the drill", 60)
            seen: dict[str, dict[str, tuple[int, dict[str, Any], dict[str, str]]]] = {}
            for fault, servers in (
                ("redis", [redis_server]),
                ("emulator", [moto]),
                ("both", [redis_server, moto]),
            ):
                with ExitStack() as pauses:
                    for server in servers:
                        pauses.enter_context(paused(server))
                    seen[fault] = by_name(await ask_everything(url, fault))
                await wait_for(whole, f"whole answers after the {fault} pause", 120)

    for fault, answers in seen.items():
        for name, (status, body, headers) in answers.items():
            assert status < 500 or status == 503, (fault, name, status, body)
            if status == 503:
                assert name in ("events", "healthz", "readyz"), (fault, name, body)
            if name == "events" and status == 503:
                assert headers.get("retry-after"), (fault, body)
        for name in ("live user", "durable user", "related", "ranking", "trending"):
            assert answers[name][0] == 200, (fault, name, answers[name])
    redis_down, aws_down, both = seen["redis"], seen["emulator"], seen["both"]
    assert "window" in redis_down["live user"][1]["degraded"]
    assert redis_down["ranking"][1]["items"], "re-ranking still returns the given items"
    assert redis_down["events"][0] == 202, "the collector does not need Redis"
    assert redis_down["healthz"][0] == 503
    assert "durable_window" in aws_down["durable user"][1]["degraded"]
    assert aws_down["events"][0] == 503
    assert aws_down["readyz"][0] == 503
    assert both["events"][0] == 503
    assert "window" in both["live user"][1]["degraded"]
    print(
        "\nDRILL slow-store: "
        + "; ".join(
            f"{fault}: " + ", ".join(f"{name} {status}" for name, (status, _, _) in answers.items())
            for fault, answers in seen.items()
        )
    )
