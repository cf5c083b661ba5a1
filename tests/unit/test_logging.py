"""`recstream.logging.BatchedStreamHandler`: routine lines wait and are written together,
in order; a warning writes at once with everything before it; nothing is lost on close."""

from __future__ import annotations

import io
import logging
import time

import orjson

from recstream.logging import BatchedStreamHandler, JsonFormatter


def logger_to(handler: logging.Handler, name: str) -> logging.Logger:
    log = logging.getLogger(name)
    log.propagate = False
    log.setLevel(logging.INFO)
    log.handlers = [handler]
    return log


def test_routine_lines_wait_and_a_warning_writes_them_in_order() -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=3600)
    log = logger_to(handler, "test.batched.order")
    try:
        log.info("one")
        log.info("two")
        assert stream.getvalue() == ""
        log.warning("three")
        assert stream.getvalue() == "one\ntwo\nthree\n"
        log.info("four")
        assert stream.getvalue() == "one\ntwo\nthree\n"
    finally:
        handler.close()
    assert stream.getvalue() == "one\ntwo\nthree\nfour\n"  # close wrote what waited


def test_lines_are_written_when_enough_wait_or_when_the_interval_passes() -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=3600, limit=10)
    log = logger_to(handler, "test.batched.limit")
    try:
        log.info("abcd")
        assert stream.getvalue() == ""
        log.info("efghij")  # 5 + 7 characters wait: over the limit
        assert stream.getvalue() == "abcd\nefghij\n"
    finally:
        handler.close()

    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=0.05)
    log = logger_to(handler, "test.batched.interval")
    try:
        log.info("later")
        deadline = time.monotonic() + 30
        while stream.getvalue() == "" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue() == "later\n"
    finally:
        handler.close()


def test_json_timestamps_are_exact_across_seconds() -> None:
    # the second's text is made once per second: each line still has its own time
    formatter = JsonFormatter()
    for created in (1_700_000_000.123, 1_700_000_000.987, 1_700_000_001.004, 1_699_999_999.5):
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        line = orjson.loads(formatter.format(record))
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        assert line["ts"] == f"{expected}.{int(record.msecs):03d}Z"
