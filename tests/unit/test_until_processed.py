"""`recstream.aws.until_processed`: a DynamoDB batch call's unprocessed part resent.

The batch call is a stand-in here (what DynamoDB answers under throttling is hard to
provoke on an emulator); the catalog and the agents call it with the real clients in
their own tests."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from recstream.aws import until_processed
from recstream.errors import StoreUnavailable, ThroughputExceeded
from recstream.settings import Settings


class Throttled:
    """Answers each call with the next response; records what it was sent."""

    def __init__(self, *responses: dict[str, Any]) -> None:
        self.responses = list(responses)
        self.sent: list[dict[str, Any]] = []

    async def __call__(self, *, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(RequestItems)
        return self.responses.pop(0)


async def _run(call: Any, attempts: int = 10) -> list[Any]:
    return [
        response
        async for response in until_processed(
            call, {"t": ["a", "b"]}, "UnprocessedItems", "writing t", "raise t's capacity",
            Settings(), attempts,
        )
    ]  # fmt: skip


async def test_what_is_left_unprocessed_is_sent_again_until_none_is() -> None:
    call = Throttled(
        {"UnprocessedItems": {"t": ["b"]}},
        {"UnprocessedItems": {}},
    )
    responses = await _run(call)
    assert call.sent == [{"t": ["a", "b"]}, {"t": ["b"]}]
    assert len(responses) == 2  # each response is seen, so reads keep every page


async def test_a_batch_never_processed_says_what_to_change() -> None:
    call = Throttled(*[{"UnprocessedItems": {"t": ["b"]}}] * 3)
    with pytest.raises(StoreUnavailable, match="raise t's capacity"):
        await _run(call, attempts=3)
    assert len(call.sent) == 3


async def test_a_failed_call_is_translated() -> None:
    async def refused(**_: Any) -> dict[str, Any]:
        raise ClientError(
            {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}},
            "BatchWriteItem",
        )

    with pytest.raises(ThroughputExceeded, match="writing t"):
        await _run(refused)
