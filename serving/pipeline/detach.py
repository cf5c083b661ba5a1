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

__all__ = ["detached"]

T = TypeVar("T")


def detached(read: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """``read`` running on its own; awaiting (and cancelling) the result leaves it be."""
    task = asyncio.ensure_future(read)
    task.add_done_callback(_consume)
    return asyncio.shield(task)


def _consume(task: asyncio.Future[Any]) -> None:
    # Nobody may be waiting any more: retrieve the outcome so asyncio does not log
    # "exception was never retrieved"; the request that waited already named the store in
    # its ``degraded`` list.
    if not task.cancelled():
        task.exception()
