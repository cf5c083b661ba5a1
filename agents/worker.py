"""`recstream agents`: one stream worker process, until SIGTERM or Ctrl-C.

faust's Worker owns the event loop, handles the signals, and stops the app gracefully:
agents finish their batch, the transport checkpoints it and releases its shard leases so
another worker takes over at once rather than after the lease expiry.
"""

from __future__ import annotations

import logging

import faust

from agents.app import create_app
from recstream.settings import Settings

__all__ = ["run"]


def run(settings: Settings) -> int:
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=logging.INFO)
    worker.execute_from_commandline()
    return 0
