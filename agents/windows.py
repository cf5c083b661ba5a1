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

`Pipeline` is how the worker delivers: the durable copies (step 3) of a group of batches
are written while the next batches are applied to Redis (steps 1-2), each actor's copy
once per group (its latest state), and a group is written once per copy interval
(``agent_copy_interval_s``), so an actor with events in many batches of the interval is
written once, and Redis, DynamoDB and the agent's own CPU work at the same time. A batch
is acknowledged (so checkpointed) only once its group's copies are written, and groups
are written one after the other, in order, so the promise above holds unchanged: a
crash before the copies replays the batches (duplicates in Redis, then the copies), and
no older copy overwrites a newer one. The worker feeds it (`Pipeline.feed`): the next
batch is parsed and prepared (logins resolved, script calls encoded) while Redis runs
the one before; batches are still applied one at a time, in order.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ConfigDict, ValidationError

from agents.deadletter import PARSE, DeadLetter, DeadLetters, send_until_done
from agents.identity import IdentityStitcher, Resolution
from agents.retry import Failure, RecordsRefused, RetryPolicy, process_bounded
from agents.state import ApplyResult, HotStore, PreparedCalls, persist_windows, recover_lost_windows
from recstream.windows import DurableWindows
from streams.kinesis.shards import unpack
from streams.schema import Event

