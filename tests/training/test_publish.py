"""Publishing against real Redis and the emulator's S3: versions, switch, rollback, GC, crashes."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis
from botocore.exceptions import ClientError

from recstream import published
from recstream.aws import async_client, sync_client
from recstream.errors import ConfigurationError, ResourceNotFound
from recstream.keys import Keys
from recstream.settings import Settings
from tests.training.tinymodel import Crash, OtherTiny, TinyModel
from training import publish
from training.base import RedisRecord
from training.publish import (
    DataRange,
    ModelRegistry,
    PublishError,
    RunInfo,
    current_version,
    new_version,
    read_current,
    read_current_many,
)

LOG = [("u1", "a", 100.0), ("u1", "b", 150.0), ("u2", "a", 200.0), ("u3", "c", 300.0)]


def run_info(**metrics: float) -> RunInfo:
    return RunInfo(
        data=DataRange(source="test", start=100.0, end=300.0, rows=len(LOG), users=3, items=3),
        metrics=metrics or {"hr@10": 0.5},
        search={"trials": [{"alpha": 1.0, "hr@10": 0.4}], "best": {"alpha": 1.0}},
    )


def s3_keys(settings: Settings, prefix: str = "models/") -> list[str]:
    s3 = sync_client(settings, "s3")
    reply = s3.list_objects_v2(Bucket=settings.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in reply.get("Contents", []))


async def redis_keys(redis: aioredis.Redis, pattern: str) -> list[str]:
    return sorted([k.decode() async for k in redis.scan_iter(match=pattern, count=1000)])


async def test_publish_writes_artifacts_manifest_records_and_switches(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.namespace)
    assert await current_version(redis_client, keys, "tiny") is None
    info = await registry.publish(TinyModel().fit(LOG), run_info(**{"hr@10": 0.75}))

    assert info.current
    assert await current_version(redis_client, keys, "tiny") == info.version
    prefix = f"models/tiny/{info.version}/"
    assert s3_keys(settings) == [
        prefix + "counts.json",
        prefix + "manifest.json",
        prefix + "nested/params.json",
        prefix + "redis-keys.jsonl.gz",
        prefix + "redis-records.jsonl.gz",  # the record dump serving restores from
    ]
    listed = sync_client(settings, "s3").get_object(
        Bucket=settings.bucket, Key=prefix + "redis-keys.jsonl.gz"
    )
    suffixes = gzip.decompress(listed["Body"].read()).decode().splitlines()
    assert [json.loads(x) for x in suffixes] == ["top", "meta", "blob"]
    body = sync_client(settings, "s3").get_object(
        Bucket=settings.bucket, Key=prefix + "manifest.json"
    )
    manifest = json.loads(body["Body"].read())
    assert manifest["name"] == "tiny"
    assert manifest["version"] == info.version
    assert manifest["data"] == {
        "source": "test",
        "start": 100.0,
        "end": 300.0,
        "rows": 4,
        "users": 3,
        "items": 3,
    }
    assert manifest["params"] == {"fail_after": None, "extra": 0}
    assert manifest["metrics"] == {"hr@10": 0.75}
    assert manifest["search"]["best"] == {"alpha": 1.0}
    assert manifest["code_version"]
    assert manifest["redis"]["records"] == 3
    assert {f["path"] for f in manifest["files"]} == {"counts.json", "nested/params.json"}
    assert manifest == await registry.manifest("tiny", info.version)
    with pytest.raises(ResourceNotFound, match="no manifest"):
        await registry.manifest("tiny", new_version())

    top = await redis_client.zrange(keys.model("tiny", info.version, "top"), 0, -1, withscores=True)
    assert top == [(b"c", 1.0), (b"b", 1.0), (b"a", 2.0)] or sorted(top) == [
        (b"a", 2.0),
        (b"b", 1.0),
        (b"c", 1.0),
    ]
    assert await redis_client.get(keys.model("tiny", info.version, "blob")) == b"\x00\x01binary"
    # nothing left in progress
    assert await redis_client.zcard(registry.pending_key("tiny")) == 0


async def test_read_current_reads_the_serving_version_in_one_call(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.namespace)
    assert await read_current(redis_client, keys, "tiny", "top") is None
    info = await registry.publish(TinyModel().fit(LOG), run_info())

    # scripts run by SHA1; a server that lost its script cache (restart) gets the text
    await redis_client.script_flush()
    top = await read_current(redis_client, keys, "tiny", "top", limit=1)
    assert top is not None
    assert (await redis_client.script_exists(published._READ.sha)) == [True]
    assert (top.version, top.kind, top.value) == (info.version, "zset", [("a", 2.0)])
    full = await read_current(redis_client, keys, "tiny", "top")
    assert full is not None
    assert isinstance(full.value, list)
    assert len(full.value) == 3
    meta = await read_current(redis_client, keys, "tiny", "meta", fields=["items", "nope"])
    assert meta is not None
    assert meta.value == {"items": b"3"}
    whole = await read_current(redis_client, keys, "tiny", "meta")
    assert whole is not None
    assert whole.value == {"items": b"3", "x": b"1"}
    blob = await read_current(redis_client, keys, "tiny", "blob")
    assert blob is not None
    assert (blob.kind, blob.value) == ("string", b"\x00\x01binary")
    missing = await read_current(redis_client, keys, "tiny", "no-such-record")
    assert missing is not None
    assert (missing.kind, missing.value) == ("none", None)
    with pytest.raises(ValueError, match="at least 1"):
        await read_current(redis_client, keys, "tiny", "top", limit=0)

    many = await read_current_many(redis_client, keys, "tiny", ["top", "blob", "nope"], limit=2)
    assert many is not None
    assert many["top"] == publish.CurrentRecord(info.version, "zset", [("a", 2.0), ("c", 1.0)])
    assert many["blob"].value == b"\x00\x01binary"
    assert many["nope"].kind == "none"
    assert await read_current_many(redis_client, keys, "other", ["top"]) is None


async def test_publish_promote_rollback(registry: ModelRegistry) -> None:
    v1 = await registry.publish(TinyModel().fit(LOG), run_info(**{"hr@10": 0.1}))
    v2 = await registry.publish(TinyModel().fit(LOG[:2]), run_info(**{"hr@10": 0.2}))
    v3 = await registry.publish(TinyModel().fit(LOG[:1]), run_info(**{"hr@10": 0.3}))
    assert v1.version < v2.version < v3.version
    assert await registry.current("tiny") == v3.version

    assert await registry.rollback("tiny") == v2.version
    assert await registry.current("tiny") == v2.version
    assert await registry.rollback("tiny") == v1.version
    with pytest.raises(ResourceNotFound, match="no complete version older"):
        await registry.rollback("tiny")
    assert await registry.current("tiny") == v1.version

    await registry.promote("tiny", v3.version)
    assert await registry.current("tiny") == v3.version
    listed = await registry.versions("tiny")
    assert [(i.version, i.current) for i in listed] == [
        (v1.version, False),
        (v2.version, False),
        (v3.version, True),
    ]
    assert [i.metrics for i in listed] == [{"hr@10": 0.1}, {"hr@10": 0.2}, {"hr@10": 0.3}]
    assert listed[1].data["rows"] == 4
    assert listed[0].records == 3


async def test_publish_without_promote_leaves_serving_version(registry: ModelRegistry) -> None:
    v1 = await registry.publish(TinyModel().fit(LOG), run_info())
    v2 = await registry.publish(TinyModel().fit(LOG), run_info(), promote=False)
    assert await registry.current("tiny") == v1.version
    assert not v2.current
    await registry.promote("tiny", v2.version)
    assert await registry.current("tiny") == v2.version


async def test_promote_refuses_unknown_and_incomplete_versions(
    registry: ModelRegistry, redis_client: aioredis.Redis
) -> None:
    v1 = await registry.publish(TinyModel().fit(LOG), run_info())
    unfinished = new_version()
    await redis_client.zadd(registry.pending_key("tiny"), {unfinished: time.time() + 600})
    with pytest.raises(ResourceNotFound, match="no complete version"):
        await registry.promote("tiny", unfinished)
    with pytest.raises(ResourceNotFound):
        await registry.promote("tiny", new_version())
    with pytest.raises(ConfigurationError, match="not a version id"):
        await registry.promote("tiny", "latest")
    with pytest.raises(ConfigurationError, match="model name"):
        await registry.promote("bad:name", v1.version)
    assert await registry.current("tiny") == v1.version


async def test_gc_keeps_last_k_and_never_the_current_one(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.namespace)
    published = [
        await registry.publish(TinyModel().fit(LOG), run_info(), gc=False) for _ in range(5)
    ]
    versions = [p.version for p in published]
    # serve the oldest, then keep only 2: the newest two plus the current one survive
    await registry.promote("tiny", versions[0])
    report = await registry.gc("tiny", keep=2)

    assert sorted(report.retired) == [versions[1], versions[2]]
    assert report.redis_keys == 2 * 3
    assert report.s3_objects == 2 * 5
    kept = [versions[0], versions[3], versions[4]]
    assert [i.version for i in await registry.versions("tiny")] == kept
    assert await registry.current("tiny") == versions[0]
    for version in versions:
        present = await redis_keys(redis_client, keys.model("tiny", version, "*"))
        files = s3_keys(settings, f"models/tiny/{version}/")
        if version in kept:
            assert len(present) == 3
            assert len(files) == 5
        else:
            assert present == []
            assert files == []
    # the current version is kept even when it is the only one outside the window
    again = await registry.gc("tiny", keep=1)
    assert again.retired == [versions[3]]
    assert [i.version for i in await registry.versions("tiny")] == [versions[0], versions[4]]


async def test_publish_collects_with_model_keep_versions(
    local_stack: Any, redis_client: aioredis.Redis
) -> None:
    from tests.conftest import make_settings

    settings = make_settings(local_stack, model_keep_versions=2)
    async with async_client(settings, "s3") as s3:
        registry = ModelRegistry(redis_client, settings, s3)
        published = [await registry.publish(TinyModel().fit(LOG), run_info()) for _ in range(4)]
    assert [i.version for i in await registry.versions("tiny")] == [
        p.version for p in published[-2:]
    ]
    assert len(s3_keys(settings)) == 2 * 5


async def test_crash_in_records_leaves_old_version_serving_and_cleans_up(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.namespace)
    v1 = await registry.publish(TinyModel().fit(LOG), run_info())
    before = await redis_keys(redis_client, f"{keys.prefix}*")
    # 500 extra zsets of 50 members: the crash comes after the first pipeline chunk landed
    broken = TinyModel(fail_after=450, extra=500).fit(LOG)
    assert 3 * 50 < publish.CHUNK_MEMBERS < 450 * 50

    with pytest.raises(PublishError, match="serving version is unchanged") as caught:
        await registry.publish(broken, run_info())
    assert isinstance(caught.value.__cause__, Crash)

    assert await registry.current("tiny") == v1.version
    assert [i.version for i in await registry.versions("tiny")] == [v1.version]
    assert await redis_keys(redis_client, f"{keys.prefix}*") == before
    assert s3_keys(settings) == sorted(
        f"models/tiny/{v1.version}/{f}"
        for f in (
            "counts.json",
            "manifest.json",
            "nested/params.json",
            "redis-keys.jsonl.gz",
            "redis-records.jsonl.gz",
        )
    )
    top = await read_current(redis_client, keys, "tiny", "top")
    assert top is not None
    assert top.version == v1.version


class FailingS3:
    """The real S3 client, except that put_object fails from the ``fail_at``-th call on."""

    def __init__(self, real: Any, fail_at: int) -> None:
        self.real = real
        self.fail_at = fail_at
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def put_object(self, **kwargs: Any) -> Any:
        self.puts += 1
        if self.puts >= self.fail_at:
            raise ClientError(
                {"Error": {"Code": "InternalError", "Message": "injected"}}, "PutObject"
            )
        return await self.real.put_object(**kwargs)


@pytest.mark.parametrize("fail_at", [2, 3, 4], ids=["second-file", "key-list", "manifest"])
async def test_s3_failure_midway_leaves_old_version_serving(
    settings: Settings, redis_client: aioredis.Redis, fail_at: int
) -> None:
    keys = Keys(settings.namespace)
    async with async_client(settings, "s3") as s3:
        good = ModelRegistry(redis_client, settings, s3)
        v1 = await good.publish(TinyModel().fit(LOG), run_info())
        before = await redis_keys(redis_client, f"{keys.prefix}*")
        flaky = ModelRegistry(redis_client, settings, FailingS3(s3, fail_at))  # type: ignore[arg-type]
        with pytest.raises(PublishError, match="InternalError"):
            await flaky.publish(TinyModel().fit(LOG), run_info())
    assert await good.current("tiny") == v1.version
    assert [i.version for i in await good.versions("tiny")] == [v1.version]
    assert await redis_keys(redis_client, f"{keys.prefix}*") == before
    assert all(k.startswith(f"models/tiny/{v1.version}/") for k in s3_keys(settings))


async def test_a_publish_whose_lease_was_reaped_does_not_complete(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """A publish stalled past its lease, collected by another process's GC, must not
    complete afterwards: its data may already be half deleted."""
    keys = Keys(settings.namespace)
    v1 = await registry.publish(TinyModel().fit(LOG), run_info())
    sync_redis = redis.Redis.from_url(settings.redis_url)

    def reap(index: int) -> None:
        if index == 2:
            # what another process's GC does to a lapsed lease (the _REAP script)
            (version,) = cast(list[bytes], sync_redis.zrange(registry.pending_key("tiny"), 0, -1))
            sync_redis.zadd(registry.pending_key("tiny"), {version: 0})
            pending, doomed = registry.pending_key("tiny"), registry.doomed_key("tiny")
            assert sync_redis.eval(publish._REAP.text, 2, pending, doomed, version, 1)

    try:
        with pytest.raises(PublishError, match="lease"):
            await registry.publish(TinyModel(hook=reap).fit(LOG), run_info())
    finally:
        sync_redis.close()
    assert await registry.current("tiny") == v1.version
    assert [i.version for i in await registry.versions("tiny")] == [v1.version]
    assert await redis_client.zcard(registry.pending_key("tiny")) == 0
    assert len(await redis_keys(redis_client, f"{keys.prefix}model:tiny:*:*")) == 3


async def test_gc_removes_a_publish_whose_process_died(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """kill -9 mid-publish: the lease lapses; the next GC removes its keys and files."""
    keys = Keys(settings.namespace)
    v1 = await registry.publish(TinyModel().fit(LOG), run_info())
    dead, alive = new_version(), new_version()
    await redis_client.zadd(
        registry.pending_key("tiny"), {dead: time.time() - 1, alive: time.time() + 600}
    )
    s3 = sync_client(settings, "s3")
    for version in (dead, alive):
        await redis_client.zadd(keys.model("tiny", version, "top"), {"a": 1.0})
        await redis_client.set(keys.model("tiny", version, "blob"), b"x")
        s3.put_object(Bucket=settings.bucket, Key=f"models/tiny/{version}/counts.json", Body=b"{}")
    # files no lease knows about, an hour old (their publish could not delete them: S3
    # was down); a younger prefix might belong to a publish about to claim its lease
    orphan = new_version(time.time() - 3600)
    s3.put_object(Bucket=settings.bucket, Key=f"models/tiny/{orphan}/counts.json", Body=b"{}")

    report = await registry.gc("tiny")

    assert report.abandoned == [dead]
    assert report.retired == []
    assert report.redis_keys == 2
    assert report.s3_objects == 2
    assert await redis_keys(redis_client, keys.model("tiny", dead, "*")) == []
    assert len(await redis_keys(redis_client, keys.model("tiny", alive, "*"))) == 2
    assert s3_keys(settings, f"models/tiny/{alive}/") == [f"models/tiny/{alive}/counts.json"]
    assert s3_keys(settings, f"models/tiny/{dead}/") == []
    assert s3_keys(settings, f"models/tiny/{orphan}/") == []
    assert await registry.current("tiny") == v1.version
    assert len(await redis_keys(redis_client, keys.model("tiny", v1.version, "*"))) == 3
    assert await redis_client.scard(registry.doomed_key("tiny")) == 0


async def test_gc_deletes_by_key_list_finishes_interrupted_deletes_and_sweeps(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.namespace)
    v1, v2, v3 = [
        (await registry.publish(TinyModel().fit(LOG), run_info(), gc=False)).version
        for _ in range(3)
    ]
    # a key of v1 that its key list does not name: retiring deletes what the list names
    # (no keyspace scan), and only a sweep finds the stray
    stray = keys.model("tiny", v1, "stray")
    await redis_client.set(stray, b"x")
    # a GC that died after retiring v2 but before deleting it left it in `doomed`
    await redis_client.hdel(registry.versions_key("tiny"), v2)
    await redis_client.sadd(registry.doomed_key("tiny"), v2)

    report = await registry.gc("tiny", keep=1)

    assert report.retired == [v1]
    assert report.redis_keys == 2 * 3
    assert report.s3_objects == 2 * 5
    assert [i.version for i in await registry.versions("tiny")] == [v3]
    assert await redis_keys(redis_client, keys.model("tiny", v2, "*")) == []
    assert await redis_keys(redis_client, keys.model("tiny", v1, "*")) == [stray]
    assert await redis_client.scard(registry.doomed_key("tiny")) == 0

    swept = await registry.gc("tiny", keep=1, sweep=True)
    assert swept.redis_keys == 1
    assert await redis_keys(redis_client, keys.model("tiny", v1, "*")) == []
    assert len(await redis_keys(redis_client, keys.model("tiny", v3, "*"))) == 3


async def test_names_lists_each_published_model(registry: ModelRegistry) -> None:
    assert await registry.names() == []
    await registry.publish(TinyModel().fit(LOG), run_info())
    await registry.publish(OtherTiny().fit(LOG), run_info())
    assert await registry.names() == ["other", "tiny"]


def test_version_ids_sort_by_time() -> None:
    early, late = new_version(1_700_000_000.001), new_version(1_700_000_000.002)
    assert early < late
    assert publish.VERSION.match(early)
    assert publish.version_time(early) == pytest.approx(1_700_000_000.001, abs=1e-3)


async def test_cancelled_mid_publish_cleans_up(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Ctrl-C cancels the task: the publish still removes what it wrote, then re-raises."""
    keys = Keys(settings.namespace)
    v1 = await registry.publish(TinyModel().fit(LOG), run_info())
    before = await redis_keys(redis_client, f"{keys.prefix}*")

    def cancel(index: int) -> None:
        if index == 2:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await registry.publish(TinyModel(hook=cancel).fit(LOG), run_info())
    assert await registry.current("tiny") == v1.version
    assert await redis_keys(redis_client, f"{keys.prefix}*") == before
    assert all(k.startswith(f"models/tiny/{v1.version}/") for k in s3_keys(settings))


