"""The stream agent: windows, feature vectors and trending, applied once per event.

For every batch of records it (1) parses them with the one `Event` schema, sending what
does not parse to the dead-letter queue, (2) applies the events to the hot store, whose
script (one call per chunk of events) skips any event id it has already applied and runs
every part (window, features, trending) of each event atomically, and (3) writes the
touched windows and feature vectors to their durable stores. Only then does the batch
return, and only then does the transport checkpoint it, so a crash anywhere loses
nothing and a replay double-counts nothing.

`deliver` runs one batch under the agents' one failure policy (`agents.retry`):
transient failures (an outage, throttling) are retried without limit, which holds the
shard back (back-pressure); deterministic ones a bounded number of times, then the
records that fail on their own are dead-lettered (kind ``windows``) with the reason,
shard and sequence number, and the rest is applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ConfigDict, ValidationError

from agents.deadletter import PARSE, DeadLetter, DeadLetters, send_until_done
from agents.identity import IdentityStitcher
from agents.retry import Failure, RecordsRefused, RetryPolicy, process_bounded
from agents.state import (
    ApplyResult,
    DurableWindows,
    HotStore,
    persist_windows,
    recover_lost_windows,
)
from streams.schema import Event

__all__ = [
    "KIND",
    "BatchStats",
    "Stage",
    "StoredEvent",
    "StreamRecord",
    "WindowAgent",
    "deliver",
    "parse_event",
    "stream_records",
]

KIND = "windows"
"""The dead-letter kind of records whose processing failed here (agents/deadletter.py)."""

log = logging.getLogger(__name__)


class StoredEvent(Event):
    """An event read back from the stream. Unknown fields are ignored rather than refused:
    during a rolling deploy a newer collector may add one that older agents do not know,
    and the collector is where unknown fields are refused."""

    model_config = ConfigDict(extra="ignore")


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One record and where it was read (for dead letters)."""

    value: bytes
    shard: str | None = None
    sequence_number: str | None = None
    sub_sequence: int | None = None

    def letter(
        self,
        reason: str,
        source: str,
        *,
        attempts: int = 1,
        error: str = "parse",
        kind: str = PARSE,
    ) -> DeadLetter:
        return DeadLetter(
            raw=self.value,
            reason=reason,
            source=source,
            kind=kind,
            shard=self.shard,
            sequence_number=self.sequence_number,
            sub_sequence=self.sub_sequence,
            attempts=attempts,
            error=error,
        )


_PARSED: dict[bytes, Event | str] = {}
PARSE_CACHE = 4096
"""Records parsed lately, shared by the agents of one worker: each of them reads every
record, and parsing (pydantic validation) is the larger part of a side agent's work."""


def parse_event(raw: bytes) -> Event | str:
    """The event of a stream record, or why it is not one (a dead letter's reason).
    Parsed once per worker however many agents ask (a small cache by content)."""
    found = _PARSED.get(raw)
    if found is not None:
        return found
    result: Event | str
    try:
        result = StoredEvent.from_json(raw)
    except ValidationError as exc:
        result = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
    if len(_PARSED) >= PARSE_CACHE:
        del _PARSED[next(iter(_PARSED))]
    _PARSED[raw] = result
    return result


def stream_records(app: Any, events: Sequence[Any]) -> list[StreamRecord]:
    """The values of a batch of faust events (``stream.take_events``) with the shard and
    sequence number each was read at (from the Kinesis consumer's ``record_position``;
    None with another transport)."""
    position = getattr(app.consumer, "record_position", None)
    records: list[StreamRecord] = []
    for event in events:
        message = event.message
        where = position(message.tp, message.offset) if position is not None else None
        value = message.value if isinstance(message.value, bytes) else bytes(event.value)
        if where is None:
            records.append(StreamRecord(value))
        else:
            records.append(StreamRecord(value, where[0], where[1], where[2]))
    return records


class Stage(Protocol):
    """Work after the hot store applied a batch (e.g. the durable copy of features). A
    stage may also define ``async def recover(self, result: ApplyResult)``, run before
    identity stitching (e.g. merging back what Redis lost, so a login moves all of it)."""

    async def after(self, events: Sequence[Event], result: ApplyResult) -> None: ...


@dataclass
class BatchStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    windows_persisted: int = 0
    errors: list[str] = field(default_factory=list)


