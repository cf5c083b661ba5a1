"""A call repeated in the background for as long as a block runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["repeating"]


@contextlib.asynccontextmanager
async def repeating(
    every_s: float, call: Callable[[], Awaitable[None]], name: str | None = None
) -> AsyncIterator[None]:
    """Await ``call()`` every ``every_s`` seconds (the first after one interval) until the
    block ends, then cancel it and wait for it. ``call`` handles its own errors: one that
    escapes ends the repetition."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(every_s)
            await call()

    task = asyncio.create_task(loop(), name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
