"""Detached reads (serving/pipeline/detach.py): a request that stops waiting leaves the
read running; the read's owner ends the ones still running when it closes."""

from __future__ import annotations

import asyncio

import pytest

from serving.pipeline.detach import Reads, cancel_detached, detached


async def test_a_request_that_gives_up_leaves_the_read_running() -> None:
    owner: Reads = set()
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        return "done"

    waiting = detached(read(), owner)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await waiting
    (task,) = owner
    assert not task.done()  # the read goes on
    release.set()
    assert await task == "done"
    assert owner == set()  # finished reads leave the set


async def test_closing_the_owner_ends_reads_that_never_answer() -> None:
    owner: Reads = set()
    others: Reads = set()
    never = asyncio.Event()
    stuck = [detached(never.wait(), owner) for _ in range(3)]
    other = detached(never.wait(), others)
    await asyncio.sleep(0)
    await cancel_detached(owner, within=5.0)
    assert owner == set()
    for outer in stuck:
        assert outer.cancelled()
    assert not other.done()  # another owner's reads are left alone
    await cancel_detached(others)
    assert other.cancelled()
