"""The binary envelope every Kinesis record carries: key, value and headers, versioned.

Kinesis records have only a partition key and a data blob, while faust messages have a
key, a value and headers. The envelope packs the three into the blob, with a leading
version byte so the format can evolve without breaking readers of older records.

    version 1, one message:
        0x01 | u16 key length | key | u16 header count
             | (u16 name length | name | u32 value length | value) * count
             | value (the rest of the blob)

    version 2, aggregated (KPL-style: several messages of one shard in one record):
        0x02 | u32 message count | (u32 length | a version-1 body without its 0x01) * count

Aggregation amortises the per-record cost of Kinesis (1,000 records/s per shard) and of
faust's per-message bookkeeping; sub-sequence numbers are positions inside a v2 record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "AGGREGATED",
    "SINGLE",
    "EnvelopeError",
    "Message",
    "decode",
    "encode",
    "encode_aggregated",
]

SINGLE: Final = 1
AGGREGATED: Final = 2
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class EnvelopeError(ValueError):
    """A record's data is not a recstream envelope (wrong producer, or corrupt)."""


@dataclass(frozen=True, slots=True)
class Message:
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]] = field(default_factory=tuple)


def _body(message: Message) -> bytes:
    key = message.key or b""
    parts = [_U16.pack(len(key)), key, _U16.pack(len(message.headers))]
    for name, value in message.headers:
        raw_name = name.encode()
        parts += [_U16.pack(len(raw_name)), raw_name, _U32.pack(len(value)), value]
    parts.append(message.value)
    return b"".join(parts)


def encode(message: Message) -> bytes:
    return bytes((SINGLE,)) + _body(message)


def encode_aggregated(messages: Sequence[Message]) -> bytes:
    parts = [bytes((AGGREGATED,)), _U32.pack(len(messages))]
    for message in messages:
        body = _body(message)
        parts += [_U32.pack(len(body)), body]
    return b"".join(parts)


def _parse_body(data: memoryview) -> Message:
    try:
        (key_len,) = _U16.unpack_from(data, 0)
        pos = 2
        key = bytes(data[pos : pos + key_len]) or None
        pos += key_len
        (count,) = _U16.unpack_from(data, pos)
        pos += 2
        headers: list[tuple[str, bytes]] = []
        for _ in range(count):
            (name_len,) = _U16.unpack_from(data, pos)
            pos += 2
            name = bytes(data[pos : pos + name_len]).decode()
            pos += name_len
            (value_len,) = _U32.unpack_from(data, pos)
            pos += 4
            headers.append((name, bytes(data[pos : pos + value_len])))
            pos += value_len
    except (struct.error, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"truncated or corrupt envelope: {exc}") from exc
    if pos > len(data):
        raise EnvelopeError("truncated envelope: lengths run past the end of the record")
    return Message(key=key, value=bytes(data[pos:]), headers=tuple(headers))


def decode(data: bytes) -> list[Message]:
    """Every message in one record's data, in order (one, unless aggregated)."""
    if not data:
        raise EnvelopeError("empty record")
    view = memoryview(data)
    version = view[0]
    if version == SINGLE:
        return [_parse_body(view[1:])]
    if version == AGGREGATED:
        try:
            (count,) = _U32.unpack_from(view, 1)
            if count == 0:
                raise EnvelopeError("aggregated record with no messages")
            pos = 5
            out: list[Message] = []
            for _ in range(count):
                (length,) = _U32.unpack_from(view, pos)
                pos += 4
                if pos + length > len(view):
                    raise EnvelopeError("truncated aggregated record")
                out.append(_parse_body(view[pos : pos + length]))
                pos += length
        except struct.error as exc:
            raise EnvelopeError(f"truncated aggregated record: {exc}") from exc
        return out
    raise EnvelopeError(
        f"unknown envelope version {version}; was this record written by recstream's producer?"
    )


def chunk_by_size(messages: Iterable[Message], max_bytes: int) -> Iterable[list[Message]]:
    """Group messages so each group's aggregated record stays under max_bytes."""
    group: list[Message] = []
    size = 5
    for message in messages:
        body = 4 + len(_body(message))
        if group and size + body > max_bytes:
            yield group
            group, size = [], 5
        group.append(message)
        size += body
    if group:
        yield group
