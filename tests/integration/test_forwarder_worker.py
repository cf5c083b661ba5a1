"""A real `recstream agents` worker forwarding to a Personalize tracker that fails, then
recovers; `recstream dlq replay` re-drives what was dead-lettered. Every event reaches
the tracker exactly once by event id. The same worker's archive agent, with an hour's
age limit, must flush on SIGTERM rather than hold the shutdown."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import httpx
import pytest

from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings
from tests.agents.personalize_server import TRACKING_ID, running_tracker
from tests.conftest import LocalStack, make_settings, serve_in_thread
from tests.integration.test_archive_crash import recstream
from tests.integration.test_spine import agent_worker, eventually, tail

FIRST, SECOND = 40, 25


def personalize_letters(settings: Settings) -> int:
    sqs = sync_client(settings, "sqs")
    url = sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def archived_ids(settings: Settings) -> list[str]:
    s3 = sync_client(settings, "s3")
    listing = s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"archive/{settings.namespace}/")
    ids: list[str] = []
    for obj in listing.get("Contents", ()):
        body = s3.get_object(Bucket=settings.bucket, Key=obj["Key"])["Body"].read()
        ids.extend(json.loads(line)["event_id"] for line in gzip.decompress(body).splitlines())
    return ids


@pytest.mark.timeout(300)  # a worker, the API and a `recstream dlq replay` process
async def test_tracker_outage_dead_letters_and_replay_delivers_each_event_once(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    from serving.app import create_app

    log = tmp_path / "agents.log"
    now = time.time()
    events = [
        {
            "event_id": f"e{n}",
            "event_type": "click",
            "user_id": f"u{n % 7}",
            "session_id": f"s{n % 7}",
            "item_id": f"i{n % 13}",
            "timestamp": now - 600 + n,
        }
        for n in range(FIRST + SECOND)
    ]
    with running_tracker() as (tracker, url):
        settings = make_settings(
            local_stack,
            personalize_tracking_id=TRACKING_ID,
            personalize_endpoint_url=url,
            personalize_max_attempts=2,
            personalize_retry_base_s=0.01,
            personalize_retry_max_s=0.05,
            archive_flush_s=3600.0,
            # the manual `recstream dlq replay` is under test, not the worker's re-drive
            personalize_redrive_s=3600.0,
        )
        port = stack.free_port()
        with serve_in_thread(create_app(settings), port):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                with agent_worker(settings, log) as worker:
                    tracker.outage()
                    response = await http.post("/v1/events", json=events[:FIRST])
                    assert response.status_code == 202, response.text

                    async def dead_lettered() -> bool:
                        return personalize_letters(settings) >= FIRST

                    await eventually(dead_lettered, "the failed events reaching the DLQ", log, 120)
                    assert tracker.event_ids() == {}
                    tracker.recover()
                    response = await http.post("/v1/events", json=events[FIRST:])
                    assert response.status_code == 202, response.text

                    async def forwarded() -> bool:
                        return len(tracker.event_ids()) >= SECOND

                    await eventually(forwarded, "the recovered tracker receiving events", log, 120)
                    assert archived_ids(settings) == []  # an hour's age: still buffered
                    worker.terminate()
                    worker.wait(20)
                    assert worker.returncode == 0, tail(log)
        # SIGTERM flushed the archive before the checkpoint, without waiting the hour
        assert sorted(archived_ids(settings)) == sorted(str(e["event_id"]) for e in events)
        assert set(tracker.event_ids()) == {str(e["event_id"]) for e in events[FIRST:]}

        replay = recstream(settings, "dlq", "replay", cwd=tmp_path)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert f"replayed and deleted {FIRST}" in replay.stdout
        assert tracker.event_ids() == {str(e["event_id"]): 1 for e in events}
        for call in tracker.calls:
            assert 1 <= len(call["eventList"]) <= 10
            users = {f"u{int(e['eventId'][1:]) % 7}" for e in call["eventList"]}
            assert users == {call["userId"]}
        assert personalize_letters(settings) == 0
