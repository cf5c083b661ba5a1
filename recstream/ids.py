"""Random 128-bit ids (request and recommendation ids) without a system call each.

``uuid.uuid4().hex`` reads 16 bytes with ``getrandom`` for every id: two system calls a
recommendation (its request id and its recommendation id), which on a virtual machine
cost more than the id's Python work. The same bytes from the same source (``os.urandom``,
the kernel's CSPRNG, so an id is as unguessable as a uuid4's) are read 4 KiB at a time
and handed out 16 at a time.

A forked child must not hand out the ids its parent has already read (two workers would
repeat each other's ids), so the buffer is emptied in the child at fork.
"""

from __future__ import annotations

import os
import threading

__all__ = ["new_id"]

_CHUNK = 4096
_lock = threading.Lock()
_buffer = b""
_at = 0


def _drop_buffer() -> None:
    global _buffer, _at
    _buffer, _at = b"", 0


os.register_at_fork(after_in_child=_drop_buffer)


def new_id() -> str:
    """32 lowercase hex digits of fresh randomness, as ``uuid.uuid4().hex`` (its version
    and variant bits left random: nothing parses these ids as uuids)."""
    global _buffer, _at
    with _lock:  # (an id may be asked for from a thread: `asyncio.to_thread`, a test's)
        if _at + 16 > len(_buffer):
            _buffer, _at = os.urandom(_CHUNK), 0
        start = _at
        _at = start + 16
        return _buffer[start : start + 16].hex()
