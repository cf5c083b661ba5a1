"""The stores' AWS clients send the User-Agent given once (`recstream.stores.USER_AGENT`)
rather than the one botocore builds twice for every request (session 11 in
docs/agents.md: about 0.9 M instructions a call)."""

from __future__ import annotations

from typing import Any

from recstream.settings import Settings
from recstream.stores import USER_AGENT, open_stores


async def test_every_store_client_sends_the_fixed_user_agent(settings: Settings) -> None:
    sent: list[str] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append(request.headers["User-Agent"].decode())

    async with open_stores(settings) as stores:
        for client in (stores.dynamodb, stores.s3, stores.sqs):
            client.meta.events.register("before-send", capture)
        await stores.dynamodb.describe_table(TableName=settings.windows_table)
        await stores.s3.list_objects_v2(Bucket=settings.bucket, MaxKeys=1)
        await stores.sqs.list_queues()
    assert len(sent) == 3
    assert len(set(sent)) == 1
    # (aiobotocore appends botocore's version; botocore's own string starts with its SDK
    # name and has "ua/2.1" and the request's feature ids, "m/...")
    assert sent[0].startswith(f"{USER_AGENT} ")
    assert " ua/" not in sent[0]
