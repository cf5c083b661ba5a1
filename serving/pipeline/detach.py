"""Store reads that a request's deadline abandons instead of cancelling.

A request stops waiting for a store at its deadline (serving/pipeline/ranker.py). If that
cancelled the read, redis-py would have to drop the connection, its reply half read, and
the next request would open a new one: under load, deadline misses then cost reconnects,
which cause more misses (py-spy found 17 % of the server's samples in connection set-up;
docs/serving-speed.md). A detached read runs on as its own task and returns its connection
to the pool intact; the request just stops waiting for it. The pool's ``max_connections``
and the socket timeout (recstream/stores.py) bound how many can be left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["cancel_detached", "detached", "started"]

T = TypeVar("T")

Reads = set["asyncio.Task[Any]"]
"""The detached reads an owner (a `Ranker`) started and that still run, so it can end
them when it closes: left to the collector after their loop closed (a store that never
answered), their half-read connections were reported unclosed long after, in whatever
ran next."""


def detached(read: Coroutine[Any, Any, T], owner: Reads | None = None) -> asyncio.Future[T]:
    """``read`` running on its own; awaiting (and cancelling) the result leaves it be.
    With ``owner``, the read is in that set while it runs."""
    return asyncio.shield(started(read, owner))


def started(read: Coroutine[Any, Any, T], owner: Reads | None = None) -> asyncio.Task[T]:
    """``read`` as a task of its own, in ``owner`` while it runs, its outcome retrieved
    even if nobody awaits it. Whoever waits for it should shield it (`detached`)."""
    task = asyncio.ensure_future(read)
    if owner is not None:
        owner.add(task)
        task.add_done_callback(owner.discard)
    task.add_done_callback(_consume)
    return task


async def cancel_detached(owner: Reads, within: float = 5.0) -> None:
    """Cancel ``owner``'s running reads and wait (at most ``within`` seconds) for them to
    end: redis-py closes the connection of a cancelled read."""
    running = list(owner)
    for task in running:
        task.cancel()
    if running:
        await asyncio.wait(running, timeout=within)


def _consume(task: asyncio.Future[Any]) -> None:
    # Nobody may be waiting any more: retrieve the outcome so asyncio does not log
    # "exception was never retrieved"; the request that waited already named the store in
    # its ``degraded`` list.
    if not task.cancelled():
        task.exception()
