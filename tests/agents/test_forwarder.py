"""The Personalize forwarder and `recstream dlq replay`, with the real aiobotocore client
against a real HTTP server speaking PutEvents (tests/agents/personalize_server.py), and
the dead-letter queue on moto's SQS."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from agents.deadletter import DeadLetter, SqsDeadLetters
from agents.forwarder import (
    KIND,
    Forwarder,
    group_calls,
    open_personalize,
    replay_dead_letters,
    to_personalize,
)
from recstream.aws import async_client, sync_client
from recstream.cli import main
from recstream.settings import Settings
from streams.schema import Event
from tests.agents.personalize_server import TRACKING_ID, Tracker, running_tracker

T0 = 1_763_856_000.0


def event(n: int, user: str | None = "u0", session: str | None = None, **extra: object) -> Event:
    return Event(
        event_id=f"e{n}",
        event_type="click",
        user_id=user,
        session_id=session,
        item_id=f"i{n}",
        timestamp=T0 + n,
        **extra,
    )


@pytest.fixture
def tracker() -> Iterator[tuple[Tracker, str]]:
    with running_tracker() as running:
        yield running


def tracked(settings: Settings, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "personalize_tracking_id": TRACKING_ID,
        "personalize_endpoint_url": url,
        "personalize_retry_base_s": 0.001,
        "personalize_retry_max_s": 0.01,
        **overrides,
    }
    return settings.model_copy(update=values)


def dlq_bodies(settings: Settings) -> list[dict[str, object]]:
    sqs = sync_client(settings, "sqs")
    url = sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    bodies: list[dict[str, object]] = []
    while True:
        response = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        )
        messages = response.get("Messages", [])
        new = [m for m in messages if json.loads(m["Body"]) not in bodies]
        if not new:
            return bodies
        bodies.extend(json.loads(m["Body"]) for m in new)


def test_calls_hold_one_user_and_session_and_at_most_ten_events() -> None:
    events = [event(n, user=f"u{n % 3}") for n in range(45)]
    events += [event(100 + n, user=None, session="s1") for n in range(4)]
    events += [event(200 + n, user="u0", session="other") for n in range(2)]
    calls = group_calls(events)
    assert all(1 <= len(call.events) <= 10 for call in calls)
    for call in calls:
        assert {(e.user_id, e.session_id or e.user_id) for e in call.events} == {
            (call.user_id, call.session_id)
        }
    # every event once, and each session's events in stream order
    assert sorted(e.event_id for c in calls for e in c.events) == sorted(e.event_id for e in events)
    u0 = [e.event_id for c in calls if c.session_id == "u0" for e in c.events]
    assert u0 == [f"e{n}" for n in range(0, 45, 3)]
    assert [len(c.events) for c in calls if c.session_id == "u0"] == [10, 5]
    anonymous = [c for c in calls if c.user_id is None]
    assert [(c.session_id, len(c.events)) for c in anonymous] == [("s1", 4)]


def test_fields_map_to_botocores_event_shape() -> None:
    full = event(
        1,
        session="s9",
        event_value=4.5,
        recommendation_id="rec-1",
        impression=["i1", "i2", "i3"],
        properties={"numberOfRatings": 12, "userId": "reserved, so dropped"},
    )
    out = to_personalize(full)
    assert out["eventId"] == "e1"
    assert out["eventType"] == "click"
    assert out["itemId"] == "i1"
    assert out["eventValue"] == 4.5
    assert out["recommendationId"] == "rec-1"
    assert out["impression"] == ["i1", "i2", "i3"]
    assert json.loads(out["properties"]) == {"numberOfRatings": 12}
    assert out["sentAt"].timestamp() == T0 + 1
    bare = to_personalize(event(2, recommendation_id="r" * 41))
    assert set(bare) == {"eventId", "eventType", "itemId", "sentAt"}


async def test_events_reach_the_tracker_once_in_calls_of_ten(
    settings: Settings, tracker: tuple[Tracker, str]
) -> None:
    server, url = tracker
    settings = tracked(settings, url)
    events = [event(n, user=f"u{n % 3}", session=f"s{n % 3}") for n in range(35)]
    events.append(
        event(99, properties={"page": "home"}, impression=["i1", "i2"], recommendation_id="r-1")
    )
    async with open_personalize(settings) as client:
        result = await Forwarder(client, settings).send(events)
    assert (result.sent, result.failed) == (36, [])
    assert server.event_ids() == {e.event_id: 1 for e in events}
    for call in server.calls:
        assert 1 <= len(call["eventList"]) <= 10
        assert call["trackingId"] == TRACKING_ID
        users = {f"u{int(e['eventId'][1:]) % 3}" for e in call["eventList"]}
        assert {call["userId"]} == users or call["userId"] == "u0"
    assert len(server.calls) == 3 * 2 + 1  # 12/12/11 events per session, and e99's own
    wire = next(e for e in server.events if e["eventId"] == "e99")
    assert wire["sentAt"] == T0 + 99
    assert json.loads(wire["properties"]) == {"page": "home"}
    assert wire["impression"] == ["i1", "i2"]
    assert wire["recommendationId"] == "r-1"


async def test_throttling_and_5xx_are_retried_with_backoff(
    settings: Settings, tracker: tuple[Tracker, str]
) -> None:
    server, url = tracker
    settings = tracked(settings, url, personalize_max_attempts=6)
    server.fail_next(2, 400, "ThrottlingException")
    server.fail_next(2, 500, "InternalFailure")
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    events = [event(n) for n in range(5)]
    async with open_personalize(settings) as client:
        forwarder = Forwarder(client, settings, sleep=sleep)
        result = await forwarder.send(events)
    assert (result.sent, result.retries, result.failed) == (5, 4, [])
    assert server.attempts == 5
    assert server.event_ids() == {e.event_id: 1 for e in events}
    # full jitter: each wait within [0, base * 2^attempt], capped
    caps = [min(0.01, 0.001 * 2**n) for n in range(4)]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))


async def test_an_event_refused_as_invalid_is_dead_lettered_alone(
    settings: Settings, tracker: tuple[Tracker, str]
) -> None:
    server, url = tracker
    settings = tracked(settings, url)
    server.refuse({"e1"})
    raw = [event(n).to_json() for n in range(4)] + [b"not an event"]
    async with open_personalize(settings) as client, async_client(settings, "sqs") as sqs:
        forwarder = Forwarder(client, settings, SqsDeadLetters(sqs, settings))
        result = await forwarder.process(raw, source="stream-x")
    # The one call was refused; its halves were sent, and e1 alone was refused again.
    # The same request is never sent twice: 4 events, 1 + 2 + 2 calls.
    assert server.attempts == 5
    assert (result.sent, result.dead_lettered) == (3, 1)
    assert server.event_ids() == {"e0": 1, "e2": 1, "e3": 1}
    [body] = dlq_bodies(settings)
    assert body["kind"] == KIND
    assert body["source"] == "stream-x"
    assert "InvalidInputException" in str(body["reason"])
    assert Event.from_json(base64.b64decode(str(body["raw_base64"]))).event_id == "e1"
    # (the unparsable record is the windows agent's to report)


async def test_an_outage_dead_letters_then_replay_delivers_each_event_once(
    settings: Settings, tracker: tuple[Tracker, str]
) -> None:
    server, url = tracker
    settings = tracked(settings, url, personalize_max_attempts=3)
    first = [event(n, user=f"u{n % 4}") for n in range(23)]
    second = [event(100 + n, user=f"u{n % 4}") for n in range(7)]
    async with open_personalize(settings) as client, async_client(settings, "sqs") as sqs:
        dead_letters = SqsDeadLetters(sqs, settings)
        forwarder = Forwarder(client, settings, dead_letters)
        server.outage()
        result = await forwarder.process([e.to_json() for e in first])
        assert (result.sent, result.dead_lettered) == (0, 23)
        assert "after 3 attempts" in result.failed[0][1]
        server.recover()
        await forwarder.process([e.to_json() for e in second])
        # a record that does not parse is in the queue too: replay must leave it there
        await dead_letters.send([DeadLetter(raw=b"{", reason="body: invalid JSON", source="s")])
    assert server.event_ids() == {e.event_id: 1 for e in second}

    server.fail_next(1, 400, "ThrottlingException")  # the replay is retried too
    report = await replay_dead_letters(settings)
    assert (report.received, report.replayed, report.failed) == (24, 23, 0)
    assert report.kept == {"parse": 1}
    assert server.event_ids() == {e.event_id: 1 for e in first + second}
    assert all(len(call["eventList"]) <= 10 for call in server.calls)
    remaining = dlq_bodies(settings)
    assert [body["kind"] for body in remaining] == ["parse"]
    again = await replay_dead_letters(settings)
    assert (again.replayed, again.kept) == (0, {"parse": 1})
    assert server.event_ids() == {e.event_id: 1 for e in first + second}


def test_dlq_replay_command_keeps_what_fails_again(
    settings: Settings,
    tracker: tuple[Tracker, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio

    server, url = tracker
    settings = tracked(settings, url, personalize_max_attempts=2)
    events = [event(n, user=f"u{n % 2}") for n in range(12)]

    async def dead_letter() -> None:
        async with async_client(settings, "sqs") as sqs:
            await SqsDeadLetters(sqs, settings).send(
                [DeadLetter(raw=e.to_json(), reason="x", source="s", kind=KIND) for e in events]
            )

    asyncio.run(dead_letter())
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    server.outage()
    assert main(["dlq", "replay", "--limit", "5"]) == 1
    out = capsys.readouterr().out
    assert "received 5 dead letters" in out
    assert "failed again and kept 5" in out
    assert server.event_ids() == {}
    server.recover()
    assert main(["dlq", "replay"]) == 0
    assert "replayed and deleted 12" in capsys.readouterr().out
    assert server.event_ids() == {e.event_id: 1 for e in events}
    assert dlq_bodies(settings) == []


async def test_an_unreachable_tracker_is_retried_then_reported(settings: Settings) -> None:
    from recstream import stack

    settings = tracked(
        settings, f"http://127.0.0.1:{stack.free_port()}", personalize_max_attempts=3
    )
    async with open_personalize(settings) as client:
        result = await Forwarder(client, settings).send([event(1)])
    assert result.retries == 2
    assert [e.event_id for e, _ in result.failed] == ["e1"]
    assert "after 3 attempts" in result.failed[0][1]
