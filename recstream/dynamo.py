"""DynamoDB plumbing the durable stores share (`recstream.windows.DynamoWindows`,
`recstream.features.DynamoFeatures`): the budget of one item, independent writes in
flight together, and reads by key coalesced across tables (`BatchGets`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from recstream.aws import until_processed
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = ["DURABLE_ITEM_BYTES", "DYNAMODB_CONCURRENCY", "BatchGets", "in_parallel"]


DURABLE_ITEM_BYTES = 300 * 1024
"""Budget of one durable JSON document. DynamoDB refuses items over 400 KB, and a refused
item would fail its whole batch again on every retry; keys and other attributes fit in
what is left."""


DYNAMODB_CONCURRENCY = 8
"""BatchWriteItem calls of one copy in flight at once: each takes 25 items, and the
copies of a batch of interleaved users need many of them."""


async def in_parallel(
    calls: Sequence[Awaitable[object]], limit: int = DYNAMODB_CONCURRENCY
) -> None:
    """Await independent, idempotent calls, at most ``limit`` at a time; the first failure
    is raised once every call has ended (a retry repeats them all, harmlessly)."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[object]) -> None:
        async with gate:
            await call

    results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class BatchGets:
    """DynamoDB reads by key, coalesced: the `get` calls made in one turn of the event
    loop, whatever their tables, go out together as BatchGetItem calls of up to 100 keys
    across tables (what DynamoDB takes in one call), and each caller gets its own
    table's items.

    The windows agent recovers a batch's new actors' window and feature vector
    concurrently (`WindowAgent.apply`): with one `BatchGets` shared by `DynamoWindows` and
    `DynamoFeatures` (`agents.app.build_agent`) the two reads of a batch are one call
    rather than two, and a call costs the worker 3-5 million instructions
    (aiobotocore; session 10 in docs/agents.md). Each read is consistent, as before;
    what DynamoDB leaves unprocessed is asked again with backoff, and a failure fails
    every caller of the call."""

    def __init__(self, client: DynamoDBClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._waiting: list[tuple[str, list[str], asyncio.Future[dict[str, Any]]]] = []

    async def get(self, table: str, pks: Sequence[str]) -> dict[str, Mapping[str, Any]]:
        """The items of ``table`` with these ``pk`` values, by pk; absent ones left out."""
        if not pks:
            return {}
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if not self._waiting:
            # after the other coroutines started in this turn asked for theirs
            loop.call_soon(self._start)
        self._waiting.append((table, list(dict.fromkeys(pks)), future))
        return await future

    def _start(self) -> None:
        waiting, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._read(waiting))
        # (the callers hold the futures; the task ends when they are answered)
        task.add_done_callback(_retrieved)

    async def _read(
        self, waiting: Sequence[tuple[str, list[str], asyncio.Future[dict[str, Any]]]]
    ) -> None:
        wanted = [(table, pk) for table, pks, _ in waiting for pk in pks]
        found: dict[tuple[str, str], Mapping[str, Any]] = {}
        tables = sorted({table for table, _, _ in waiting})
        try:
            for start in range(0, len(wanted), 100):
                request: dict[str, Any] = {}
                for table, pk in wanted[start : start + 100]:
                    entry = request.setdefault(table, {"Keys": [], "ConsistentRead": True})
                    entry["Keys"].append({"pk": {"S": pk}})
                names = ", ".join(map(repr, tables))
                async for response in until_processed(
                    self.client.batch_get_item,
                    request,
                    "UnprocessedKeys",
                    f"reading items from {names}",
                    f"DynamoDB kept reads unprocessed on {names}; raise its capacity",
                    self.settings,
                ):
                    for table, items in response.get("Responses", {}).items():
                        for item in items:
                            found[(table, item["pk"]["S"])] = item
        except BaseException as exc:
            for _, _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for table, pks, future in waiting:
            if not future.done():
                future.set_result({pk: found[(table, pk)] for pk in pks if (table, pk) in found})


def _retrieved(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # (handed to the callers already)
