"""Drill: Amazon Personalize unreachable for a while.

Real processes: the API on uvicorn, a `recstream agents` worker forwarding to a real HTTP
server that speaks PutEvents' wire format (tests/agents/personalize_server.py), moto and
Redis. The tracker serves, is shut down (connections refused: unreachable, not merely
failing), and is started again on the same port while events keep coming.

Checked: the stream never waits for the tracker (events posted during the outage are
applied to Redis at once); every event reaches the tracker exactly once by event id,
with no operator command (the events the forwarder could not send went to the
dead-letter queue and the worker re-drives them once the tracker answers); the queue
ends empty. `tests/integration/test_forwarder_worker.py` covers the manual
`recstream dlq replay`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings
from serving.app import create_app
from tests.agents.personalize_server import TRACKING_ID, Tracker, build_app
from tests.conftest import LocalStack, make_settings, serve_in_thread
from tests.reliability.drillkit import agents, applied_ids, wait_for

USERS = 6
BEFORE, DURING, AFTER = 20, 30, 20


def letters(settings: Settings) -> int:
    """Dead letters in the queue, visible or being handled."""
    sqs = sync_client(settings, "sqs")
    url = sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "event_id": f"{prefix}{n}",
            "event_type": "click",
            "user_id": f"u{n % USERS}",
            "item_id": f"i{n % 11}",
            "timestamp": now - 60 + n,
        }
        for n in range(count)
    ]


@pytest.mark.timeout(240)
async def test_an_unreachable_tracker_loses_nothing_and_gets_every_event_once(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    tracker = Tracker()
    tracker_port = stack.free_port()
    settings = make_settings(
        local_stack,
        personalize_tracking_id=TRACKING_ID,
        personalize_endpoint_url=f"http://127.0.0.1:{tracker_port}",
        personalize_max_attempts=2,
        personalize_retry_base_s=0.01,
        personalize_retry_max_s=0.05,
        personalize_redrive_s=1.0,
    )
    log = tmp_path / "agents.log"
    batches = {"before": events("b", BEFORE), "during": events("d", DURING)}
    batches["after"] = events("a", AFTER)
    everything = {e["event_id"] for batch in batches.values() for e in batch}
    actors = [f"u{n}" for n in range(USERS)]
    client = aioredis.from_url(settings.redis_url)
    api_port = stack.free_port()
    try:
        with (
            serve_in_thread(create_app(settings), api_port),
            agents(settings, log),
        ):
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}", timeout=30
            ) as http:

                async def post(name: str) -> None:
                    response = await http.post("/v1/events", json=batches[name])
                    assert response.status_code == 202, response.text

                def received(name: str) -> set[str]:
                    return {e["event_id"] for e in batches[name]} & set(tracker.event_ids())

                with serve_in_thread(build_app(tracker), tracker_port):
                    await post("before")

                    async def before_forwarded() -> bool:
                        return len(received("before")) == BEFORE

                    await wait_for(before_forwarded, "the first events forwarded", 60, log)
                # The tracker is gone: connections are refused.
                await post("during")

                async def applied_during_outage() -> bool:
                    ids = {e["event_id"] for e in batches["during"]}
                    return ids <= await applied_ids(client, settings.namespace, actors)

                await wait_for(applied_during_outage, "the stream moving on", 60, log)

                async def kept() -> bool:
                    return letters(settings) >= DURING

                await wait_for(kept, "the unsent events kept in the dead-letter queue", 60, log)
                assert not received("during")
                with serve_in_thread(build_app(tracker), tracker_port):
                    await post("after")

                    async def all_forwarded() -> bool:
                        return set(tracker.event_ids()) == everything

                    await wait_for(all_forwarded, "every event at the tracker", 90, log)

                    async def queue_empty() -> bool:
                        return letters(settings) == 0

                    await wait_for(queue_empty, "the dead-letter queue emptied", 60, log)
    finally:
        await client.aclose()
    counts = tracker.event_ids()
    assert counts == dict.fromkeys(everything, 1), {k: v for k, v in counts.items() if v != 1}
    print(
        f"\nDRILL personalize-outage: {len(everything)} events ({DURING} during the outage), "
        f"{tracker.attempts} PutEvents requests reached the tracker, "
        f"{len(counts)} event ids received once each, lost 0"
    )
