"""Retrying a step of an agent until it succeeds: the agents' one back-pressure loop.

A failed batch (or archive flush) must neither be skipped (events lost) nor crash the
agent: faust would restart it without re-reading the un-acked messages, and the checkpoint
would stall behind them. Retrying with backoff holds the stream back instead, and is safe
because every step it wraps is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from recstream.errors import RecstreamError

__all__ = ["until_succeeds"]

T = TypeVar("T")

log = logging.getLogger(__name__)


async def until_succeeds(step: Callable[[], Awaitable[T]], what: str, max_delay: float = 5.0) -> T:
    """``await step()`` until it returns, with exponential backoff capped at ``max_delay``;
    each failure is logged with ``what`` (e.g. "a batch of 500 records")."""
    attempt = 0
    while True:
        try:
            return await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            attempt += 1
            delay = min(max_delay, 0.1 * 2 ** min(attempt, 10))
            hint = "" if isinstance(exc, RecstreamError) else " (unexpected; please report it)"
            log.error(
                "%s failed (attempt %d), retrying in %.1fs: %s%s",
                what, attempt, delay, exc, hint,
            )  # fmt: skip
            await asyncio.sleep(delay)