__all__ = [
    "KIND",
    "BatchStats",
    "Parsed",
    "Pipeline",
    "Prepared",
    "Stage",
    "StoredEvent",
    "StreamRecord",
    "WindowAgent",
    "deliver",
    "event_records",
    "parse_batch",
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
    accepted_at: float | None = None
    """When the stream accepted the record (its arrival time), if known."""
    parsed: Event | str | None = field(default=None, init=False, compare=False, repr=False)
    """`event`'s answer, once asked (the agents of a worker share a message's records)."""

    def event(self) -> Event | str:
        """The record's event, or why it is not one (`parse_event`): parsed once per
        record, however many agents ask and however far apart (`event_records`); marked
        with the record's acceptance (`Event.accepted_at`, what freshness counts from)."""
        found = self.parsed
        if found is None:
            found = parse_event(self.value)
            if self.accepted_at is not None and isinstance(found, Event):
                found.mark_accepted(self.accepted_at)
            object.__setattr__(self, "parsed", found)  # (frozen for its callers)
        return found

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


_PARSED: OrderedDict[bytes, Event | str] = OrderedDict()
PARSE_CACHE = 4_096
"""Records parsed lately, by content. In a worker each record's event is kept on the
record itself, which its agents share (`StreamRecord.event`, `event_records`); this
catches the same bytes read again (a re-read after a rebalance, a duplicate put) and the
callers without a shared record (the Personalize re-drive). The oldest is dropped first,
with `OrderedDict.popitem`: a dict's ``del d[next(iter(d))]`` walks past every slot the
earlier deletions emptied, 1.9 µs a record at 4,096 (session 10).

It was the agents' only sharing until session 15, at 32,768 for whole aggregated records
(session 14); the agents drift apart by more than that on a backlog, and 102,221 of the
171,900 lookups of a 57,300-event backlog parsed afresh."""


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
        _PARSED.popitem(last=False)
    _PARSED[raw] = result
    return result


def parsed_events(records: Sequence[bytes | StreamRecord]) -> list[tuple[StreamRecord, Event]]:
    """The records that parse, each with its event; the others are skipped here (the
    windows agent dead-letters them once, the side agents need not)."""
    parsed: list[tuple[StreamRecord, Event]] = []
    for record in records:
        where = record if isinstance(record, StreamRecord) else StreamRecord(record)
        event = where.event()
        if not isinstance(event, str):
            parsed.append((where, event))
    return parsed


def stream_records(app: Any, events: Sequence[Any]) -> list[StreamRecord]:
    """The events' records, in order, with the shard, sequence number and sub-sequence
    each was read at (from the Kinesis consumer's ``record_position``; None with another
    transport). A faust event that is a whole aggregated record (the agents' app reads
    them whole, `agents.app.create_app`) gives each record inside it."""
    return [record for event in events for record in event_records(app, event)]


_RECORDS: weakref.WeakKeyDictionary[Any, tuple[StreamRecord, ...]] = weakref.WeakKeyDictionary()
"""Each faust message's records, while the message lives. Every agent of a worker gets
the same message (its own event around it): unpacked once, not once per agent, and the
agents share the records and so each record's parsed event (`StreamRecord.event`).
Unpacking a whole aggregated record once per agent was ~15 % of the worker's main thread
in py-spy, and parsing again what the content cache had dropped ~40 % of its parses
(session 15)."""


def event_records(app: Any, event: Any) -> tuple[StreamRecord, ...]:
    """`stream_records` of one faust event: the records it carries (one, unless it is a
    whole aggregated record), each named by its own sub-sequence."""
    message = event.message
    found = _RECORDS.get(message)
    if found is not None:
        return found
    position = getattr(app.consumer, "record_position", None)
    where = position(message.tp, message.offset) if position is not None else None
    value = message.value if isinstance(message.value, bytes) else bytes(event.value)
    inner = unpack(message.key, value, message.headers)
    # (the transport gives each message its record's arrival time on the stream)
    accepted = getattr(message, "timestamp", None)
    accepted = float(accepted) if isinstance(accepted, int | float) else None
    records: tuple[StreamRecord, ...]
    if where is None:
        records = tuple(StreamRecord(m.value, accepted_at=accepted) for m in inner)
    else:
        shard, sequence, last = where
        # (the position names the last message the faust message carries)
        first = last - len(inner) + 1
        records = tuple(
            StreamRecord(m.value, shard, sequence, first + n, accepted) for n, m in enumerate(inner)
        )
    _RECORDS[message] = records
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
    pending: list[Event] = field(default_factory=list)
    """With ``durable=False``: the applied events (as applied: logins resolved) whose
    actors' durable copies are still to be written (`WindowAgent.persist`)."""
    result: ApplyResult | None = None
    """With ``durable=False``: what the hot store reported for them (for the stages)."""


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


@dataclass(frozen=True)
class Prepared:
    """A batch's work before it is applied (`WindowAgent.prepare`)."""

    given: Sequence[Event]
    resolution: Resolution | None
    calls: PreparedCalls | None

    @property
    def resolved(self) -> Sequence[Event]:
        """What the hot store applies: ``given`` with the logins resolved."""
        return self.resolution.events if self.resolution else self.given

    def fits(self, events: Sequence[Event]) -> bool:
        """Whether this was prepared for ``events`` (the same events, in order)."""
        return len(events) == len(self.given) and all(
            a is b for a, b in zip(events, self.given, strict=True)
        )


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
            event = record.event()
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

    async def prepare(self, events: Sequence[Event]) -> Prepared:
        """What `apply` does for ``events`` before it writes: the sessions' logins
        resolved and, with a hot store that can, its calls encoded (`Pipeline.feed`
        prepares a batch while the one before it is applied). The identity resolution
        may then miss a login the batch before makes; `IdentityStitcher.stitch` re-checks
        every session a batch applied anonymous events to, as it does for a login read
        from another shard in any order (agents/identity.py)."""
        resolution = await self.identity.resolve(events) if self.identity else None
        resolved = resolution.events if resolution else events
        prepare = getattr(self.hot, "prepare", None)
        calls = await prepare(resolved) if prepare is not None and resolved else None
        return Prepared(events, resolution, calls)

    async def apply(
        self,
        events: Sequence[Event],
        source: str = "stream",
        *,
        durable: bool = True,
        prepared: Prepared | None = None,
        scripted: asyncio.Event | None = None,
    ) -> BatchStats:
        """Apply parsed events to the hot store, then the durable copies (idempotent).
        With ``durable=False`` the copies are left to the caller (`persist`): the events
        they need are in ``pending``. ``prepared``: `prepare`'s result for ``events``.
        ``scripted`` is set as soon as the hot store has applied them, before what
        follows (recovery, stitching, copies).

        Raises `RecordsRefused` with positions in ``events`` when the hot store refused
        some of them (the others are applied; the durable copies wait for the retry)."""
        stats = BatchStats(received=len(events))
        if not events:
            return stats
        # Identity stitching (agents/identity.py): anonymous events of a session that
        # logged in are given its user id here, before anything keyed by the actor.
        given = events
        if prepared is None or not prepared.fits(events):
            resolution = await self.identity.resolve(events) if self.identity else None
            calls = None
            events = resolution.events if resolution else events
        else:
            resolution, calls, events = prepared.resolution, prepared.calls, prepared.resolved
        try:
            if calls is not None:
                # (only a store with `prepare` made them, and its `apply` takes them)
                result = await self.hot.apply(events, calls)  # type: ignore[call-arg]
            else:
                result = await self.hot.apply(events)
            if scripted is not None:
                scripted.set()
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
        if self.identity and resolution:
            # Logins move the session's window and features into the user's (written
            # durably there).
            await self.identity.stitch(given, resolution)
        if durable:
            stats.windows_persisted = await self.persist(events, result)
        else:
            stats.pending, stats.result = list(events), result
        self.namespaces.update(e.namespace for e in events)
        self._count(stats)
        return stats

    async def persist(self, events: Sequence[Event], result: ApplyResult) -> int:
        """Write the durable copies (window, and each stage's) of the actors of ``events``
        as the hot store holds them now; returns how many windows were written.

        Every actor of the batch, not only those changed now: after a crash between the
        hot and the durable write, the replay finds only duplicates, and the durable copy
        must still catch up."""
        actors = {(e.namespace, e.actor) for e in events if e.item_id is not None}
        persisted = await _together(
            [persist_windows(self.hot, self.durable, actors)]
            + [stage.after(events, result) for stage in self.stages]
        )
        return persisted[0] if isinstance(persisted[0], int) else 0

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


@dataclass(frozen=True)
class Parsed:
    """A batch's records parsed (`parse_batch`): what `deliver` applies and dead-letters."""

    received: int
    events: list[tuple[StreamRecord, Event]]
    bad: list[DeadLetter]


def parse_batch(agent: WindowAgent, records: Sequence[bytes | StreamRecord], source: str) -> Parsed:
    parsed, bad = agent.parse_records(_records(records), source)
    return Parsed(len(records), parsed, bad)


async def deliver(
    agent: WindowAgent,
    records: Sequence[bytes | StreamRecord] | Parsed,
    source: str,
    *,
    max_attempts: int = 3,
    max_delay: float = 5.0,
    durable: bool = True,
    prepared: Prepared | None = None,
    scripted: asyncio.Event | None = None,
) -> BatchStats:
    """Process one batch until every record is applied or dead-lettered, under the agents'
    one failure policy (`agents.retry`): records that do not parse are dead-lettered at
    once (kind ``parse``); transient failures are retried without limit; deterministic
    ones ``max_attempts`` times, then the records that fail on their own are dead-lettered
    (kind ``windows``) and the rest applied. Never raises but for cancellation: a failed
    batch must neither be skipped (events lost) nor crash the agent (faust would restart
    it without re-reading the un-acked messages, and the checkpoint would stall).

    ``records`` may come parsed already (`parse_batch`), and ``prepared`` for its events
    (`WindowAgent.prepare`; used by the first attempt, which applies the whole batch):
    `Pipeline.feed` does both while the batch before is applied; ``scripted`` is set
    when that first attempt has applied the whole batch to Redis (a batch that needs
    retries sets it when done, `Pipeline` does). With ``durable=False`` only Redis is
    written; ``pending`` and ``result`` say what `persist_until_done` must still write
    (`Pipeline` does)."""
    batch = records if isinstance(records, Parsed) else parse_batch(agent, records, source)
    parsed, bad = batch.events, batch.bad
    total = BatchStats(received=batch.received, dead_lettered=len(bad))
    if bad:
        log.warning("dead-lettering %d malformed records from %s", len(bad), source)
        await send_until_done(agent.dead_letters, bad, max_delay)
        agent._count(BatchStats(dead_lettered=len(bad)))

    first = [True]

    async def step(part: Sequence[tuple[StreamRecord, Event]]) -> BatchStats:
        events = [event for _, event in part]
        # the first attempt is the whole batch, the one `prepared` was made for; retries
        # (and their halves) prepare their own
        if first[0]:
            first[0] = False
            return await agent.apply(
                events, source, durable=durable, prepared=prepared, scripted=scripted
            )
        return await agent.apply(events, source, durable=durable)

    async def give_up(failures: Sequence[Failure[tuple[StreamRecord, Event]]]) -> None:
        letters = [
            f.item[0].letter(f.reason, source, attempts=f.attempts, error=f.error_name, kind=KIND)
            for f in failures
        ]
        await send_until_done(agent.dead_letters, letters, max_delay)
        total.dead_lettered += len(letters)
        agent._count(BatchStats(dead_lettered=len(letters)))

    policy = RetryPolicy(max_attempts=max_attempts, max_delay=max_delay)
    results: list[ApplyResult] = []
    for stats in await process_bounded(parsed, step, give_up, policy, "records"):
        total.applied += stats.applied
        total.duplicates += stats.duplicates
        total.windows_persisted += stats.windows_persisted
        total.pending += stats.pending
        if stats.result is not None:
            results.append(stats.result)
    if not durable:
        total.result = ApplyResult.merge(results)
    return total


async def persist_until_done(
    agent: WindowAgent,
    events: Sequence[Event],
    result: ApplyResult,
    *,
    max_attempts: int = 3,
    max_delay: float = 5.0,
) -> int:
    """`WindowAgent.persist` under the agents' failure policy: transient failures are
    retried without limit (the batch stays unacknowledged, holding the shard back);
    deterministic ones ``max_attempts`` times, then per actor, and an actor whose copy
    still fails alone is logged as an error and left: its events are applied (Redis has
    them), only this copy of its state is missing, and its next event writes it again. (A
    dead letter would not help: replaying it finds the event applied and fails the same
    copy again.) Returns how many windows were written."""
    # One event per actor stands for all of its events (copies are per actor, of its
    # state now): one with an item when it has one, as windows are copied for those.
    by_actor: dict[tuple[str, str], Event] = {}
    for event in events:
        actor = (event.namespace, event.actor)
        known = by_actor.get(actor)
        if known is None or (known.item_id is None and event.item_id is not None):
            by_actor[actor] = event
    actors = list(by_actor)

    async def step(part: Sequence[tuple[str, str]]) -> int:
        return await agent.persist([by_actor[a] for a in part], result)

    async def give_up(failures: Sequence[Failure[tuple[str, str]]]) -> None:
        for failure in failures:
            log.error(
                "the durable copy of %s/%s could not be written (%s); Redis holds its "
                "state, and its next event writes the copy again",
                *failure.item, failure.reason,
            )  # fmt: skip

    policy = RetryPolicy(max_attempts=max_attempts, max_delay=max_delay)
    return sum(await process_bounded(actors, step, give_up, policy, "durable copies"))


COPIES_MAX_ACTORS = 5000
"""A group of batches is written once it touched this many actors (two DynamoDB items
each), even before its interval ends. Large enough that a busy interval's actors share
one group (64 clients' 2,560 users in bench.ingest), so each is written once in it."""
COPY_CHUNK_ACTORS = 50
"""A group's copies are read from Redis and written to DynamoDB this many actors at a
time (two BatchWriteItem calls per table), one chunk after the other, so that a group's
write is spread out rather than a burst: 500 at a time (sixteen calls in flight) held the
agents' own work and the emulator's GetRecords up for a second or two every interval
(`bench.paced` at 1,000 events/s: lag p90 1.8 s, 22 of 72 samples over 1 s; with 50: p90
0.4 s, none; session 8). One read of thousands of windows would also hold Redis (and
serving) up."""
COPY_INTERVAL_S = 5.0
"""... or once its first batch waited this long for its copies (and its acknowledgement:
how far the checkpoint may lag behind Redis for this agent; the archive's flush holds
the checkpoint back longer). `Settings.agent_copy_interval_s` is the worker's."""


class Pipeline:
    """Delivers batches one after the other; their durable copies are written while the
    next batches are applied to Redis, each actor's once per group of batches.

    `submit` returns once the batch is in Redis. Batches join the current group; the
    group's copies are written (every actor it touched, as Redis holds it then: its
    latest state, once) when its first batch is ``interval_s`` old, or when the group
    touched ``max_actors`` actors. So an actor is written at most once per interval
    however many of its events arrive in it: live traffic used to write each small batch's
    actors at once, about two ~5 KB DynamoDB items per event (session 8,
    docs/local-stack.md). Under a backlog one group is being written while the next one
    is applied. A batch's ``done`` (its acknowledgement, so its checkpoint) is awaited
    only after its group's copies are written; groups are written one at a time, in
    order, so an older copy never overwrites a newer one. A crash before that replays the
    group's batches: Redis finds them applied, and the copies are written then (module
    docstring).

    `flush` starts writing the current group now (a rebalance or a stop waits for every
    unacknowledged batch: `pending` says whether there is one). `drain` writes what is
    pending and waits for it; `aclose` too, and when cancelled meanwhile abandons the
    copies (their batches stay unacknowledged and are read again).
    """

    def __init__(
        self,
        agent: WindowAgent,
        source: str,
        *,
        max_actors: int = COPIES_MAX_ACTORS,
        interval_s: float = COPY_INTERVAL_S,
        max_attempts: int = 3,
        max_delay: float = 5.0,
    ) -> None:
        self.agent = agent
        self.source = source
        self.max_actors = max_actors
        self.interval_s = interval_s
        self.max_attempts = max_attempts
        self.max_delay = max_delay
        self._group: list[tuple[list[Event], ApplyResult, Callable[[], Awaitable[object]] | None]]
        self._group = []
        self._actors: set[tuple[str, str]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._copies: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._pending_flush = False
        self._applying: asyncio.Task[BatchStats] | None = None
        self._applies: set[asyncio.Task[BatchStats]] = set()
        self._scripted: asyncio.Event | None = None
        self.groups_written = 0

    async def submit(
        self,
        records: Sequence[bytes | StreamRecord] | Parsed,
        done: Callable[[], Awaitable[object]] | None = None,
    ) -> BatchStats:
        """Apply a batch to Redis and add it to the current group; returns once it is in
        Redis (after the batch `feed` started before it, if any: batches apply in order)."""
        await self._settle()
        return await self._apply(records, done)

    async def feed(
        self,
        records: Sequence[bytes | StreamRecord],
        done: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """`submit`, overlapped with the caller: parses and prepares the batch now
        (`WindowAgent.prepare`: logins resolved, script calls encoded), while the batch
        fed before it is still being applied, then applies it in the background as soon
        as that one's script calls have run, and returns. So the worker's CPU and
        redis-server's overlap, where one waited for the other (session 14 in
        docs/agents.md). The script calls of one batch run after the other's, in order,
        so every actor's events apply in the order they were read; what follows a
        batch's calls (recovering state Redis lost, stitching logins) may run while the
        next batch's calls do, as for events of another shard. Batches join their
        groups, and are acknowledged, in order. At most one batch waits prepared
        (back-pressure)."""
        # (the batch applying now first sends its calls, so that Redis runs them while
        # this one is parsed and prepared)
        await asyncio.sleep(0)
        parsed = parse_batch(self.agent, records, self.source)
        prepared: Prepared | None = None
        try:
            prepared = await self.agent.prepare([event for _, event in parsed.events])
        except Exception as exc:
            # (a store that fails now fails the apply too, where the failure policy
            # retries it; preparing is only a head start)
            log.debug("preparing a batch from %s failed: %s", self.source, exc)
        before = self._applying
        if self._scripted is not None:
            await self._scripted.wait()
        scripted = self._scripted = asyncio.Event()
        self._applying = asyncio.create_task(
            self._apply(parsed, done, prepared, before, scripted),
            name=f"applying a batch ({self.source})",
        )
        # (two may run: one finishing, the next running its calls; a stop cancels both)
        self._applies.add(self._applying)
        self._applying.add_done_callback(self._applies.discard)

    async def _settle(self) -> None:
        """Wait until the batch `feed` started is in Redis and in its group."""
        if self._applying is not None:
            applying = self._applying
            try:
                await asyncio.shield(applying)
            finally:
                if applying.done():
                    self._applying = None

    async def _apply(
        self,
        records: Sequence[bytes | StreamRecord] | Parsed,
        done: Callable[[], Awaitable[object]] | None,
        prepared: Prepared | None = None,
        before: asyncio.Task[BatchStats] | None = None,
        scripted: asyncio.Event | None = None,
    ) -> BatchStats:
        try:
            stats = await deliver(
                self.agent,
                records,
                self.source,
                max_attempts=self.max_attempts,
                max_delay=self.max_delay,
                durable=False,
                prepared=prepared,
                scripted=scripted,
            )
        finally:
            if scripted is not None:
                scripted.set()  # (a batch that needed retries: once it is done)
        if before is not None:
            await before  # the batch before joins its group first

        if not self._group:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._due)
        self._group.append((stats.pending, stats.result or ApplyResult(0, 0), done))
        self._actors.update((e.namespace, e.actor) for e in stats.pending)
        if len(self._actors) >= self.max_actors:
            # Back-pressure: a group this large waits for the one before it.
            await self.flush()
        # Otherwise the group waits for its interval, caught up or not: writing a small
        # live batch's actors at once cost two DynamoDB items per event, the largest
        # part of the agents' and the emulator's CPU (session 8). The next batches are
        # applied to Redis meanwhile, never held up by the copies.
        return stats

    @property
    def pending(self) -> bool:
        """True while a submitted batch waits for its group's copies to start (or is
        still being applied)."""
        return bool(self._group) or self._applying is not None

    def _due(self) -> None:
        if self._pending_flush:
            return  # a flush is already waiting its turn: it takes the whole group
        self._pending_flush = True
        task = asyncio.create_task(self._flush_due(), name=f"durable copies due ({self.source})")
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush_due(self) -> None:
        try:
            await self.flush()
        finally:
            self._pending_flush = False

    async def flush(self) -> None:
        """Start writing the current group, once the group before it is written."""
        async with self._lock:
            if not self._group:
                return
            if self._copies is not None:
                # One group at a time, in order (batches keep joining the group meanwhile).
                copies, self._copies = self._copies, None
                await copies
            group, self._group, self._actors = self._group, [], set()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._copies = asyncio.create_task(
                self._write(group), name=f"durable copies ({self.source})"
            )

    async def _write(
        self,
        group: Sequence[
            tuple[Sequence[Event], ApplyResult, Callable[[], Awaitable[object]] | None]
        ],
    ) -> None:
        by_actor: dict[tuple[str, str], list[Event]] = {}
        for events, _, _ in group:
            for event in events:
                by_actor.setdefault((event.namespace, event.actor), []).append(event)
        actors = list(by_actor)
        result = ApplyResult.merge(result for _, result, _ in group)
        written = 0
        for start in range(0, len(actors), COPY_CHUNK_ACTORS):
            written += await persist_until_done(
                self.agent,
                [e for actor in actors[start : start + COPY_CHUNK_ACTORS] for e in by_actor[actor]],
                result,
                max_attempts=self.max_attempts,
                max_delay=self.max_delay,
            )
        self.agent.totals.windows_persisted += written
        self.groups_written += 1
        for _, _, done in group:
            if done is None:
                continue
            try:
                await done()
            except Exception:
                # An acknowledgement that failed leaves the batch to be read again (its
                # effects are found applied): logged, never raised into the next batch.
                log.exception("acknowledging a batch from %s failed", self.source)

    async def drain(self) -> None:
        """Write every submitted batch's copies (and acknowledge the batches)."""
        await self._settle()
        await self.flush()
        async with self._lock:
            copies, self._copies = self._copies, None
            if copies is not None:
                await copies

    async def aclose(self, within: float | None = None) -> None:
        """`drain`, for at most ``within`` seconds. Past it, or cancelled meanwhile, the
        copies still being written are abandoned: their batches stay unacknowledged and
        are read again, by this worker or the next owner of the shard. A stopping worker
        whose DynamoDB does not answer retries transient failures for ever otherwise, and
        never exits (tests/reliability/test_drill_sigterm.py)."""
        try:
            async with asyncio.timeout(within):
                await self.drain()
        except (asyncio.CancelledError, TimeoutError) as exc:
            for task in [*self._applies, self._copies, *self._flushing]:
                if task is not None:
                    task.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning(
                "%s: durable copies not written within %.0f s of stopping; their batches "
                "stay unacknowledged and will be read again",
                self.source,
                within,
            )
        finally:
            if self._timer is not None:
                self._timer.cancel()
