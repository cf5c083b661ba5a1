"""The Personalize forwarder: every event to an Amazon Personalize event tracker.

When ``Settings.personalize_tracking_id`` is set, the ``personalize`` agent sends each
batch of events with ``PutEvents`` (botocore's ``personalize-events`` service, at
``Settings.personalize_endpoint_url`` or real AWS):

* one call carries one user and one session (the request names them once) and at most
  10 events (``EventList`` max 10); the events of one session keep their stream order;
* fields map to botocore's ``Event`` shape: ``eventId``, ``eventType``, ``eventValue``,
  ``itemId``, ``sentAt`` (the event's time), ``recommendationId``, ``impression`` and
  ``properties`` (a JSON string); an event without a session uses its user id as
  ``sessionId``, which the request requires;
* throttling, 5xx answers and connection errors are retried with full-jitter
  exponential backoff (``personalize_retry_base_s`` doubling up to
  ``personalize_retry_max_s``, ``personalize_max_attempts`` attempts); what still fails
  goes to the dead-letter queue (kind ``personalize``) with the error, one message per
  event, and ``recstream dlq replay`` (agents/redrive.py) sends it again later. The
  retry budget is bounded on purpose, unlike the other agents' back-pressure: an outage
  of Personalize, an outside service, must not hold back the shard for every agent;
* a call refused as invalid (a 4xx other than throttling) is not retried as is: its
  events are sent again in halves, down to the events refused on their own, which alone
  are dead-lettered;
* anything else that fails a batch (our bug, the dead-letter queue down) goes through
  the agents' one failure policy (`agents.retry`): retried, then narrowed down to the
  records that fail on their own, which are dead-lettered.

Delivery is at least once: a batch re-read after a crash is sent again. Personalize
keeps the first event of each ``eventId`` and ignores later ones, and our event ids are
the producers' idempotency keys, so a repeat changes nothing there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from agents.deadletter import DeadLetters, send_until_done
from agents.retry import Failure, RetryPolicy, process_bounded
from agents.windows import StreamRecord, parsed_events
from recstream.aws import error_code
from recstream.errors import ConfigurationError
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    from agents.redrive import ReplayReport

__all__ = [
    "KIND",
    "MAX_EVENTS_PER_CALL",
    "ForwardResult",
    "Forwarder",
    "PutEventsCall",
    "group_calls",
    "open_personalize",
    "replay_dead_letters",
    "to_personalize",
]

log = logging.getLogger(__name__)

KIND = "personalize"
"""The dead-letter kind of events the tracker did not take."""
MAX_EVENTS_PER_CALL = 10
MAX_RECOMMENDATION_ID = 40
RESERVED_PROPERTIES = frozenset(
    {"userid", "sessionid", "eventtype", "timestamp", "recommendationid", "impression"}
)
"""Keys Personalize refuses in ``properties`` (compared case-insensitively)."""
_THROTTLED = {
    "ThrottlingException",
    "TooManyRequestsException",
    "Throttling",
    "ThrottledException",
    "RequestLimitExceeded",
    "LimitExceededException",
}
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|::1)$")


def to_personalize(event: Event) -> dict[str, Any]:
    """The ``Event`` member of a PutEvents ``eventList`` (botocore's shape)."""
    out: dict[str, Any] = {
        "eventId": event.event_id,
        "eventType": event.event_type,
        "sentAt": datetime.fromtimestamp(event.timestamp, tz=UTC),
    }
    if event.item_id is not None:
        out["itemId"] = event.item_id
    if event.event_value is not None:
        out["eventValue"] = event.event_value
    if event.recommendation_id is not None:
        if len(event.recommendation_id) <= MAX_RECOMMENDATION_ID:
            out["recommendationId"] = event.recommendation_id
        else:
            # Personalize refuses longer ids and would refuse the whole event with it.
            log.warning(
                "event %s: recommendation_id longer than %d characters is not forwarded",
                event.event_id, MAX_RECOMMENDATION_ID,
            )  # fmt: skip
    if event.impression:
        out["impression"] = list(event.impression)
    properties = {k: v for k, v in event.properties.items() if k.lower() not in RESERVED_PROPERTIES}
    if properties:
        out["properties"] = json.dumps(properties, separators=(",", ":"))
    return out


@dataclass(frozen=True, slots=True)
class PutEventsCall:
    """One PutEvents request: one user, one session, 1 to 10 events in stream order."""

    user_id: str | None
    session_id: str
    events: tuple[Event, ...]

    def request(self, tracking_id: str) -> dict[str, Any]:
        request: dict[str, Any] = {
            "trackingId": tracking_id,
            "sessionId": self.session_id,
            "eventList": [to_personalize(event) for event in self.events],
        }
        if self.user_id is not None:
            request["userId"] = self.user_id
        return request


def group_calls(events: Sequence[Event]) -> list[PutEventsCall]:
    """Group by (user, session) in order of first appearance, then cut into calls of at
    most 10 events."""
    groups: dict[tuple[str | None, str], list[Event]] = {}
    for event in events:
        session = event.session_id or event.user_id
        assert session is not None  # the schema demands user_id or session_id
        groups.setdefault((event.user_id, session), []).append(event)
    return [
        PutEventsCall(user, session, tuple(group[i : i + MAX_EVENTS_PER_CALL]))
        for (user, session), group in groups.items()
        for i in range(0, len(group), MAX_EVENTS_PER_CALL)
    ]


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return error_code(exc) in _THROTTLED or status >= 500 or status == 429
    # Connection refused, timeouts, a dropped connection: the tracker may come back. Other
    # botocore errors (a parameter the model refuses, no credentials) will not go away.
    return isinstance(exc, HTTPClientError | BotoConnectionError | OSError | TimeoutError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"PutEvents failed: HTTP {status} {error_code(exc)}: {exc}"
    return f"PutEvents failed: {type(exc).__name__}: {exc}"


@dataclass
class ForwardResult:
    sent: int = 0
    calls: int = 0
    retries: int = 0
    failed: list[tuple[Event, str]] = field(default_factory=list)
    """Events the tracker did not take after the retry budget, with the error."""
    dead_lettered: int = 0


class Forwarder:
    """Sends events to the tracker; `process` is the agent's per-batch step."""

    def __init__(
        self,
        client: Any,
        settings: Settings,
        dead_letters: DeadLetters | None = None,
        *,
        concurrency: int = 8,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        policy: RetryPolicy | None = None,
    ) -> None:
        if not settings.personalize_tracking_id:
            raise ConfigurationError(
                "no Personalize tracker configured; set RECSTREAM_PERSONALIZE_TRACKING_ID"
            )
        self.client = client
        self.settings = settings
        self.tracking_id = settings.personalize_tracking_id
        self.dead_letters = dead_letters
        self.concurrency = concurrency
        self.sleep = sleep
        self.rng = rng
        self.policy = policy or RetryPolicy.of(settings)

    def backoff(self, attempt: int) -> float:
        """Full jitter (AWS's recommendation): uniform in [0, min(cap, base * 2^attempt)]."""
        s = self.settings
        cap = min(s.personalize_retry_max_s, s.personalize_retry_base_s * 2.0**attempt)
        return float(self.rng() * cap)

    async def put(self, call: PutEventsCall, result: ForwardResult) -> str | None:
        """One call with retries; None when the tracker took it, else the last error.
        A call refused as invalid is split in halves, sent in order, down to the events
        refused on their own; those are added to ``result.failed`` here."""
        attempts = self.settings.personalize_max_attempts
        for attempt in range(attempts):
            try:
                await self.client.put_events(**call.request(self.tracking_id))
            except asyncio.CancelledError:
                raise
            except (TimeoutError, BotoCoreError, ClientError, OSError) as exc:
                if not _retriable(exc):
                    if len(call.events) == 1:
                        return _describe(exc)
                    # The same request would be refused again; find the event(s) it is
                    # refused for, and send the others.
                    middle = len(call.events) // 2
                    for half in (call.events[:middle], call.events[middle:]):
                        part = PutEventsCall(call.user_id, call.session_id, half)
                        error = await self.put(part, result)
                        if error is not None:
                            result.failed.extend((event, error) for event in half)
                    return None
                if attempt + 1 == attempts:
                    return f"{_describe(exc)} (after {attempts} attempts)"
                result.retries += 1
                await self.sleep(self.backoff(attempt))
                continue
            result.calls += 1
            result.sent += len(call.events)
            return None
        raise AssertionError("unreachable")

    async def send(self, events: Sequence[Event]) -> ForwardResult:
        """Send every event; the result lists those that failed (nothing dead-lettered).

        Calls of different sessions run concurrently; one session's calls run in order.
        """
        result = ForwardResult()
        by_session: dict[tuple[str | None, str], list[PutEventsCall]] = {}
        for call in group_calls(events):
            by_session.setdefault((call.user_id, call.session_id), []).append(call)
        gate = asyncio.Semaphore(self.concurrency)

        async def session(calls: list[PutEventsCall]) -> None:
            async with gate:
                for call in calls:
                    error = await self.put(call, result)
                    if error is not None:
                        result.failed.extend((event, error) for event in call.events)

        async with asyncio.TaskGroup() as group:
            for calls in by_session.values():
                group.create_task(session(calls))
        return result

    async def process(
        self, records: Sequence[bytes | StreamRecord], source: str = "stream"
    ) -> ForwardResult:
        """The agent's step: forward what parses (the windows agent dead-letters the
        rest) under the agents' failure policy, and dead-letter what the tracker did not
        take, with the error."""
        parsed = parsed_events(records)
        total = ForwardResult()

        positions = {event.event_id: record for record, event in parsed}

        async def step(part: Sequence[tuple[StreamRecord, Event]]) -> ForwardResult:
            return await self.forward([event for _, event in part], source, positions)

        async def give_up(failures: Sequence[Failure[tuple[StreamRecord, Event]]]) -> None:
            letters = [
                f.item[0].letter(
                    f.reason, source, attempts=f.attempts, error=f.error_name, kind=KIND
                )
                for f in failures
            ]
            await send_until_done(self._dead_letters(), letters, self.policy.max_delay)
            total.dead_lettered += len(letters)

        for result in await process_bounded(parsed, step, give_up, self.policy, "events"):
            total.sent += result.sent
            total.calls += result.calls
            total.retries += result.retries
            total.failed += result.failed
            total.dead_lettered += result.dead_lettered
        return total

    async def forward(
        self,
        events: Sequence[Event],
        source: str = "stream",
        where: Mapping[str, StreamRecord] | None = None,
    ) -> ForwardResult:
        """Send ``events`` and dead-letter what the tracker did not take (one attempt);
        ``where`` gives each event's record (shard, sequence number) for its letter."""
        result = await self.send(events)
        if result.failed:
            log.warning(
                "%d events did not reach the Personalize tracker; dead-lettering them "
                "(first error: %s)", len(result.failed), result.failed[0][1],
            )  # fmt: skip
            # Raising here (SQS down) fails the batch before its checkpoint, so it is
            # forwarded again rather than lost.
            known = where or {}
            await self._dead_letters().send(
                [
                    (known.get(event.event_id) or StreamRecord(event.to_json())).letter(
                        error, source, error="PutEvents", kind=KIND
                    )
                    for event, error in result.failed
                ]
            )
            result.dead_lettered = len(result.failed)
        return result

    def _dead_letters(self) -> DeadLetters:
        if self.dead_letters is None:
            raise ConfigurationError("the forwarder has no dead-letter queue to use")
        return self.dead_letters


@asynccontextmanager
async def open_personalize(settings: Settings) -> AsyncIterator[Any]:
    """An aiobotocore ``personalize-events`` client for the configured tracker endpoint.

    Our own retries (with jitter and dead-lettering) replace botocore's. A loopback
    endpoint is a local server, which gets dummy credentials like the emulator does.
    """
    endpoint = settings.personalize_endpoint_url
    kwargs: dict[str, Any] = {"region_name": settings.aws_region}
    if endpoint is not None:
        kwargs["endpoint_url"] = endpoint
        if _LOOPBACK.match(urlsplit(endpoint).hostname or ""):
            kwargs.update(aws_access_key_id="test", aws_secret_access_key="test")
    config = AioConfig(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=15,
        max_pool_connections=32,
    )
    async with get_session().create_client("personalize-events", config=config, **kwargs) as c:
        yield c


# --- dead-letter replay ---------------------------------------------------------------------


async def replay_dead_letters(
    settings: Settings,
    *,
    limit: int | None = None,
    kinds: frozenset[str] = frozenset({KIND}),
    visibility_timeout: int = 300,
) -> ReplayReport:
    """`agents.redrive.replay_dead_letters`, by default of Personalize letters only."""
    from agents.redrive import replay_dead_letters as replay

    return await replay(settings, limit=limit, kinds=kinds, visibility_timeout=visibility_timeout)
