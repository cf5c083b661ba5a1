from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.envelope import (
    EnvelopeError,
    Message,
    chunk_by_size,
    decode,
    encode,
    encode_aggregated,
)

messages = st.builds(
    Message,
    key=st.one_of(st.none(), st.binary(min_size=1, max_size=300)),
    value=st.binary(max_size=2000),
    headers=st.lists(
        st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=100)), max_size=4
    ).map(tuple),
)


@given(messages)
def test_single_round_trip(message: Message) -> None:
    assert decode(encode(message)) == [message]


@given(st.lists(messages, min_size=1, max_size=20))
def test_aggregated_round_trip_keeps_order(batch: list[Message]) -> None:
    assert decode(encode_aggregated(batch)) == batch


@given(st.lists(messages, min_size=1, max_size=30))
def test_chunks_respect_the_size_limit(batch: list[Message]) -> None:
    chunks = list(chunk_by_size(batch, 4096))
    assert [m for chunk in chunks for m in chunk] == batch
    for chunk in chunks:
        assert len(chunk) == 1 or len(encode_aggregated(chunk)) <= 4096


@pytest.mark.parametrize("data", [b"", b"\x09abc", b"\x01\x00", b"\x02\x00\x00\x00\x05"])
def test_garbage_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(data)


def test_empty_aggregate_is_an_error_not_silence() -> None:
    with pytest.raises(EnvelopeError, match="no messages"):
        decode(b"\x02\x00\x00\x00\x00")
