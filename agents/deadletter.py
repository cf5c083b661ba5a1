"""The dead-letter queue: records the agents cannot parse go here, never to /dev/null.

Each message carries the raw record (base64), where it came from and why it failed, so an
operator can fix the producer and replay it. The SQS queue is ``Settings.dlq_name``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from recstream.aws import translate
from recstream.errors import StoreUnavailable
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

__all__ = ["DeadLetter", "DeadLetters", "MemoryDeadLetters", "SqsDeadLetters"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    raw: bytes
    reason: str
    source: str
    """Where the record came from, e.g. ``stream/shardId-000000000001``."""

    def body(self) -> str:
        return orjson.dumps(
            {
                "reason": self.reason,
                "source": self.source,
                "raw_base64": base64.b64encode(self.raw).decode(),
                "dead_lettered_at": time.time(),
            }
        ).decode()


class DeadLetters(Protocol):
    async def send(self, letters: Sequence[DeadLetter]) -> None: ...


class SqsDeadLetters:
    def __init__(self, client: SQSClient, settings: Settings) -> None:
        self.client = client
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

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        url = await self._queue_url()
        for start in range(0, len(letters), 10):
            chunk = letters[start : start + 10]
            try:
                response = await self.client.send_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "MessageBody": letter.body()}
                        for i, letter in enumerate(chunk)
                    ],
                )
            except (BotoCoreError, ClientError) as exc:
                raise translate(exc, f"sending to SQS queue {url}", self.settings) from exc
            if response.get("Failed"):
                # Raising makes the batch fail before its checkpoint, so the records are
                # read again rather than lost.
                raise StoreUnavailable(f"SQS refused dead letters: {response['Failed']}")


class MemoryDeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)
