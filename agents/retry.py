"""The agents' one failure policy: what is retried, how long, and what is set aside.

Every agent (windows, attribution, the Personalize forwarder, the archive) runs its
batches through `process_bounded`, which sorts each failure into one of two kinds:

    transient        an outage or throttling: `RecstreamError.retriable` (Redis down,
                     `StoreUnavailable`, `ThroughputExceeded`, 5xx), connection errors and
                     timeouts; also what only an operator can fix and no record causes
                     (`ResourceNotFound`: run `recstream up`; `ConfigurationError`)
                     -> retried without limit, backoff up to ``max_delay``: the shard
                        waits (back-pressure) and nothing is skipped
    deterministic    `RequestRefused` (a store refused the request as invalid; its
                     `RecordsRefused` names the records), `ValidationFailed`, and any
                     unexpected exception (a bug)
                     -> retried ``max_attempts`` times, then narrowed down to the records
                        that fail on their own (the ones a `RecordsRefused` names, else
                        halves of the batch, in order), which are handed to ``give_up``
                        (the dead-letter queue, with the reason); the rest is processed

Retrying and bisecting are safe because every step they wrap is idempotent (each agent
records what it applied, or writes content-named objects). A failed batch is never
skipped (events lost) nor allowed to crash the agent: faust would restart it without
re-reading the un-acked messages, and the checkpoint would stall behind them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import redis.exceptions
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

from recstream.errors import (
    ConfigurationError,
    RecstreamError,
    RequestRefused,
    ResourceNotFound,
)

if TYPE_CHECKING:
    from recstream.settings import Settings

__all__ = [
    "Failure",
    "RecordsRefused",
    "RetryPolicy",
    "process_bounded",
    "transient",
    "until_succeeds",
]

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class RecordsRefused(RequestRefused):
    """Some records of a batch failed deterministically; the others were processed.

    ``items`` are their positions in the batch the step was given, ``reasons`` what
    failed for each (same order)."""

    def __init__(self, message: str, items: Sequence[int], reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.items = tuple(items)
        self.reasons = tuple(reasons)


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    HTTPClientError,
    BotoConnectionError,
)


def transient(exc: BaseException) -> bool:
    """True when retrying later can succeed without changing the record (see above)."""
    if isinstance(exc, RecstreamError):
        return exc.retriable or isinstance(exc, ResourceNotFound | ConfigurationError)
    return isinstance(exc, _TRANSIENT_TYPES)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a deterministic failure is retried, and how long the waits grow."""

    max_attempts: int = 3
    """Attempts at a deterministically failing batch before it is narrowed down."""
    max_delay: float = 5.0
    base_delay: float = 0.05

    @classmethod
    def of(cls, settings: Settings, max_delay: float = 5.0) -> RetryPolicy:
        return cls(max_attempts=settings.agent_max_attempts, max_delay=max_delay)

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2.0 ** min(attempt, 10))


@dataclass(frozen=True, slots=True)
class Failure(Generic[T]):
    """A record set aside: what failed, how often."""

    item: T
    error: BaseException
    attempts: int

    @property
    def reason(self) -> str:
        return f"processing failed {self.attempts} times: {self.error}"

    @property
    def error_name(self) -> str:
        """The failure's class (a record named by `RecordsRefused` was refused itself)."""
        if isinstance(self.error, RecordsRefused):
            return RequestRefused.__name__
        return type(self.error).__name__


async def process_bounded(
    items: Sequence[T],
    step: Callable[[Sequence[T]], Awaitable[R]],
    give_up: Callable[[Sequence[Failure[T]]], Awaitable[None]],
    policy: RetryPolicy,
    what: str = "records",
) -> list[R]:
    """Run ``step`` over ``items`` until every item was processed by a step that
    returned, or handed to ``give_up`` (see the module docstring); the steps' results,
    in order. Raises only for cancellation (and what ``give_up`` raises)."""
    results: list[R] = []

    async def run(part: Sequence[T]) -> None:
        attempts = waits = 0
        while True:
            try:
                results.append(await step(part))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if transient(exc):
                    # An outage, throttling, a missing resource: wait and retry the same
                    # records, however long it takes, holding the shard back.
                    waits += 1
                    log.error(
                        "%d %s failed, retrying (transient, wait %d): %s",
                        len(part), what, waits, exc,
                    )  # fmt: skip
                    await asyncio.sleep(policy.delay(waits))
                    continue
                attempts += 1
                hint = "" if isinstance(exc, RecstreamError) else " (unexpected; please report it)"
                log.error(
                    "%d %s failed (attempt %d of %d): %s%s",
                    len(part), what, attempts, policy.max_attempts, exc, hint,
                )  # fmt: skip
                if attempts < policy.max_attempts:
                    await asyncio.sleep(policy.delay(attempts))
                    continue
                if len(part) == 1:
                    await give_up([Failure(part[0], exc, attempts)])
                    return
                named = exc.items if isinstance(exc, RecordsRefused) else ()
                if named and all(0 <= n < len(part) for n in named):
                    # The failure names its records: the others go on, then each named
                    # one is tried alone (it may have failed only with its batch).
                    bad = set(named)
                    rest = [x for n, x in enumerate(part) if n not in bad]
                    if rest:
                        await run(rest)
                    for n in sorted(bad):
                        await run([part[n]])
                    return
                # Find the records that fail on their own: halves, in order (each step
                # is idempotent, so what a failed attempt did is skipped next time).
                middle = len(part) // 2
                await run(part[:middle])
                await run(part[middle:])
                return

    if items:
        await run(items)
    return results


async def until_succeeds(step: Callable[[], Awaitable[T]], what: str, max_delay: float = 5.0) -> T:
    """``await step()`` until it returns, with exponential backoff capped at ``max_delay``;
    each failure is logged with ``what``. For steps no record can make fail, such as
    sending dead letters: a failing queue holds the shard back rather than losing them."""
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