async def test_restore_rebuilds_redis_from_s3_after_data_loss(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.namespace)
    with pytest.raises(ResourceNotFound, match="no published version"):
        await registry.restore("tiny", model_class=TinyModel)
    v1 = await registry.publish(TinyModel().fit(LOG), run_info(**{"hr@10": 0.1}))
    v2 = await registry.publish(TinyModel().fit(LOG[:2]), run_info(**{"hr@10": 0.2}))
    with pytest.raises(ConfigurationError, match="complete in Redis already"):
        await registry.restore("tiny", v2.version, model_class=TinyModel)

    # Redis loses everything of this namespace
    await redis_client.unlink(*await redis_keys(redis_client, f"{keys.prefix}*"))
    assert await read_current(redis_client, keys, "tiny", "top") is None

    # the manifest names a class outside the training package: refused unless passed
    with pytest.raises(ConfigurationError, match="not in the training package"):
        await registry.restore("tiny")
    restored = await registry.restore("tiny", model_class=TinyModel)
    assert restored.version == v2.version  # the newest in S3
    assert restored.current
    assert restored.metrics == {"hr@10": 0.2}
    top = await read_current(redis_client, keys, "tiny", "top")
    assert top is not None
    assert top.version == v2.version
    assert sorted(cast(list[tuple[str, float]], top.value)) == [("a", 1.0), ("b", 1.0)]

    older = await registry.restore("tiny", v1.version, promote=False, model_class=TinyModel)
    assert not older.current
    assert [i.version for i in await registry.versions("tiny")] == [v1.version, v2.version]
    assert await registry.rollback("tiny") == v1.version
    assert await redis_client.zcard(registry.pending_key("tiny")) == 0


