"""Build a faust app on ``kinesis://`` from `Settings`, and run it in-process or as a worker.

Usage::

    app = make_app(settings, "recstream-windows")

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def windows(stream): ...

    async with running(app):        # in-process (tests, the bench, an embedding server)
        ...

    python -m streams.kinesis agents.app:build     # one worker process (SIGTERM stops it)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import faust
from faust.exceptions import ImproperlyConfigured

from recstream.settings import Settings
from streams.kinesis.transport import (
    LEASE_STORE_ATTRIBUTE,
    SETTINGS_ATTRIBUTE,
    Consumer,
)

if TYPE_CHECKING:
    from streams.leases import LeaseStore

__all__ = [
    "MANDATORY",
    "consumer_of",
    "exit_past_blocked_threads",
    "make_app",
    "run_in_process",
    "run_worker",
    "running",
]

log = logging.getLogger(__name__)

MANDATORY: dict[str, Any] = {
    "processing_guarantee": "at_least_once",
    "table_standby_replicas": 0,
    "producer_threaded": False,
    "topic_disable_leader": True,
}
"""faust settings the Kinesis transport needs; make_app refuses others for these keys."""

DEFAULTS: dict[str, Any] = {
    # No HTTP server per worker unless asked for (it would take port 6066).
    "web_enabled": False,
    # faust waits this long after a rebalance before resuming; with no changelog tables
    # to recover there is nothing to wait for.
    "stream_recovery_delay": 0.0,
    # The batch that may be processed twice after a crash is what was acked since the
    # last commit; a second keeps it small.
    "broker_commit_interval": 1.0,
    "producer_linger": 0.005,
    "topic_allow_declare": True,
}


def make_app(
    settings: Settings,
    app_id: str,
    *,
    aggregate: bool = False,
    whole_records: bool = False,
    lease_store: LeaseStore | None = None,
    **faust_kwargs: Any,
) -> faust.App:
    """A faust App on ``kinesis://`` bound to ``settings`` (endpoints, region, leases,
    worker id, start position), with the settings the transport needs.

    A topic named ``settings.stream_name`` is that Kinesis stream. ``aggregate=True``
    makes the app's producer write aggregated (v2) records. ``whole_records=True`` hands
    each aggregated record to the agents as one message, to be split with
    `streams.kinesis.unpack` (faust's ~100 µs per message is then paid per record).
    ``lease_store`` replaces the DynamoDB lease table (an `InMemoryLeaseStore` for
    single-process use).
    """
    if "#" in app_id or "#" in settings.stream_name:
        raise ImproperlyConfigured(
            f"app id {app_id!r} or stream {settings.stream_name!r} contains '#', the "
            "separator of lease keys; rename it"
        )
    for key, required in MANDATORY.items():
        if key in faust_kwargs and faust_kwargs[key] != required:
            raise ImproperlyConfigured(
                f"{key}={faust_kwargs[key]!r} is not supported by the kinesis:// transport; "
                f"it needs {key}={required!r} (see docs/streams.md)"
            )
    # faust keeps a data directory even without tables; by default it would be created
    # in the current directory.
    datadir = settings.state_dir / "faust" / app_id
    if "datadir" not in faust_kwargs:
        # faust creates the directory itself, but not its parents.
        datadir.parent.mkdir(parents=True, exist_ok=True)
    options = {**DEFAULTS, "datadir": str(datadir), **faust_kwargs, **MANDATORY}
    query = "&".join(
        name
        for name, on in (("aggregate=true", aggregate), ("whole_records=true", whole_records))
        if on
    )
    broker = f"kinesis://?{query}" if query else "kinesis://"
    app = faust.App(app_id, broker=broker, **options)
    setattr(app, SETTINGS_ATTRIBUTE, settings)
    if lease_store is not None:
        setattr(app, LEASE_STORE_ATTRIBUTE, lease_store)
    return app


def consumer_of(app: faust.App) -> Consumer:
    """The app's Kinesis consumer (lag, readers, owned shards)."""
    consumer = app.consumer
    if not isinstance(consumer, Consumer):
        raise TypeError(f"{app.conf.id} does not run on kinesis:// (its consumer is {consumer!r})")
    return consumer


@contextlib.asynccontextmanager
async def running(app: faust.App) -> AsyncIterator[faust.App]:
    """Start the app's worker services in this event loop; stop them (and release the
    leases) on exit."""
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def load_factory(spec: str) -> Callable[[Settings], faust.App]:
    """``"package.module:function"`` -> the function (it takes Settings, returns an App)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ImproperlyConfigured(f"{spec!r} is not module:function")
    module = importlib.import_module(module_name)
    return cast(Callable[[Settings], faust.App], getattr(module, attribute))


async def run_worker(factory: Callable[[Settings], faust.App], settings: Settings) -> None:
    """Run one worker until SIGTERM or SIGINT, then stop cleanly (commit, release).

    If the app crashes (e.g. its stream does not exist), it is stopped and the crash
    reason is raised, so the process exits with an error that says what to fix.
    """
    app = factory(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(app):
        log.info("worker %s of %s running", consumer_of(app).worker_id, app.conf.id)
        # mode marks a crashed service (and its parents) through this event; it has no
        # public awaitable for it.
        crashed = asyncio.ensure_future(app._crashed.wait())
        stopped = asyncio.ensure_future(app.wait_for_stopped())
        waiter = asyncio.ensure_future(stop.wait())
        futures = {crashed, stopped, waiter}
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        for future in futures:
            future.cancel()
    reason = app.crash_reason
    if app._crashed.is_set() and reason is not None:
        raise reason


class _AbandonedOnShutdown(ThreadPoolExecutor):
    """The worker loop's default executor (``asyncio.to_thread``). Its shutdown does not
    wait for the threads still running: `asyncio.run` would otherwise join them when the
    worker has stopped, and a thread blocked on a store that does not answer (the trend
    keeper reads the S3 archive with boto3 in a thread: up to 3 x 60 s a call) held a
    stopped worker past any grace period (tests/reliability/test_drill_sigterm.py).
    `exit_past_blocked_threads` then decides how long they may hold the process."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


def run_in_process(factory: Callable[[Settings], faust.App], settings: Settings) -> None:
    """`run_worker` in a new event loop of this process, until SIGTERM or SIGINT.

    The loop is uvloop's where it is installed (a project dependency off Windows), as
    the API's is: under `bench.ingest` a worker spent ~14 % of its samples in the
    standard loop's socket writes and ~4 % in its own scheduling (docs/agents.md)."""

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(
            _AbandonedOnShutdown(thread_name_prefix="worker-io")
        )
        await run_worker(factory, settings)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None  # asyncio's own
    return cast("Callable[[], asyncio.AbstractEventLoop]", uvloop.new_event_loop)


def exit_past_blocked_threads(grace_s: float) -> None:
    """After a worker stopped: give the threads still running ``grace_s`` seconds to end,
    then end the process if some have not (``os._exit(0)``), since the interpreter would
    wait for them at exit for as long as they block. By then the worker has committed what
    it could and released (or given up) its leases; what a leftover thread does is a read
    of a store that does not answer, safe to abandon."""
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
    blocked = [
        t.name
        for t in threading.enumerate()
        if t is not threading.current_thread() and not t.daemon and t.is_alive()
    ]
    if blocked:
        log.warning(
            "the worker stopped, but %d threads are still blocked after %.0f s (%s); exiting "
            "without them",
            len(blocked),
            grace_s,
            ", ".join(blocked),
        )
        logging.shutdown()
        os._exit(0)
