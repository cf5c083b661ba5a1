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
  ``personalize_retry_max_s``, ``personalize_max_attempts`` attempts); what still fails,
  or is refused as invalid, goes to the dead-letter queue (kind ``personalize``) with the
  error, one message per event, and `replay_dead_letters` (``recstream dlq replay``)
  sends it again later.

Delivery is at least once: a batch re-read after a crash is sent again. Personalize
keeps the first event of each ``eventId`` and ignores later ones, and our event ids are
the producers' idempotency keys, so a repeat changes nothing there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import ValidationError

from agents.deadletter import DeadLetter, DeadLetters
from agents.windows import StoredEvent
from recstream.aws import async_client, error_code, translate
from recstream.errors import ConfigurationError
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

__all__ = [
    "KIND",
    "MAX_EVENTS_PER_CALL",
    "ForwardResult",
    "Forwarder",
    "PutEventsCall",
    "ReplayReport",
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

    def backoff(self, attempt: int) -> float:
        """Full jitter (AWS's recommendation): uniform in [0, min(cap, base * 2^attempt)]."""
        s = self.settings
        cap = min(s.personalize_retry_max_s, s.personalize_retry_base_s * 2.0**attempt)
        return float(self.rng() * cap)

    async def put(self, call: PutEventsCall, result: ForwardResult) -> str | None:
        """One call with retries; None when the tracker took it, else the last error."""
        attempts = self.settings.personalize_max_attempts
        for attempt in range(attempts):
            try:
                await self.client.put_events(**call.request(self.tracking_id))
            except asyncio.CancelledError:
                raise
            except (TimeoutError, BotoCoreError, ClientError, OSError) as exc:
                if not _retriable(exc):
                    return _describe(exc)
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

    async def process(self, records: Sequence[bytes], source: str = "stream") -> ForwardResult:
        """The agent's step: forward what parses (the windows agent dead-letters the
        rest), and dead-letter what the tracker did not take, with the error."""
        events: list[Event] = []
        for raw in records:
            try:
                events.append(StoredEvent.from_json(raw))
            except ValidationError:
                continue
        result = await self.send(events)
        if result.failed:
            log.warning(
                "%d events did not reach the Personalize tracker; dead-lettering them "
                "(first error: %s)", len(result.failed), result.failed[0][1],
            )  # fmt: skip
            if self.dead_letters is None:
                raise ConfigurationError("the forwarder has no dead-letter queue to use")
            # Raising here (SQS down) fails the batch before its checkpoint, so it is
            # forwarded again rather than lost.
            await self.dead_letters.send(
                [
                    DeadLetter(raw=event.to_json(), reason=error, source=source, kind=KIND)
                    for event, error in result.failed
                ]
            )
            result.dead_lettered = len(result.failed)
        return result


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


@dataclass
class ReplayReport:
    received: int = 0
    replayed: int = 0
    """Dead letters re-driven successfully and deleted from the queue."""
    failed: int = 0
    """Re-driven but failed again; they stay in the queue."""
    kept: dict[str, int] = field(default_factory=dict)
    """Letters of other kinds (e.g. records that did not parse), left in the queue."""
    reasons: list[str] = field(default_factory=list)
    """A sample of the reasons of what was kept or failed."""


async def _raw_of(doc: dict[str, Any], s3: S3Client, settings: Settings) -> bytes:
    if "raw_base64" in doc:
        return base64.b64decode(doc["raw_base64"])
    uri = str(doc["raw_s3_uri"])
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        response = await s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return bytes(await body.read())
    except (BotoCoreError, ClientError) as exc:
        raise translate(exc, f"reading the dead letter {uri}", settings, "s3") from exc


async def replay_dead_letters(
    settings: Settings,
    *,
    limit: int | None = None,
    kinds: frozenset[str] = frozenset({KIND}),
    visibility_timeout: int = 300,
) -> ReplayReport:
    """Re-drive dead letters: events the tracker did not take go to PutEvents again, and
    each message is deleted only once its event was taken. Letters of other kinds (a
    record that does not parse cannot succeed by retrying) stay in the queue and are
    counted in the report. At most ``limit`` messages are received."""
    report = ReplayReport()
    async with (
        async_client(settings, "sqs") as sqs,
        async_client(settings, "s3") as s3,
    ):
        try:
            url = (await sqs.get_queue_url(QueueName=settings.dlq_name))["QueueUrl"]
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"SQS queue {settings.dlq_name!r}", settings, "sqs") from exc
        leave: list[str] = []
        async with _maybe_personalize(settings, kinds) as forwarder:
            while limit is None or report.received < limit:
                batch = 10 if limit is None else min(10, limit - report.received)
                try:
                    response = await sqs.receive_message(
                        QueueUrl=url,
                        MaxNumberOfMessages=batch,
                        VisibilityTimeout=visibility_timeout,
                        WaitTimeSeconds=0,
                    )
                except (BotoCoreError, ClientError) as exc:
                    raise translate(exc, f"receiving from {url}", settings, "sqs") from exc
                messages = response.get("Messages", [])
                if not messages:
                    break
                report.received += len(messages)
                await _replay_batch(
                    messages, settings, s3, sqs, url, forwarder, kinds, report, leave
                )
        # What stays must be visible again now, not after the visibility timeout.
        for start in range(0, len(leave), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                for i, handle in enumerate(leave[start : start + 10])
            ]
            try:
                await sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)  # type: ignore[arg-type]
            except (BotoCoreError, ClientError) as exc:
                log.warning("could not make kept dead letters visible again: %s", exc)
    return report


