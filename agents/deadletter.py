"""The dead-letter queue: records the agents cannot parse, or whose processing fails the
same way every time, go here, never to /dev/null.

Each message carries the raw record (base64), where it came from (stream, shard, sequence
number), which agent set it aside (``kind``) and why, so an operator can fix the producer
or the cause and re-drive it with ``recstream dlq replay`` (agents/redrive.py). The SQS
queue is ``Settings.dlq_name``.

Kinds: ``parse`` (the record is not a valid event: only the producer can fix it; the
windows agent sends it, once, and the other agents skip it), and per agent whose
processing failed: ``windows``, ``attribution``, ``archive``, ``personalize``.

SQS messages are limited in size (256 KiB a message and a batch), while a Kinesis record
may be 1 MiB: a record too large to travel inline is stored in the bucket under
``deadletters/`` and the message carries its S3 location instead.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from agents.retry import until_succeeds
from recstream.aws import translate
from recstream.errors import StoreUnavailable
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

__all__ = [
    "KINDS",
    "PARSE",
    "DeadLetter",
    "DeadLetters",
    "MemoryDeadLetters",
    "SqsDeadLetters",
    "send_until_done",
]

PARSE = "parse"
KINDS = ("parse", "windows", "attribution", "archive", "personalize")
"""Every kind of dead letter: ``parse``, or the agent that could not process the record."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    raw: bytes
    reason: str
    source: str
    """Where the record came from: the stream's name."""
    kind: str = PARSE
    """Why it is here: ``parse`` (the record is not a valid event; replaying cannot fix
    it), or the agent whose processing of it failed: ``windows``, ``attribution``,
    ``archive`` or ``personalize`` (`recstream dlq replay` runs it through that agent
    again, or sends it to the tracker again)."""
    shard: str | None = None
    """The Kinesis shard the record was read from (None when not read from a stream)."""
    sequence_number: str | None = None
    """Its Kinesis sequence number (with ``sub_sequence`` inside an aggregated record):
    where to find it again with GetShardIterator AT_SEQUENCE_NUMBER."""
    sub_sequence: int | None = None
    attempts: int = 1
    """How many times processing it failed before it was set aside (1 for a parse error)."""
    error: str = "parse"
    """``parse`` (it does not parse or validate), or the failure's exception class."""

    def body(self, raw_s3_uri: str | None = None) -> str:
        doc: dict[str, object] = {
            "kind": self.kind,
            "reason": self.reason,
            "source": self.source,
            "error": self.error,
            "attempts": self.attempts,
            "raw_bytes": len(self.raw),
            "dead_lettered_at": time.time(),
        }
        if self.shard is not None:
            doc["shard"] = self.shard
        if self.sequence_number is not None:
            doc["sequence_number"] = self.sequence_number
            doc["sub_sequence"] = self.sub_sequence or 0
        if raw_s3_uri is None:
            doc["raw_base64"] = base64.b64encode(self.raw).decode()
        else:
            doc["raw_s3_uri"] = raw_s3_uri
        return orjson.dumps(doc).decode()


class DeadLetters(Protocol):
    async def send(self, letters: Sequence[DeadLetter]) -> None: ...


INLINE_LIMIT = 192 * 1024
"""Largest message body sent inline; larger raw records go to S3 (SQS allows 256 KiB)."""
BATCH_LIMIT = 240 * 1024


class SqsDeadLetters:
    def __init__(self, client: SQSClient, settings: Settings, s3: S3Client | None = None) -> None:
        self.client = client
        self.s3 = s3
        self.settings = settings
        self._url: str | None = None

    async def _queue_url(self) -> str:
        if self._url is None:
            try:
                response = await self.client.get_queue_url(QueueName=self.settings.dlq_name)
            except (BotoCoreError, ClientError) as exc:
                raise translate(
                    exc, f"SQS queue {self.settings.dlq_name!r}", self.settings
                ) from exc
            self._url = response["QueueUrl"]
        return self._url

    async def _body(self, letter: DeadLetter) -> str:
        body = letter.body()
        if len(body) <= INLINE_LIMIT:
            return body
        if self.s3 is None:
            raise StoreUnavailable(
                f"a {len(letter.raw)}-byte record is too large for SQS and no S3 client was "
                "given to SqsDeadLetters; pass one"
            )
        key = f"deadletters/{time.strftime('%Y-%m-%d', time.gmtime())}/{uuid.uuid4().hex}.bin"
        try:
            await self.s3.put_object(Bucket=self.settings.bucket, Key=key, Body=letter.raw)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"S3 bucket {self.settings.bucket!r}", self.settings) from exc
        return letter.body(raw_s3_uri=f"s3://{self.settings.bucket}/{key}")

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        url = await self._queue_url()
        bodies = [await self._body(letter) for letter in letters]
        batches: list[list[str]] = []
        size = 0
        for body in bodies:  # at most 10 messages and BATCH_LIMIT bytes a batch
            if not batches or len(batches[-1]) == 10 or size + len(body) > BATCH_LIMIT:
                batches.append([])
                size = 0
            batches[-1].append(body)
            size += len(body)
        for chunk in batches:
            try:
                response = await self.client.send_message_batch(
                    QueueUrl=url,
                    Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)],
                )
            except (BotoCoreError, ClientError) as exc:
                raise translate(exc, f"sending to SQS queue {url}", self.settings) from exc
            if response.get("Failed"):
                # Raising makes the batch fail before its checkpoint, so the records are
                # read again rather than lost.
                raise StoreUnavailable(f"SQS refused dead letters: {response['Failed']}")


async def send_until_done(
    dead_letters: DeadLetters, letters: Sequence[DeadLetter], max_delay: float = 5.0
) -> None:
    """Send ``letters``, retrying until the queue takes them: a failing queue holds the
    shard back rather than losing them."""
    if letters:
        await until_succeeds(
            lambda: dead_letters.send(letters), f"sending {len(letters)} dead letters", max_delay
        )


class MemoryDeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)