async def test_restore_refuses_a_tampered_file_and_leaves_nothing(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.namespace)
    v1 = await registry.publish(TinyModel().fit(LOG), run_info())
    await redis_client.unlink(*await redis_keys(redis_client, f"{keys.prefix}*"))
    sync_client(settings, "s3").put_object(
        Bucket=settings.bucket, Key=f"models/tiny/{v1.version}/counts.json", Body=b'{"z": 9}'
    )
    with pytest.raises(ConfigurationError, match="SHA-256"):
        await registry.restore("tiny", model_class=TinyModel)
    assert await redis_keys(redis_client, f"{keys.prefix}*") == []


async def test_gc_after_redis_lost_its_data_keeps_s3_restorable(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    v1 = (await registry.publish(TinyModel().fit(LOG), run_info(), gc=False)).version
    v2 = (await registry.publish(TinyModel().fit(LOG), run_info(), gc=False)).version
    prefix = Keys(settings.namespace).prefix
    await redis_client.unlink(*await redis_keys(redis_client, prefix + "*"))  # Redis wiped
    await registry.publish(TinyModel().fit(LOG), run_info())  # the next run's GC
    for version in (v1, v2):
        assert s3_keys(settings, f"models/tiny/{version}/"), f"{version}'s S3 copy was deleted"
    restored = await registry.restore("tiny", v1, model_class=TinyModel)
    assert restored.version == v1


async def test_reusing_a_live_version_id_is_refused_and_harms_nothing(
    registry: ModelRegistry, settings: Settings
) -> None:
    v1 = (await registry.publish(TinyModel().fit(LOG), run_info())).version
    with pytest.raises(ConfigurationError, match="exists already"):
        await registry.publish(TinyModel().fit(LOG), run_info(), version=v1)
    assert await registry.current("tiny") == v1
    assert s3_keys(settings, f"models/tiny/{v1}/")


async def test_restore_refuses_a_manifest_path_outside_the_model_folder(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    import hashlib

    import orjson

    v1 = (await registry.publish(TinyModel().fit(LOG), run_info(), gc=False)).version
    await redis_client.hdel(registry.versions_key("tiny"), v1)  # as if Redis lost it
    s3 = sync_client(settings, "s3")
    prefix = f"models/tiny/{v1}/"
    manifest = orjson.loads(
        s3.get_object(Bucket=settings.bucket, Key=prefix + "manifest.json")["Body"].read()
    )
    evil = b"written outside"
    s3.put_object(Bucket=settings.bucket, Key=prefix + "../../evil", Body=evil)
    manifest["files"].append(
        {"path": "../../evil", "sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)}
    )
    s3.put_object(Bucket=settings.bucket, Key=prefix + "manifest.json", Body=orjson.dumps(manifest))
    with pytest.raises(ConfigurationError, match="outside the model folder"):
        await registry.restore("tiny", v1, model_class=TinyModel)


async def test_rollback_does_not_undo_a_promote_that_lands_meanwhile(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = (await registry.publish(TinyModel().fit(LOG), run_info(), gc=False)).version
    await registry.publish(TinyModel().fit(LOG), run_info(), gc=False)
    await registry.publish(TinyModel().fit(LOG), run_info(), gc=False)  # serving: v3
    original = registry.versions

    async def versions_then_promote(name: str) -> Any:
        seen = await original(name)
        await registry.promote(name, v1)  # someone promotes v1 after rollback read v3
        return seen

    monkeypatch.setattr(registry, "versions", versions_then_promote)
    with pytest.raises(ConfigurationError, match="changed while rolling back"):
        await registry.rollback("tiny")
    assert await registry.current("tiny") == v1


class SlowSave(TinyModel):
    """A model whose own ``save`` outlasts the publish lease (an ALS or session-kNN model
    writing a large file takes minutes; here the lease is shortened instead)."""

    def save(self, directory: Any) -> None:
        time.sleep(2.5)
        super().save(directory)


async def test_a_publish_is_kept_alive_while_the_model_saves_itself(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GC runs while a model's ``save`` (in a thread, not renewing anything itself) takes
    longer than the lease: the publish must not be collected as abandoned."""
    monkeypatch.setattr(publish, "LEASE_S", 1.0)
    model = SlowSave().fit(LOG)
    publishing = asyncio.create_task(registry.publish(model, run_info()))
    collected: list[str] = []
    while not publishing.done():
        await asyncio.sleep(0.3)
        collected += (await registry.gc("tiny")).abandoned
    info = await publishing
    assert collected == []
    assert await registry.current("tiny") == info.version


class Recorder:
    """A stand-in pipeline that records the commands `_queue` adds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def set(self, key: str, value: bytes) -> None:
        self.calls.append(("set", len(value)))

    def append(self, key: str, value: bytes) -> None:
        self.calls.append(("append", len(value)))

    def zadd(self, key: str, mapping: dict[str, float]) -> None:
        self.calls.append(("zadd", len(mapping)))

    def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        self.calls.append(("hset", len(mapping)))


def test_large_records_are_written_in_bounded_commands() -> None:
    pipe = Recorder()
    scores = {f"i{n}": float(n) for n in range(2_500)}
    publish._queue(pipe, "k", RedisRecord("top", "zset", scores))
    assert pipe.calls == [("zadd", 1_000), ("zadd", 1_000), ("zadd", 500)]
    pipe.calls.clear()
    publish._queue(pipe, "k", RedisRecord("factors", "hash", {f"i{n}": b"x" for n in range(1_001)}))
    assert pipe.calls == [("hset", 1_000), ("hset", 1)]
    pipe.calls.clear()
    blob = b"x" * (publish.BYTES_PER_COMMAND * 2 + 10)
    publish._queue(pipe, "k", RedisRecord("index", "string", blob))
    assert pipe.calls == [
        ("set", publish.BYTES_PER_COMMAND),
        ("append", publish.BYTES_PER_COMMAND),
        ("append", 10),
    ]


async def test_a_large_record_reads_back_whole(
    registry: ModelRegistry, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Written in pieces, read back as one: the string (SET then APPENDs) and the zset."""
    model = TinyModel(extra=1).fit(LOG)
    blob = bytes(range(256)) * (publish.BYTES_PER_COMMAND // 128 + 3)
    big = {f"i{n}": float(n) for n in range(2_345)}
    original = model.redis_records

    def records() -> Any:
        yield from original()
        yield RedisRecord("big", "zset", big)
        yield RedisRecord("bigblob", "string", blob)

    model.redis_records = records  # type: ignore[method-assign]
    info = await registry.publish(model, run_info())
    keys = Keys(settings.namespace)
    assert await redis_client.get(keys.model("tiny", info.version, "bigblob")) == blob
    key = keys.model("tiny", info.version, "big")
    stored = cast(
        "list[tuple[bytes, float]]", await redis_client.zrange(key, 0, -1, withscores=True)
    )
    assert {k.decode(): v for k, v in stored} == big