@asynccontextmanager
async def _maybe_personalize(
    settings: Settings, kinds: frozenset[str]
) -> AsyncIterator[Forwarder | None]:
    if KIND not in kinds:
        yield None
        return
    if not settings.personalize_tracking_id:
        raise ConfigurationError(
            "replaying Personalize dead letters needs the tracker: set "
            "RECSTREAM_PERSONALIZE_TRACKING_ID (and RECSTREAM_PERSONALIZE_ENDPOINT_URL if "
            "it is not real AWS)"
        )
    async with open_personalize(settings) as client:
        yield Forwarder(client, settings)


async def _replay_batch(
    messages: Sequence[Any],
    settings: Settings,
    s3: S3Client,
    sqs: SQSClient,
    url: str,
    forwarder: Forwarder | None,
    kinds: frozenset[str],
    report: ReplayReport,
    leave: list[str],
) -> None:
    todo: list[tuple[str, Event]] = []
    for message in messages:
        handle = message["ReceiptHandle"]
        try:
            doc = json.loads(message["Body"])
            kind = str(doc.get("kind", "parse"))
        except (ValueError, AttributeError):
            kind, doc = "unreadable", {}
        if kind != KIND or forwarder is None or KIND not in kinds:
            report.kept[kind] = report.kept.get(kind, 0) + 1
            if len(report.reasons) < 20:
                report.reasons.append(f"{kind}: {doc.get('reason', 'no reason given')}")
            leave.append(handle)
            continue
        try:
            todo.append((handle, Event.from_json(await _raw_of(doc, s3, settings))))
        except ValidationError as exc:
            report.kept["unreadable"] = report.kept.get("unreadable", 0) + 1
            report.reasons.append(f"a {KIND} letter whose event does not parse: {exc}")
            leave.append(handle)
    if not todo or forwarder is None:
        return
    result = await forwarder.send([event for _, event in todo])
    failed_ids = {event.event_id for event, _ in result.failed}
    for event, error in result.failed[: max(0, 20 - len(report.reasons))]:
        report.reasons.append(f"{event.event_id}: {error}")
    done = [handle for handle, event in todo if event.event_id not in failed_ids]
    leave.extend(handle for handle, event in todo if event.event_id in failed_ids)
    report.failed += len(todo) - len(done)
    for start in range(0, len(done), 10):
        entries = [
            {"Id": str(i), "ReceiptHandle": handle}
            for i, handle in enumerate(done[start : start + 10])
        ]
        try:
            response = await sqs.delete_message_batch(QueueUrl=url, Entries=entries)  # type: ignore[arg-type]
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"deleting replayed dead letters from {url}", settings) from exc
        report.replayed += len(response.get("Successful", []))
        if response.get("Failed"):
            # The events were sent; a letter not deleted is sent once more next time,
            # which the tracker ignores (same eventId).
            log.warning("SQS did not delete %d replayed dead letters", len(response["Failed"]))
