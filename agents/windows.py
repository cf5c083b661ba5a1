"""The windows agent: each actor's recent-interaction window and item popularity.

For every batch of records it (1) parses them with the one `Event` schema, sending what
does not parse to the dead-letter queue, (2) applies the events to the hot store, which
skips any event id it has already applied, and (3) writes the touched windows to the
durable store. Only then does the batch return, and only then does the transport
checkpoint it, so a crash anywhere loses nothing and a replay double-counts nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ConfigDict, ValidationError

from agents.deadletter import DeadLetter, DeadLetters
from agents.identity import IdentityStitcher
from agents.state import DurableWindows, HotStore, persist_windows, recover_lost_windows
from streams.schema import Event

__all__ = ["BatchStats", "StoredEvent", "WindowAgent"]

log = logging.getLogger(__name__)


class StoredEvent(Event):
    """An event read back from the stream. Unknown fields are ignored rather than refused:
    during a rolling deploy a newer collector may add one that older agents do not know,
    and the collector is where unknown fields are refused."""

    model_config = ConfigDict(extra="ignore")


@dataclass
class BatchStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    windows_persisted: int = 0
    errors: list[str] = field(default_factory=list)


class WindowAgent:
    def __init__(
        self,
        hot: HotStore,
        durable: DurableWindows,
        dead_letters: DeadLetters,
        identity: IdentityStitcher | None = None,
    ) -> None:
        self.hot = hot
        self.durable = durable
        self.dead_letters = dead_letters
        self.identity = identity
        self.totals = BatchStats()

    @staticmethod
    def parse(records: Sequence[bytes], source: str) -> tuple[list[Event], list[DeadLetter]]:
        events: list[Event] = []
        bad: list[DeadLetter] = []
        for raw in records:
            try:
                events.append(StoredEvent.from_json(raw))
            except ValidationError as exc:
                reason = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
                )
                bad.append(DeadLetter(raw=raw, reason=reason, source=source))
        return events, bad

    async def process(self, records: Sequence[bytes], source: str = "stream") -> BatchStats:
        events, bad = self.parse(records, source)
        stats = BatchStats(received=len(records), dead_lettered=len(bad))
        if bad:
            log.warning("dead-lettering %d malformed records from %s", len(bad), source)
            await self.dead_letters.send(bad)
        if events:
            # Identity stitching (agents/identity.py): anonymous events of a session that
            # logged in are given its user id here, before anything keyed by the actor.
            resolution = await self.identity.resolve(events) if self.identity else None
            applied = resolution.events if resolution else events
            result = await self.hot.apply(applied)
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
            actors = {(e.namespace, e.actor) for e in applied if e.item_id is not None}
            if self.identity and resolution:
                # Logins move the session's window into the user's (written durably there).
                await self.identity.stitch(events, resolution)
            stats.windows_persisted = await persist_windows(self.hot, self.durable, actors)
        for name in ("received", "applied", "duplicates", "dead_lettered", "windows_persisted"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(stats, name))
        return stats
