"""The cyclic garbage collector, set for a long-running process.

A full (generation 2) collection walks every object the collector tracks, and the
process stops while it does. Two things make that a pause a server notices:

- what start-up builds (modules, botocore's service models, faust's tables: ~270k
  objects in the API) lives as long as the process, yet every full collection walked it
  again (130 to 300 ms a pause in the API: docs/serving-speed.md). `tuned_collector`
  collects once and *freezes* it: the collector never looks at it again;
- what the process keeps after start-up (the API's caches of parsed window entries,
  catalog records and neighbour rows: 60,000 to 80,000 objects after a few thousand requests)
  still costs 20 to 40 ms a full collection, and with Python's default thresholds (700, 10,
  10) one ran every 5 to 7 s at 400 requests a second. A third threshold of 100 instead of
  10 considers a full collection ten times less often; the young generations, where
  nearly all of the cyclic garbage dies, are collected as often as before.

Objects freed by their reference count are freed at once, frozen or not; only garbage
that forms a cycle after it was frozen waits (for ever: what start-up builds is meant to
last). `tuned_collector` gives the previous settings back when the last of its blocks
exits, so a process that runs several apps, in turn or at once in threads (the tests),
ends as it began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SERVER_THRESHOLDS", "tuned_collector"]

SERVER_THRESHOLDS = (700, 10, 100)
"""The API's (Python's defaults: 700, 10, 10): full collections ten times rarer."""


_lock = threading.Lock()
_open = 0
_previous = gc.get_threshold()


@contextmanager
def tuned_collector(thresholds: tuple[int, int, int] = SERVER_THRESHOLDS) -> Iterator[None]:
    """Collect, freeze what exists, and run the collector with ``thresholds`` inside the
    block. When the last open block exits, the thresholds from before the first are back
    and the frozen objects are unfrozen."""
    global _open, _previous
    with _lock:
        if _open == 0:
            _previous = gc.get_threshold()
        _open += 1
        gc.collect()
        gc.freeze()
        gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0:
                gc.set_threshold(*_previous)
                gc.unfreeze()
