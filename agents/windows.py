"""The stream agent: windows, feature vectors and trending, applied once per event.

For every batch of records it (1) parses them with the one `Event` schema, sending what
does not parse to the dead-letter queue, (2) applies the events to the hot store, whose
one per-event script skips any event id it has already applied and runs every part
(window, features, trending) atomically, and (3) writes the touched windows and feature
vectors to their durable stores. Only then does the batch return, and only then does the
transport checkpoint it, so a crash anywhere loses nothing and a replay double-counts
nothing.

`deliver` wraps one batch in the retry policy: transient failures (an outage,
throttling: ``RecstreamError.retriable``) are retried without limit, which holds the
shard back (back-pressure); anything else is retried a bounded number of times, then
the batch is bisected down to the records that fail on their own, which are
dead-lettered with the reason, shard and sequence number, and the rest is applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import ConfigDict, ValidationError

from agents.deadletter import DeadLetter, DeadLetters
from agents.identity import IdentityStitcher
from agents.state import (
    ApplyResult,
    DurableWindows,
    HotStore,
    persist_windows,
    recover_lost_windows,
)
from recstream.errors import RecstreamError
from streams.schema import Event

__all__ = ["BatchStats", "Stage", "StoredEvent", "StreamRecord", "WindowAgent", "deliver"]

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
        self, reason: str, source: str, *, attempts: int = 1, error: str = "parse"
    ) -> DeadLetter:
        return DeadLetter(
            raw=self.value,
            reason=reason,
            source=source,
            shard=self.shard,
            sequence_number=self.sequence_number,
            sub_sequence=self.sub_sequence,
            attempts=attempts,
            error=error,
        )


class Stage(Protocol):
    """Work after the hot store applied a batch (e.g. the durable copy of features)."""

    async def after(self, events: Sequence[Event], result: ApplyResult) -> None: ...


@dataclass
class BatchStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    windows_persisted: int = 0
    errors: list[str] = field(default_factory=list)


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
            try:
                parsed.append((record, StoredEvent.from_json(record.value)))
            except ValidationError as exc:
                reason = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
                )
                bad.append(record.letter(reason, source))
        return parsed, bad

    @classmethod
    def parse(
        cls, records: Sequence[bytes | StreamRecord], source: str
    ) -> tuple[list[Event], list[DeadLetter]]:
        parsed, bad = cls.parse_records(_records(records), source)
        return [event for _, event in parsed], bad

    async def apply(self, events: Sequence[Event], source: str = "stream") -> BatchStats:
        """Apply parsed events to the hot store, then the durable copies (idempotent)."""
        stats = BatchStats(received=len(events))
        if not events:
            return stats
        # Identity stitching (agents/identity.py): anonymous events of a session that
        # logged in are given its user id here, before anything keyed by the actor.
        given = events
        resolution = await self.identity.resolve(events) if self.identity else None
        events = resolution.events if resolution else events
        result = await self.hot.apply(events)
        stats.applied, stats.duplicates = result.applied, result.duplicates
        stats.duplicates += resolution.skipped if resolution else 0
        if result.duplicates:
            # Expected after a crash or a lease handover: the batch since the last
            # checkpoint is delivered again, and the ids say it was applied.
            log.info("skipped %d already-applied events from %s", result.duplicates, source)
        if result.fresh:
            # Windows that had to be created: new actors, or windows Redis lost. The
            # durable copy of a lost one is merged back before it is overwritten.
            await recover_lost_windows(self.hot, self.durable, result.fresh)
        # Every actor of the batch, not only those changed now: after a crash between
        # the hot and the durable write, the replay finds only duplicates, and the
        # durable copy must still catch up.
        actors = {(e.namespace, e.actor) for e in events if e.item_id is not None}
        if self.identity and resolution:
            # Logins move the session's window into the user's (written durably there).
            await self.identity.stitch(given, resolution)
        stats.windows_persisted = await persist_windows(self.hot, self.durable, actors)
        for stage in self.stages:
            await stage.after(events, result)
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


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, RecstreamError) and exc.retriable


async def _backoff(attempt: int, max_delay: float) -> None:
    await asyncio.sleep(min(max_delay, 0.05 * 2 ** min(attempt, 10)))


async def _until_sent(
    dead_letters: DeadLetters, letters: Sequence[DeadLetter], max_delay: float
) -> None:
    """Send dead letters; a failing DLQ holds the shard back rather than losing them."""
    attempt = 0
    while True:
        try:
            await dead_letters.send(letters)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            attempt += 1
            log.error("the dead-letter queue failed (attempt %d), retrying: %s", attempt, exc)
            await _backoff(attempt, max_delay)


async def deliver(
    agent: WindowAgent,
    records: Sequence[bytes | StreamRecord],
    source: str,
    *,
    max_attempts: int = 3,
    max_delay: float = 5.0,
) -> BatchStats:
    """Process one batch until every record is applied or dead-lettered (see the module
    docstring). Never raises but for cancellation: a failed batch must neither be skipped
    (events lost) nor crash the agent (faust would restart it without re-reading the
    un-acked messages, and the checkpoint would stall behind them)."""
    parsed, bad = agent.parse_records(_records(records), source)
    total = BatchStats(received=len(records), dead_lettered=len(bad))
    if bad:
        log.warning("dead-lettering %d malformed records from %s", len(bad), source)
        await _until_sent(agent.dead_letters, bad, max_delay)
        agent._count(BatchStats(dead_lettered=len(bad)))

    async def run(part: list[tuple[StreamRecord, Event]]) -> None:
        attempts = 0
        while True:
            try:
                stats = await agent.apply([event for _, event in part], source)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _retriable(exc):
                    # An outage or throttling: wait and retry the same records, however
                    # long it takes, holding the shard back.
                    log.error(
                        "a batch of %d records failed, retrying (transient): %s", len(part), exc
                    )
                    await _backoff(attempts + 1, max_delay)
                    continue
                attempts += 1
                hint = "" if isinstance(exc, RecstreamError) else " (unexpected; please report it)"
                log.error(
                    "a batch of %d records failed (attempt %d of %d): %s%s",
                    len(part), attempts, max_attempts, exc, hint,
                )  # fmt: skip
                if attempts < max_attempts:
                    await _backoff(attempts, max_delay)
                    continue
                if len(part) == 1:
                    record, _ = part[0]
                    letter = record.letter(
                        f"processing failed {attempts} times: {exc}",
                        source,
                        attempts=attempts,
                        error=type(exc).__name__,
                    )
                    await _until_sent(agent.dead_letters, [letter], max_delay)
                    total.dead_lettered += 1
                    agent._count(BatchStats(dead_lettered=1))
                    return
                # Find the records that fail on their own: halves, in order (processing
                # is idempotent, so what a failed attempt applied is skipped next time).
                middle = len(part) // 2
                await run(part[:middle])
                await run(part[middle:])
                return
            total.applied += stats.applied
            total.duplicates += stats.duplicates
            total.windows_persisted += stats.windows_persisted
            return

    if parsed:
        await run(parsed)
    return total
