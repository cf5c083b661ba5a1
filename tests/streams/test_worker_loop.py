"""`run_in_process` runs a worker on uvloop when it is installed (it is a dependency)."""

from __future__ import annotations

import asyncio

import uvloop

from streams.kinesis.app import _loop_factory


def test_workers_run_on_uvloop() -> None:
    factory = _loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            assert runner.run(_running_loop_kind()) is uvloop.Loop
    finally:
        loop.close()


async def _running_loop_kind() -> type:
    return type(asyncio.get_running_loop())
