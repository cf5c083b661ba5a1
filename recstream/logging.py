"""Structured logs: the standard library's logging with a one-line JSON formatter.

Every record carries the time, level, logger, message and the id of the request being
served (``REQUEST_ID``, set by `serving.middleware.RequestContext`; ``-`` outside a
request), plus any ``extra={...}`` fields. ``RECSTREAM_LOG_FORMAT=text`` keeps the plain
format for a terminal.

Routine lines (below WARNING) are written in batches, at most 0.2 s late
(`BatchedStreamHandler`): one system call per request was a measurable share of the API's
CPU. Warnings and errors are written at once.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any, Final

import orjson

from recstream.settings import Settings

__all__ = ["REQUEST_ID", "BatchedStreamHandler", "JsonFormatter", "configure_logging"]

REQUEST_ID: ContextVar[str] = ContextVar("recstream_request_id", default="-")

# The attributes every LogRecord has; anything else came from ``extra``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # strftime per line was a tenth of an access line's cost: the second's text is
        # made once per second (the API writes ~1,000 lines in one)
        self._second = -1
        self._stamp = ""

    def _ts(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self._ts(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": REQUEST_ID.get(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes routine lines in batches, not one system call each.

    The API logs one access line per request; written and flushed one by one, that was
    a ``write`` per request, about 5 % of the server's CPU at 1,000 requests a second
    (docs/serving-speed.md, session 6). Here lines below WARNING wait in memory and are
    written together every ``interval`` seconds (a daemon thread), or as soon as
    ``limit`` characters wait; a WARNING or worse is written at once, after everything
    logged before it, so order is kept. ``close`` (also run by `logging.shutdown` at
    exit) writes what waits. The trade-off: a process killed with SIGKILL loses at most
    the last ``interval`` of routine lines."""

    def __init__(self, stream: Any, interval: float = 0.2, limit: int = 64 * 1024) -> None:
        super().__init__(stream)
        self.interval = interval
        self.limit = limit
        self._lines: list[str] = []
        self._size = 0
        self._stopped = threading.Event()
        self._writer = threading.Thread(target=self._every, name="recstream-logs", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        # (`Handler.handle` holds the handler's lock around this)
        try:
            line = self.format(record) + self.terminator
        except Exception:  # logging's contract: report, never raise
            self.handleError(record)
            return
        self._lines.append(line)
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= self.limit:
            self.flush()

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            if self._lines:
                text = "".join(self._lines)
                self._lines.clear()
                self._size = 0
                try:
                    self.stream.write(text)
                except (OSError, ValueError):
                    return  # the stream is gone (closed pipe, interpreter exit)
            super().flush()

    def _every(self) -> None:
        while not self._stopped.wait(self.interval):
            with contextlib.suppress(Exception):
                self.flush()

    def close(self) -> None:
        self._stopped.set()
        self.flush()
        super().close()


_HANDLER_NAME: Final = "recstream"


def configure_logging(settings: Settings) -> None:
    """Install one stderr handler on the root logger (idempotent; replaces only ours)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
            handler.close()
    handler = BatchedStreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # Neither format writes the caller's file and line, the thread or the process, so
    # the records need not look them up (the logging HOWTO's "Optimization" switches):
    # walking the stack for the caller was the largest part of an access line's cost.
    logging._srcfile = None  # (documented there)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