async def _together(steps: Sequence[Awaitable[object]]) -> list[object]:
    """Run independent steps concurrently (their stores answer in parallel); the first
    failure is raised once all have finished, so none is left running."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)


def _records(records: Iterable[bytes | StreamRecord]) -> list[StreamRecord]:
    return [r if isinstance(r, StreamRecord) else StreamRecord(r) for r in records]


class WindowAgent:
    def __init__(
        self,
        hot: HotStore,
        durable: DurableWindows,
        dead_letters: DeadLetters,
        stages: Sequence[Stage] = (),
        identity: IdentityStitcher | None = None,
    ) -> None:
        self.hot = hot
        self.durable = durable
        self.dead_letters = dead_letters
        self.stages = tuple(stages)
        self.identity = identity
        self.totals = BatchStats()
        self.namespaces: set[str] = set()
        """Namespaces this agent has applied events of (the trend materializer's list)."""

    @staticmethod
    def parse_records(
        records: Sequence[StreamRecord], source: str
    ) -> tuple[list[tuple[StreamRecord, Event]], list[DeadLetter]]:
        parsed: list[tuple[StreamRecord, Event]] = []
        bad: list[DeadLetter] = []
        for record in records:
            event = parse_event(record.value)
            if isinstance(event, str):
                bad.append(record.letter(event, source))
            else:
                parsed.append((record, event))
        return parsed, bad

    @classmethod
    def parse(
        cls, records: Sequence[bytes | StreamRecord], source: str
    ) -> tuple[list[Event], list[DeadLetter]]:
        parsed, bad = cls.parse_records(_records(records), source)
        return [event for _, event in parsed], bad

    async def apply(self, events: Sequence[Event], source: str = "stream") -> BatchStats:
        """Apply parsed events to the hot store, then the durable copies (idempotent).

        Raises `RecordsRefused` with positions in ``events`` when the hot store refused
        some of them (the others are applied; the durable copies wait for the retry)."""
        stats = BatchStats(received=len(events))
        if not events:
            return stats
        # Identity stitching (agents/identity.py): anonymous events of a session that
        # logged in are given its user id here, before anything keyed by the actor.
        given = events
        resolution = await self.identity.resolve(events) if self.identity else None
        events = resolution.events if resolution else events
        try:
            result = await self.hot.apply(events)
        except RecordsRefused as exc:
            if resolution is None:
                raise
            origin = resolution.origin
            raise RecordsRefused(str(exc), [origin[n] for n in exc.items], exc.reasons) from exc
        stats.applied, stats.duplicates = result.applied, result.duplicates
        stats.duplicates += resolution.skipped if resolution else 0
        if result.duplicates:
            # Expected after a crash or a lease handover: the batch since the last
            # checkpoint is delivered again, and the ids say it was applied.
            log.info("skipped %d already-applied events from %s", result.duplicates, source)
        # Windows and feature vectors that had to be created: new actors, or state Redis
        # lost. The durable copy of a lost one is merged back before it is overwritten.
        recovering = [stage.recover(result) for stage in self.stages if hasattr(stage, "recover")]
        if result.fresh:
            recovering.append(recover_lost_windows(self.hot, self.durable, result.fresh))
        await _together(recovering)
        # Every actor of the batch, not only those changed now: after a crash between
        # the hot and the durable write, the replay finds only duplicates, and the
        # durable copy must still catch up.
        actors = {(e.namespace, e.actor) for e in events if e.item_id is not None}
        if self.identity and resolution:
            # Logins move the session's window and features into the user's (written
            # durably there).
            await self.identity.stitch(given, resolution)
        persisted = await _together(
            [persist_windows(self.hot, self.durable, actors)]
            + [stage.after(events, result) for stage in self.stages]
        )
        stats.windows_persisted = persisted[0] if isinstance(persisted[0], int) else 0
        self.namespaces.update(e.namespace for e in events)
        self._count(stats)
        return stats

    def _count(self, stats: BatchStats) -> None:
        for name in ("received", "applied", "duplicates", "dead_lettered", "windows_persisted"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(stats, name))

    async def process(
        self, records: Sequence[bytes | StreamRecord], source: str = "stream"
    ) -> BatchStats:
        """Parse, dead-letter what does not parse, apply the rest (one attempt)."""
        parsed, bad = self.parse_records(_records(records), source)
        if bad:
            log.warning("dead-lettering %d malformed records from %s", len(bad), source)
            await self.dead_letters.send(bad)
            self._count(BatchStats(dead_lettered=len(bad)))
        stats = await self.apply([event for _, event in parsed], source)
        stats.received, stats.dead_lettered = len(records), len(bad)
        return stats


async def deliver(
    agent: WindowAgent,
    records: Sequence[bytes | StreamRecord],
    source: str,
    *,
    max_attempts: int = 3,
    max_delay: float = 5.0,
) -> BatchStats:
    """Process one batch until every record is applied or dead-lettered, under the agents'
    one failure policy (`agents.retry`): records that do not parse are dead-lettered at
    once (kind ``parse``); transient failures are retried without limit; deterministic
    ones ``max_attempts`` times, then the records that fail on their own are dead-lettered
    (kind ``windows``) and the rest applied. Never raises but for cancellation: a failed
    batch must neither be skipped (events lost) nor crash the agent (faust would restart
    it without re-reading the un-acked messages, and the checkpoint would stall)."""
    parsed, bad = agent.parse_records(_records(records), source)
    total = BatchStats(received=len(records), dead_lettered=len(bad))
    if bad:
        log.warning("dead-lettering %d malformed records from %s", len(bad), source)
        await send_until_done(agent.dead_letters, bad, max_delay)
        agent._count(BatchStats(dead_lettered=len(bad)))

    async def step(part: Sequence[tuple[StreamRecord, Event]]) -> BatchStats:
        return await agent.apply([event for _, event in part], source)

    async def give_up(failures: Sequence[Failure[tuple[StreamRecord, Event]]]) -> None:
        letters = [
            f.item[0].letter(f.reason, source, attempts=f.attempts, error=f.error_name, kind=KIND)
            for f in failures
        ]
        await send_until_done(agent.dead_letters, letters, max_delay)
        total.dead_lettered += len(letters)
        agent._count(BatchStats(dead_lettered=len(letters)))

    policy = RetryPolicy(max_attempts=max_attempts, max_delay=max_delay)
    for stats in await process_bounded(parsed, step, give_up, policy, "records"):
        total.applied += stats.applied
        total.duplicates += stats.duplicates
        total.windows_persisted += stats.windows_persisted
    return total
