"""Structured logs: the standard library's logging with a one-line JSON formatter.

Every record carries the time, level, logger, message and the id of the request being
served (``REQUEST_ID``, set by `serving.middleware.RequestContext`; ``-`` outside a
request), plus any ``extra={...}`` fields. ``RECSTREAM_LOG_FORMAT=text`` keeps the plain
format for a terminal.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, Final

import orjson

from recstream.settings import Settings

__all__ = ["REQUEST_ID", "JsonFormatter", "configure_logging"]

REQUEST_ID: ContextVar[str] = ContextVar("recstream_request_id", default="-")

# The attributes every LogRecord has; anything else came from ``extra``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


_HANDLER_NAME: Final = "recstream"


def configure_logging(settings: Settings) -> None:
    """Install one stderr handler on the root logger (idempotent; replaces only ours)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
