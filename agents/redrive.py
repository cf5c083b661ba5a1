"""`recstream dlq replay`: re-drive dead letters through the agent that set them aside.

Each letter names its ``kind`` (agents/deadletter.py). Once the cause is fixed (a key of
the wrong type deleted, the tracker back, a bug fixed), replaying a letter runs its
record through that agent again, exactly as the stream would have:

    windows       the windows agent's apply: window, features, trending, durable copies
    attribution   the attribution agent's apply: counters in Redis and DynamoDB
    archive       written to the S3 archive, in an object of its own
    personalize   PutEvents again (Personalize keeps the first event of an eventId)
    parse         never re-driven: the record is not an event; only its producer can fix it

Each agent's apply is idempotent (event ids are recorded with their effects; archive
objects are named after their content), so re-driving a letter twice, or one whose record
the agent applied after all, changes nothing. A letter is deleted from the queue only
after its re-drive succeeded; one that fails again stays (visible again at once), with
its new error in the report. Only the agent its kind names runs: the stream is not
replayed into the other agents, which processed the record already.

Personalize letters are also re-driven without an operator: when the tracker is
unreachable, throttles or fails past the forwarder's retry budget, the forwarder
dead-letters the events rather than hold the stream (the other agents must not wait for a
third party), and every ``personalize_redrive_s`` each worker hands up to `REDRIVE_BATCH`
of them to `redrive_personalize`: what the tracker takes is deleted, what it still
refuses stays for the next tick. So an outage of Personalize ends with every event
delivered and the queue empty. Several workers may tick at once: SQS hides a received
letter from the others for the visibility timeout, and a letter sent twice repeats an
``eventId``, which Personalize ignores.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from agents.deadletter import KINDS, PARSE
from agents.windows import parse_event
from recstream.aws import async_client, translate
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

__all__ = [
    "REDRIVABLE",
    "REDRIVE_BATCH",
    "ReplayReport",
    "redrive_personalize",
    "replay_dead_letters",
]

log = logging.getLogger(__name__)

REDRIVABLE = frozenset(KINDS) - {PARSE}
"""The kinds whose letters can succeed on a second try."""

Redrive = Callable[[Sequence[Event]], Awaitable[dict[str, str]]]
"""Re-drive events of one kind; returns the errors of those that failed, by event id."""


@dataclass
class ReplayReport:
    received: int = 0
    replayed: int = 0
    """Dead letters re-driven successfully and deleted from the queue."""
    failed: int = 0
    """Re-driven but failed again; they stay in the queue."""
    kept: dict[str, int] = field(default_factory=dict)
    """Letters not re-driven (records that did not parse, kinds not asked for), by kind."""
    replayed_kinds: dict[str, int] = field(default_factory=dict)
    """What was replayed, by kind."""
    reasons: list[str] = field(default_factory=list)
    """A sample of the reasons of what was kept or failed."""

    def note(self, reason: str) -> None:
        if len(self.reasons) < 20:
            self.reasons.append(reason)


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


class _Agents:
    """The re-drive of each kind, opened on first use (a replay of windows letters does
    not need the Personalize tracker, nor the reverse)."""

    def __init__(self, settings: Settings, stack: AsyncExitStack) -> None:
        self.settings = settings
        self.stack = stack
        self.made: dict[str, Redrive | str] = {}

    async def get(self, kind: str) -> Redrive | str:
        """The re-drive of ``kind``, or why there is none."""
        if kind not in self.made:
            self.made[kind] = await self._make(kind)
        return self.made[kind]

    async def _make(self, kind: str) -> Redrive | str:
        s = self.settings
        if kind == "personalize":
            from agents.forwarder import Forwarder, open_personalize

            if not s.personalize_tracking_id:
                return (
                    "replaying Personalize letters needs the tracker: set "
                    "RECSTREAM_PERSONALIZE_TRACKING_ID (and RECSTREAM_PERSONALIZE_ENDPOINT_URL "
                    "if it is not real AWS)"
                )
            forwarder = Forwarder(await self.stack.enter_async_context(open_personalize(s)), s)

            async def personalize(events: Sequence[Event]) -> dict[str, str]:
                result = await forwarder.send(events)
                return {event.event_id: error for event, error in result.failed}

            return personalize
        if kind == "archive":
            from agents.archive import ArchiveBuffer, S3ArchiveSink

            sink = S3ArchiveSink(await self.stack.enter_async_context(async_client(s, "s3")), s)

            async def archive(events: Sequence[Event]) -> dict[str, str]:
                await ArchiveBuffer[None].of(sink, s).write(events)
                return {}

            return archive
        from recstream.stores import open_stores

        stores = await self.stack.enter_async_context(open_stores(s))
        apply: Callable[[Sequence[Event]], Awaitable[object]]
        if kind == "windows":
            from agents.app import build_agent

            apply = build_agent(stores, s).apply
        elif kind == "attribution":
            from agents.attribution import AttributionAgent, DynamoCounters

            apply = AttributionAgent(stores.redis, DynamoCounters(stores.dynamodb, s), s).apply
        else:
            return f"no agent re-drives letters of kind {kind!r}"

        async def one_by_one(events: Sequence[Event]) -> dict[str, str]:
            # One at a time: a letter that fails again must not keep the others back.
            failed: dict[str, str] = {}
            for event in events:
                try:
                    await apply([event])
                except Exception as exc:  # reported, and the letter kept
                    failed[event.event_id] = f"{type(exc).__name__}: {exc}"
            return failed

        return one_by_one


async def replay_dead_letters(
    settings: Settings,
    *,
    limit: int | None = None,
    kinds: frozenset[str] = REDRIVABLE,
    visibility_timeout: int = 300,
) -> ReplayReport:
    """Re-drive the dead letters of ``kinds`` (see the module docstring); letters of other
    kinds, and those that cannot succeed by retrying (``parse``), stay in the queue and
    are counted in the report. At most ``limit`` messages are received."""
    report = ReplayReport()
    async with (
        async_client(settings, "sqs") as sqs,
        async_client(settings, "s3") as s3,
        AsyncExitStack() as stack,
    ):
        try:
            url = (await sqs.get_queue_url(QueueName=settings.dlq_name))["QueueUrl"]
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"SQS queue {settings.dlq_name!r}", settings, "sqs") from exc
        agents = _Agents(settings, stack)
        leave: list[str] = []
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
            await _replay_batch(messages, settings, s3, sqs, url, agents, kinds, report, leave)
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


async def _replay_batch(
    messages: Sequence[Any],
    settings: Settings,
    s3: S3Client,
    sqs: SQSClient,
    url: str,
    agents: _Agents,
    kinds: frozenset[str],
    report: ReplayReport,
    leave: list[str],
) -> None:
    todo: dict[str, list[tuple[str, Event]]] = {}
    for message in messages:
        handle = message["ReceiptHandle"]
        try:
            doc = json.loads(message["Body"])
            kind = str(doc.get("kind", PARSE))
        except (ValueError, AttributeError):
            kind, doc = "unreadable", {}
        if kind not in kinds or kind not in REDRIVABLE:
            report.kept[kind] = report.kept.get(kind, 0) + 1
            report.note(f"{kind}: {doc.get('reason', 'no reason given')}")
            leave.append(handle)
            continue
        event = parse_event(await _raw_of(doc, s3, settings))
        if isinstance(event, str):
            report.kept["unreadable"] = report.kept.get("unreadable", 0) + 1
            report.note(f"a {kind} letter whose event does not parse: {event}")
            leave.append(handle)
            continue
        todo.setdefault(kind, []).append((handle, event))
    done: list[str] = []
    for kind, letters in todo.items():
        redrive = await agents.get(kind)
        if isinstance(redrive, str):
            failed = {event.event_id: redrive for _, event in letters}
        else:
            failed = await redrive([event for _, event in letters])
        for handle, event in letters:
            if event.event_id in failed:
                report.failed += 1
                report.note(f"{kind} {event.event_id}: {failed[event.event_id]}")
                leave.append(handle)
            else:
                done.append(handle)
                report.replayed_kinds[kind] = report.replayed_kinds.get(kind, 0) + 1
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
            # The events were re-driven; a letter not deleted is re-driven once more next
            # time, which changes nothing (every re-drive is idempotent).
            log.warning("SQS did not delete %d replayed dead letters", len(response["Failed"]))


REDRIVE_BATCH = 200
"""Letters received per automatic re-drive at most, so one tick during a long outage
stays short."""


async def redrive_personalize(settings: Settings, limit: int = REDRIVE_BATCH) -> ReplayReport:
    """One automatic re-drive pass of the Personalize letters (a worker's timer); logs
    what it delivered and what is still waiting."""
    report = await replay_dead_letters(settings, limit=limit, kinds=frozenset({"personalize"}))
    if report.replayed:
        log.info("re-drove %d dead-lettered events to Personalize", report.replayed)
    if report.failed:
        log.warning(
            "%d dead-lettered events still not taken by Personalize; retrying in %.0f s (%s)",
            report.failed, settings.personalize_redrive_s, "; ".join(report.reasons[:1]),
        )  # fmt: skip
    return report
