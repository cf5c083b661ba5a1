"""Serving brings the model registry back by itself after Redis lost it.

Publishing keeps two durable copies in S3 (docs/publishing.md): every version's records
(``models/{name}/{version}/redis-records.jsonl.gz``, exactly what it wrote to Redis) and
each namespace's serving pointer (``model-pointers/{namespace}/{name}.json``, written
by promote and rollback). When serving reads a model pointer and finds none, a
`RegistryRestorer` checks S3 in the background (once per namespace at a time, at most
every ``recheck_s``) and, for every model whose pointer S3 has and Redis has not, writes
the version's records back under the same version id, marks it complete and points
serving at it, with the registry's own scripts (`recstream.published`): a lease in
``pending`` first, so garbage collection never collects a restore in progress and two
API processes never restore the same version at once.

No model code runs: the records are copied, not recomputed, so serving does not import
training and a restore costs what writing the records costs. A version published
before record dumps existed cannot be restored this way; the log says to run
``recstream models restore NAME`` (which loads the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from recstream.aws import error_code, translate
from recstream.errors import RecstreamError
from recstream.keys import Keys
from recstream.published import (
    CLAIM,
    COMPLETE,
    PROMOTE,
    REDIS_RECORDS,
    SERVING_PREFIX,
    decode_records,
    queue_record,
    run_lua,
    serving_pointer_key,
)
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["LEASE_S", "RegistryRestorer", "restore_serving_version", "write_dump"]

log = logging.getLogger(__name__)

LEASE_S = 600.0
"""The restore's lease in ``pending`` (as a publish's), renewed with every chunk."""
CHUNK_MEMBERS = 20_000


async def write_dump(
    redis: aioredis.Redis, keys: Keys, name: str, version: str, dump: bytes
) -> list[str]:
    """Write a record dump under ``rs:{ns}:model:{name}:{version}:…``, renewing the
    version's lease with every chunk; returns the suffixes written."""
    pending = keys.model(name, "", "")[:-1] + "pending"
    lines = await asyncio.to_thread(gzip.decompress, dump)
    suffixes: list[str] = []
    members = 0
    async with redis.pipeline(transaction=False) as pipe:
        for suffix, kind, value in decode_records(lines):
            members += queue_record(pipe, keys.model(name, version, suffix), suffix, kind, value)
            suffixes.append(suffix)
            if members >= CHUNK_MEMBERS:
                pipe.zadd(pending, {version: time.time() + LEASE_S}, xx=True)
                await pipe.execute()
                members = 0
        pipe.zadd(pending, {version: time.time() + LEASE_S}, xx=True)
        await pipe.execute()
    return suffixes


async def _get(s3: S3Client, settings: Settings, key: str) -> bytes | None:
    try:
        reply = await s3.get_object(Bucket=settings.bucket, Key=key)
        async with reply["Body"] as body:
            return bytes(await body.read())
    except ClientError as exc:
        if error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise translate(exc, f"reading s3://{settings.bucket}/{key}", settings, "s3") from exc
    except BotoCoreError as exc:
        raise translate(exc, f"reading s3://{settings.bucket}/{key}", settings, "s3") from exc


async def restore_serving_version(
    redis: aioredis.Redis,
    s3: S3Client,
    settings: Settings,
    namespace: str,
    name: str,
    version: str,
) -> bool:
    """Make ``version`` of ``name`` serve again in ``namespace`` from its S3 copy; False
    when it cannot be done here (no record dump, or another process is restoring it)."""
    keys = Keys(namespace)
    base = keys.model(name, "", "")[:-1]
    pending, versions, doomed = base + "pending", base + "versions", base + "doomed"
    pointer = keys.model_pointer(name)
    if await redis.hexists(versions, version):
        return bool(await run_lua(redis, PROMOTE, 2, versions, pointer, version))
    prefix = f"models/{name}/{version}/"
    manifest_raw = await _get(s3, settings, prefix + "manifest.json")
    dump = await _get(s3, settings, prefix + REDIS_RECORDS)
    if manifest_raw is None or dump is None:
        log.warning(
            "model %s %s of namespace %s cannot be restored by serving (%s missing in "
            "s3://%s/%s); run `recstream models restore %s %s`",
            name, version, namespace, "manifest" if manifest_raw is None else REDIS_RECORDS,
            settings.bucket, prefix, name, version,
        )  # fmt: skip
        return False
    manifest = orjson.loads(manifest_raw)
    expected = manifest.get("redis", {}).get("dump_sha256")
    if expected != hashlib.sha256(dump).hexdigest():
        log.warning(
            "the record dump of model %s %s does not match the SHA-256 in its manifest; "
            "not restored (run `recstream models restore %s`)", name, version, name,
        )  # fmt: skip
        return False
    if not await run_lua(
        redis, CLAIM, 3, pending, versions, doomed, version, time.time() + LEASE_S
    ):
        return False  # another process restores (or deletes) it right now
    written: list[str] = []
    try:
        written = await write_dump(redis, keys, name, version, dump)
        summary = {k: v for k, v in manifest.items() if k not in ("files", "search")}
        if not await run_lua(redis, COMPLETE, 2, pending, versions, version, orjson.dumps(summary)):
            return False
    except BaseException:
        with contextlib.suppress(Exception):
            for start in range(0, len(written), 500):
                batch = written[start : start + 500]
                await redis.unlink(*(keys.model(name, version, x) for x in batch))
            await redis.zrem(pending, version)
        raise
    return bool(await run_lua(redis, PROMOTE, 2, versions, pointer, version))


