"""`recstream agents`: one stream worker process, until SIGTERM or Ctrl-C.

On a signal the worker stops gracefully: agents finish their batch, the transport
checkpoints it and releases its shard leases, so another worker takes over at once
rather than after the lease expiry. With AWS unreachable, every step of the stop is
bounded (about a lease duration each), so the process still exits
(tests/reliability/test_drill_sigterm.py).
"""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from agents.app import create_app
from recstream import tracing
from recstream.heap import tuned_collector
from recstream.settings import Settings
from streams.kinesis.app import exit_past_blocked_threads, run_in_process

__all__ = ["GC_THRESHOLDS", "run"]

GC_THRESHOLDS = (50_000, 20, 100)
"""The cyclic collector's thresholds in a worker (Python's defaults: 700, 10, 10),
through `recstream.heap.tuned_collector`, which also freezes what exists at start-up out
of the scans: a worker allocates many short-lived objects per event (parsed events,
script arguments, botocore requests) next to a large long-lived heap (faust, botocore's
service models), and with the default thresholds the collector ran every few hundred
events, rescanning that heap: about a sixth of the agent's CPU (docs/agents.md)."""


def run(settings: Settings) -> int:
    if settings.agents_metrics_port is not None:
        start_http_server(settings.agents_metrics_port, addr=settings.api_host)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The agents continue the traces the collector put in the envelopes (a no-op when
    # no OTLP endpoint is configured); the last spans are flushed on the way out.
    provider = tracing.configure(settings, "recstream-agents")
    try:
        with tuned_collector(GC_THRESHOLDS):
            run_in_process(create_app, settings)
    finally:
        tracing.shutdown(provider)
    # A thread blocked on a store that does not answer must not keep a stopped worker
    # alive (streams/kinesis/app.py says why); it gets one lease duration.
    exit_past_blocked_threads(settings.lease_duration_s)
    return 0
