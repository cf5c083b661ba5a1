"""The agents read an aggregated record whole (one faust message: `agents.app`) and split
it (`agents.windows.stream_records`): each event in order, each named by its own
sub-sequence, so a dead letter says exactly where its event is."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from agents import windows
from agents.archive import ArchiveBuffer, acknowledged_once
from agents.windows import WindowAgent, event_records, stream_records
from streams.envelope import Message, encode_aggregated
from streams.kinesis.shards import AGGREGATED_HEADER
from streams.schema import Event

SHARD, SEQUENCE = "shardId-000000000001", "4959" + "7" * 52


@dataclass(eq=False)  # hashed by identity and weakly referenced, as faust's Message
class FakeMessage:
    tp: str
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def app_at(last_sub_sequence: dict[int, int]) -> Any:
    """A faust app whose Kinesis consumer says where each offset was read."""

    def record_position(tp: str, offset: int) -> tuple[str, str, int]:
        return SHARD, SEQUENCE, last_sub_sequence[offset]

    return SimpleNamespace(consumer=SimpleNamespace(record_position=record_position))


def event(offset: int, value: bytes, aggregated: int = 0) -> Any:
    headers = [(AGGREGATED_HEADER, str(aggregated).encode())] if aggregated else []
    return SimpleNamespace(message=FakeMessage("t", offset, b"k", value, headers), value=value)


def click(n: int) -> bytes:
    return Event(
        event_id=f"e{n}", event_type="click", user_id=f"u{n}", item_id="i", timestamp=1.7e9 + n
    ).to_json()


def test_an_aggregated_record_gives_each_event_with_its_sub_sequence() -> None:
    inner = [click(0), b'{"event_type": "click"', click(2)]
    whole = encode_aggregated([Message(key=f"u{n}".encode(), value=v) for n, v in enumerate(inner)])
    single = click(9)
    app = app_at({0: 2, 1: 0})
    records = stream_records(app, [event(0, whole, aggregated=3), event(1, single)])
    assert [r.value for r in records] == [*inner, single]
    assert [(r.shard, r.sequence_number, r.sub_sequence) for r in records] == [
        (SHARD, SEQUENCE, 0),
        (SHARD, SEQUENCE, 1),
        (SHARD, SEQUENCE, 2),
        (SHARD, SEQUENCE, 0),
    ]
    # the poison in the middle is dead-lettered naming its own place; the others parse
    parsed, bad = WindowAgent.parse_records(records, "stream")
    assert [e.event_id for _, e in parsed] == ["e0", "e2", "e9"]
    assert [(letter.sub_sequence, letter.raw) for letter in bad] == [(1, inner[1])]


def test_a_single_record_is_unchanged() -> None:
    (record,) = event_records(app_at({5: 0}), event(5, click(1)))
    assert (record.value, record.shard, record.sub_sequence) == (click(1), SHARD, 0)


def test_the_agents_of_a_worker_share_a_message_s_records() -> None:
    """Every agent gets the same faust message (each its own event around it): unpacked
    once, the agents hold the same records, so `parse_event` hashes each value once."""
    whole = encode_aggregated([Message(key=b"u", value=click(n)) for n in range(3)])
    first = event(0, whole, aggregated=3)
    second = SimpleNamespace(message=first.message, value=whole)
    app = app_at({0: 2})
    records = event_records(app, first)
    assert event_records(app, second) is records
    assert [r.sub_sequence for r in records] == [0, 1, 2]
    # parsed once for all of them, however long ago (not only while the content cache
    # still holds it)
    parsed = records[0].event()
    windows._PARSED.clear()
    assert event_records(app, second)[0].event() is parsed
    # another message at the same place (a re-read) is unpacked on its own
    again = event_records(app, event(0, whole, aggregated=3))
    assert again == records
    assert again is not records


class Sink:
    async def put(self, key: str, body: bytes) -> None:  # pragma: no cover - not flushed
        raise AssertionError("not flushed in this test")


def test_the_archive_acknowledges_an_aggregated_record_once() -> None:
    whole = encode_aggregated([Message(key=b"u", value=click(n)) for n in range(4)])
    faust_event = event(0, whole, aggregated=4)
    buffer: ArchiveBuffer[Any] = ArchiveBuffer(Sink(), flush_bytes=10**9, flush_s=60)
    buffer.add(acknowledged_once(app_at({0: 3, 1: 0}), [faust_event, event(1, click(9))]))
    assert len(buffer.events) == 5
    assert buffer.held == 5
    # each faust message acknowledged once, after all its events are stored
    assert [token.message.offset for token in buffer.clear()] == [0, 1]