class RegistryRestorer:
    """Watches for lost model pointers on serving's behalf (`notice`), and restores what
    S3 says served (`check`). One check per namespace at a time, at most every
    ``recheck_s`` (sooner, ``retry_s``, after a failure)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        s3: S3Client,
        settings: Settings,
        *,
        recheck_s: float = 30.0,
        retry_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.s3 = s3
        self.settings = settings
        self.recheck_s = recheck_s
        self.retry_s = retry_s
        self.restored: dict[tuple[str, str], str] = {}
        """(namespace, model) → version this process restored (for logs and tests)."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._next: dict[str, float] = {}

    def notice(self, namespace: str) -> None:
        """A model pointer of ``namespace`` is missing: check S3 soon (non-blocking)."""
        if namespace in self._tasks or time.monotonic() < self._next.get(namespace, 0.0):
            return
        task = asyncio.create_task(self._run(namespace), name=f"restore-models[{namespace}]")
        self._tasks[namespace] = task
        task.add_done_callback(lambda _: self._tasks.pop(namespace, None))

    async def warm(self, namespace: str) -> None:
        """The check a request that finds a pointer missing would start, made now and
        waited for (a start-up: its first S3 calls hold the event loop for ~10 ms while
        botocore resolves the endpoint); not made again for ``recheck_s``."""
        running = self._tasks.get(namespace)
        if running is not None:
            await asyncio.shield(running)
        elif time.monotonic() >= self._next.get(namespace, 0.0):
            await self._run(namespace)

    async def _run(self, namespace: str) -> None:
        wait = self.recheck_s
        try:
            await self.check(namespace)
            if await self.missing(namespace):
                wait = self.retry_s  # another process holds a restore lease: look again soon
        except (RecstreamError, RedisError, OSError) as exc:
            log.warning("restoring the models of %s failed, retrying: %s", namespace, exc)
            wait = self.retry_s
        self._next[namespace] = time.monotonic() + wait

    async def missing(self, namespace: str) -> list[str]:
        """Models S3 says serve in ``namespace`` whose pointer Redis does not have."""
        durable = await self.pointers(namespace)
        names = sorted(durable)
        if not names:
            return []
        live: list[Any] = await self.redis.mget([Keys(namespace).model_pointer(n) for n in names])
        return [name for name, current in zip(names, live, strict=True) if current is None]

    async def pointers(self, namespace: str) -> dict[str, str]:
        """Model → version, from S3's durable serving pointers of ``namespace``."""
        prefix = f"{SERVING_PREFIX}{namespace}/"
        found: dict[str, str] = {}
        try:
            paginator = self.s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    name = key[len(prefix) :].removesuffix(".json")
                    raw = await _get(self.s3, self.settings, serving_pointer_key(namespace, name))
                    if raw is not None:
                        found[name] = str(orjson.loads(raw)["version"])
        except (BotoCoreError, ClientError) as exc:
            raise translate(
                exc, f"listing s3://{self.settings.bucket}/{prefix}", self.settings, "s3"
            ) from exc
        return found

    async def check(self, namespace: str) -> dict[str, str]:
        """Restore every model whose pointer S3 has and Redis lost; returns what it did."""
        durable = await self.pointers(namespace)
        names = sorted(durable)
        if not names:
            return {}
        live: list[Any] = await self.redis.mget([Keys(namespace).model_pointer(n) for n in names])
        done: dict[str, str] = {}
        for name, current in zip(names, live, strict=True):
            if current is not None:
                continue
            version = durable[name]
            if await restore_serving_version(
                self.redis, self.s3, self.settings, namespace, name, version
            ):
                log.warning(
                    "model %s of namespace %s had no pointer in Redis (data lost?); "
                    "restored version %s from s3://%s",
                    name, namespace, version, self.settings.bucket,
                )  # fmt: skip
                done[name] = version
                self.restored[(namespace, name)] = version
        return done

    async def aclose(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
