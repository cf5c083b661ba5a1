"""The S3 archive format: written with aiobotocore, read back with boto3, on moto's S3."""

from __future__ import annotations

import gzip

import pytest

from recstream.aws import sync_client
from recstream.errors import ResourceNotFound
from recstream.settings import Settings
from streams.schema import Event
from training.archive import (
    decode_events,
    encode_events,
    load_archive,
    object_key,
    partition_prefix,
    read_events,
    write_events,
)

HOUR = 3600.0
T0 = 1_763_856_000.0  # 2025-11-23 00:00:00 UTC


def event(user: str, item: str, t: float, kind: str = "view", ns: str = "default") -> Event:
    return Event(event_type=kind, user_id=user, item_id=item, timestamp=t, namespace=ns)


def test_keys_follow_the_contract() -> None:
    assert partition_prefix("shop", T0 + 5 * HOUR + 59) == "archive/shop/dt=2025-11-23/hour=05/"
    key = object_key("shop", T0 + 23 * HOUR + 1, name="part-1")
    assert key == "archive/shop/dt=2025-11-23/hour=23/part-1.jsonl.gz"
    fresh = object_key("shop", T0)
    assert fresh.startswith("archive/shop/dt=2025-11-23/hour=00/")
    assert fresh.endswith(".jsonl.gz")


def test_encoding_is_gzip_jsonl_of_events() -> None:
    events = [event("u", "a", T0), event("u", "b", T0 + 1, "purchase")]
    blob = encode_events(events)
    lines = gzip.decompress(blob).splitlines()
    assert [Event.from_json(line) for line in lines] == events
    broken = gzip.compress(events[0].to_json() + b"\n{not json}\n\n" + events[1].to_json())
    assert list(decode_events(broken)) == events  # the bad line is skipped, and logged


async def test_write_then_read_a_time_range(settings: Settings) -> None:
    ns = settings.namespace
    events = [
        event("u1", "a", T0 + 10, ns=ns),
        event("u1", "b", T0 + 20, "add_to_cart", ns=ns),
        event("u2", "a", T0 + HOUR + 5, "purchase", ns=ns),
        event("u2", "c", T0 + 2 * HOUR + 5, ns=ns),
        event("u3", "z", T0 + 10, ns="other"),
    ]
    keys = await write_events(settings, events)
    assert len(keys) == 4  # one object per (namespace, hour)
    assert sum(k.startswith(f"archive/{ns}/dt=2025-11-23/hour=00/") for k in keys) == 1
    s3 = sync_client(settings, "s3")
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    assert gzip.decompress(body).count(b"\n") >= 1

    # [T0 + 15, T0 + 2h): the second and third events; other namespaces are not read
    got = list(read_events(settings, T0 + 15, T0 + 2 * HOUR))
    assert [(e.user_id, e.item_id) for e in got] == [("u1", "b"), ("u2", "a")]

    log = load_archive(settings, T0, T0 + 3 * HOUR)
    assert len(log) == 4
    assert list(log.item_ids) == ["a", "b", "c"]
    # weights come from Settings.event_weights: view 1, add_to_cart 3, purchase 5
    assert log.weights.tolist() == [1.0, 3.0, 5.0, 1.0]
    assert load_archive(settings, T0, T0 + HOUR, namespace="other").item_ids.tolist() == ["z"]


async def test_reading_a_missing_bucket_says_what_to_do(settings: Settings) -> None:
    missing = settings.model_copy(update={"bucket": settings.bucket + "-gone"})
    with pytest.raises(ResourceNotFound, match="recstream up"):
        list(read_events(missing, T0, T0 + HOUR))


def test_a_corrupt_archive_object_is_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    from training.archive import decode_events

    assert list(decode_events(b"not gzip at all", where="s3://b/k")) == []
    assert "s3://b/k" in caplog.text
