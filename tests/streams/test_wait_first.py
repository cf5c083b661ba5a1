"""`EagerWaitFirst`, the consumer's `wait_first`: faust's fetch loop waits this way for
every message (its callback against a pause of the flow). A callback that does not
suspend runs without mode's tasks; one that does is still interrupted by a pause."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import pytest
from mode import Service

from streams.kinesis.transport import Consumer, EagerWaitFirst


class Waiter(EagerWaitFirst):
    """A bare service with the consumer's `wait_first`."""


def count_tasks(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Count the tasks created on ``loop`` from now on (the returned list's one item)."""
    created = [0]

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any]
    ) -> asyncio.Task[Any]:
        created[0] += 1
        return asyncio.Task(coro, loop=loop)

    loop.set_task_factory(factory)
    return created


def test_the_kinesis_consumer_waits_eagerly() -> None:
    assert issubclass(Consumer, EagerWaitFirst)


async def test_a_callback_that_does_not_suspend_needs_no_task() -> None:
    waiter, pause = Waiter(), asyncio.Event()
    delivered: list[int] = []

    async def callback(n: int) -> int:
        delivered.append(n)
        return n * 2

    created = count_tasks(asyncio.get_running_loop())
    try:
        results = [await waiter.wait_first(callback(n), pause.wait()) for n in range(100)]
    finally:
        asyncio.get_running_loop().set_task_factory(None)
    assert delivered == list(range(100))
    assert [r.results for r in results] == [[n * 2] for n in range(100)]
    assert not any(r.stopped for r in results)
    # mode's own wait_first made four tasks per call
    assert created == [0]


async def test_a_callback_that_suspends_is_finished() -> None:
    waiter, pause, room = Waiter(), asyncio.Event(), asyncio.Event()
    steps: list[str] = []

    async def callback() -> str:
        steps.append("started")
        await room.wait()  # as a full queue waits for room
        steps.append("finished")
        return "put"

    asyncio.get_running_loop().call_later(0.01, room.set)
    result = await waiter.wait_first(callback(), pause.wait())
    assert steps == ["started", "finished"]
    assert result.results == ["put"]


async def test_a_pause_interrupts_a_suspended_callback() -> None:
    waiter, pause, room = Waiter(), asyncio.Event(), asyncio.Event()
    steps: list[str] = []

    async def callback() -> None:
        steps.append("started")
        try:
            await room.wait()
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise
        steps.append("finished")

    asyncio.get_running_loop().call_later(0.01, pause.set)
    result = await waiter.wait_first(callback(), pause.wait())
    await asyncio.sleep(0)  # the abandoned callback's cancellation is delivered
    assert steps == ["started", "cancelled"]
    assert result.results == [True]  # the pause won


async def test_a_callback_that_fails_at_once_raises() -> None:
    waiter = Waiter()

    async def callback() -> None:
        raise ValueError("undecodable")

    with pytest.raises(ValueError, match="undecodable"):
        await waiter.wait_first(callback(), asyncio.Event().wait())


async def test_a_stopped_service_waits_as_mode_does() -> None:
    waiter = Waiter()
    await waiter.stop()
    ran: list[bool] = []

    async def callback() -> None:
        ran.append(True)

    result = await Service.wait_first(waiter, callback())
    eager = await waiter.wait_first(callback())
    assert (result.stopped, eager.stopped) == (True, True)
