"""Versioned publishing of trained models, with promote, rollback and garbage collection.

A publish produces a *version*: a sortable id (UTC time to the millisecond plus a random
suffix, e.g. ``20261123T122900.123Z-3fa2c1``). Its data lives in two places:

    s3://{bucket}/models/{name}/{version}/...            the files Model.save wrote
    s3://{bucket}/models/{name}/{version}/manifest.json  data range, params, metrics, ...
    s3://{bucket}/models/{name}/{version}/redis-keys.jsonl.gz   the record suffixes
    rs:{ns}:model:{name}:{version}:{suffix}              the model's RedisRecords

and four small Redis keys per model describe the versions:

    rs:{ns}:model:{name}:pending   ZSET  version -> lease deadline; publishes in progress
    rs:{ns}:model:{name}:versions  HASH  version -> summary JSON; *complete* versions only
    rs:{ns}:model:{name}:doomed    SET   versions being deleted (retired or failed)
    rs:{ns}:model:{name}:current   STR   the version serving reads (Keys.model_pointer)

A publish runs in this order, so that a failure at any point leaves the serving version
alone: claim a lease in ``pending`` → upload the files → write the records (renewing the
lease every chunk) → upload the key list and the manifest → *complete*: one Lua script
moves the version from ``pending`` to ``versions`` (the completion marker, written last)
→ *promote*: one Lua script sets ``current`` only if the version is complete. A publish
that raises moves its version to ``doomed`` and deletes what it wrote; one that dies
outright (kill -9, power loss) stops renewing its lease, and the next garbage collection
deletes its keys and files.

Garbage collection keeps the newest ``Settings.model_keep_versions`` complete versions plus
the current one, whatever its age. It retires a version with a Lua script that refuses to
touch the current one, so a concurrent promote cannot end up pointing at deleted data,
and deletes doomed versions' keys by their key list (no keyspace scan), then forgets them.
Every key above is therefore bounded: records by the K kept versions, ``versions`` and
``doomed`` by GC, ``pending`` by lease expiry.

`ModelRegistry.restore` rebuilds a version's Redis records from its S3 artifacts after
Redis lost them. Serving reads a model through `current_version`, `read_current` and
`read_current_many`; the last two read the pointer and the records in one atomic round
trip. They live in `recstream.published` (serving must not import training) and are
re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import re
import secrets
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis.asyncio as aioredis
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from recstream.aws import async_client, error_code, translate
from recstream.errors import (
    ConfigurationError,
    RecstreamError,
    ResourceNotFound,
    StoreUnavailable,
)
from recstream.keys import Keys
from recstream.periodic import repeating
from recstream.published import (
    BYTES_PER_COMMAND,
    MEMBERS_PER_COMMAND,
    REDIS_RECORDS,
    CurrentRecord,
    Lua,
    as_text,
    current_version,
    encode_record,
    queue_record,
    read_current,
    read_current_many,
    run_lua,
    serving_pointer_key,
)
from recstream.published import CLAIM as _CLAIM
from recstream.published import COMPLETE as _COMPLETE
from recstream.published import PROMOTE as _PROMOTE
from recstream.settings import Settings
from training.base import Model, RedisRecord

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = [
    "BYTES_PER_COMMAND",
    "MEMBERS_PER_COMMAND",
    "CurrentRecord",
    "DataRange",
    "GcReport",
    "ModelRegistry",
    "Progress",
    "PublishError",
    "RunInfo",
    "VersionInfo",
    "code_version",
    "current_version",
    "new_version",
    "open_registry",
    "read_current",
    "read_current_many",
]

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}$")
MANIFEST = "manifest.json"
REDIS_KEYS = "redis-keys.jsonl.gz"
"""Beside the manifest: every record suffix the version wrote (one JSON string a line),
so garbage collection deletes exactly those keys instead of scanning the keyspace."""
RESERVED = (MANIFEST, REDIS_KEYS, REDIS_RECORDS)
MANIFEST_FORMAT = 1
LEASE_S = 600.0
"""A publish that has not renewed its lease for this long is presumed dead and collected."""
CHUNK_MEMBERS = 20_000
"""Members (zset/hash fields, strings) sent per pipeline round trip while publishing."""
DELETE_BATCH = 500
S3_CONCURRENCY = 8

Progress = Callable[[str, int, int | None], None]
"""Called as ``progress(stage, advance, total)`` while publishing: stage is "files" or
"records"; total is known for files and None for records (a model streams them)."""


class PublishError(StoreUnavailable):
    """A publish did not complete; nothing it wrote is served, and it has been removed."""

    retriable = True
    code = "publish_failed"


# --- version ids and code version ----------------------------------------------------


def new_version(now: float | None = None) -> str:
    """A new version id: sorts by creation time (ms), random suffix against collisions."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S") + f".{moment.microsecond // 1000:03d}Z"
    return f"{stamp}-{secrets.token_hex(3)}"


def version_time(version: str) -> float:
    """The creation time encoded in a version id, as unix seconds."""
    moment = datetime.strptime(version[:19], "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
    return moment.timestamp()


@cache
def code_version() -> str:
    """``git describe`` of the checkout this code runs from, else the package version."""
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            if out.stdout.strip():
                return f"git:{out.stdout.strip()}"
    try:
        return f"recstream=={metadata.version('recstream')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def check_name(name: str) -> str:
    if not MODEL_NAME.match(name):
        raise ConfigurationError(
            f"model name {name!r} is not allowed; use letters, digits, '_' and '-' "
            "(it appears in Redis keys and S3 paths)"
        )
    return name


def check_version(version: str) -> str:
    if not VERSION.match(version):
        raise ConfigurationError(
            f"{version!r} is not a version id (like 20261123T122900.123Z-3fa2c1); "
            "`recstream models list` shows them"
        )
    return version


# --- what a publish records ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataRange:
    """What the model was trained on: recorded in the manifest and shown by `models list`."""

    source: str
    start: float | None
    """Timestamp (unix seconds) of the oldest interaction used."""
    end: float | None
    """Timestamp of the newest interaction used."""
    rows: int
    users: int | None = None
    items: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "start": self.start,
            "end": self.end,
            "rows": self.rows,
            "users": self.users,
            "items": self.items,
        }


@dataclass(frozen=True, slots=True)
class RunInfo:
    """The training run's facts that go into a version's manifest besides the model's own."""

    data: DataRange
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Held-out metrics, e.g. {"hr@10": 0.31, "ndcg@10": 0.18}."""
    search: Any = None
    """The hyper-parameter search record (trials and the chosen point); JSON-serialisable."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Anything else worth keeping, e.g. the evaluation protocol and timings."""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One complete version, as `models list` shows it."""

    name: str
    version: str
    created: float
    data: dict[str, Any]
    metrics: dict[str, float]
    records: int
    code_version: str
    current: bool = False

    @classmethod
    def from_summary(cls, name: str, version: str, raw: bytes, current: bool) -> VersionInfo:
        summary = orjson.loads(raw)
        return cls(
            name=name,
            version=version,
            created=float(summary.get("created_unix", version_time(version))),
            data=dict(summary.get("data", {})),
            metrics={k: float(v) for k, v in summary.get("metrics", {}).items()},
            records=int(summary.get("redis", {}).get("records", 0)),
            code_version=str(summary.get("code_version", "")),
            current=current,
        )


@dataclass(slots=True)
class GcReport:
    """What one garbage collection removed."""

    retired: list[str] = field(default_factory=list)
    """Complete versions deleted because they fell out of the last K."""
    abandoned: list[str] = field(default_factory=list)
    """In-progress publishes whose lease expired (their process died)."""
    redis_keys: int = 0
    s3_objects: int = 0


# --- Lua scripts: the only writes to the bookkeeping keys once a publish has started ---
# (claim, complete and promote live in recstream.published: serving's automatic restore
# runs them too)

# Roll back: switch only if serving still points where the caller saw it, so a promote
# that lands in between is not silently undone.
# KEYS: versions, current  ARGV: target version, expected current ('' = none)
_SWITCH_FROM = Lua("""
local now = redis.call('GET', KEYS[2]) or ''
if now ~= ARGV[2] then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
""")
# Retire a complete version: out of `versions` (so nobody can promote it) and into
# `doomed` (so its deletion is finished even if this process dies), unless it serves.
# KEYS: versions, current, doomed  ARGV: version
_RETIRE = Lua("""
if redis.call('GET', KEYS[2]) == ARGV[1] then return 0 end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[3], ARGV[1])
return 1
""")
# Give up on an in-progress publish: its own failure (deadline ignored, ARGV[2] = 'inf'),
# or a lapsed lease found by GC. Afterwards neither COMPLETE nor a lease renewal works.
# KEYS: pending, doomed  ARGV: version, now
_REAP = Lua("""
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) < tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
""")


def _summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What `versions` keeps of a manifest: all but the file list and the search record."""
    return {k: v for k, v in manifest.items() if k not in ("files", "search")}


# --- the registry -------------------------------------------------------------------------


class ModelRegistry:
    """Publish, list, promote, roll back and garbage-collect model versions.

    ``s3`` is needed to publish and to collect garbage; listing, promoting and rolling
    back only touch Redis.
    """

    def __init__(
        self, redis: aioredis.Redis, settings: Settings, s3: S3Client | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.s3 = s3
        self.keys = Keys(settings.namespace)

    # key names (see the module docstring)
    def _base(self, name: str) -> str:
        return self.keys.model(name, "", "")[:-1]

    def pending_key(self, name: str) -> str:
        return self._base(name) + "pending"

    def versions_key(self, name: str) -> str:
        return self._base(name) + "versions"

    def doomed_key(self, name: str) -> str:
        return self._base(name) + "doomed"

    def s3_prefix(self, name: str, version: str | None = None) -> str:
        return f"models/{name}/" if version is None else f"models/{name}/{version}/"

    def _redis_failed(self, exc: RedisError, what: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"{what} failed at Redis {self.settings.redis_url}: {exc}; is it up? "
            "(`recstream up` starts the local stack)"
        )

    def _need_s3(self) -> S3Client:
        if self.s3 is None:
            raise ConfigurationError("this ModelRegistry has no S3 client; use open_registry()")
        return self.s3

    # --- reading ---------------------------------------------------------------------

    async def names(self) -> list[str]:
        """Every model with at least one complete version in this namespace."""
        pattern = self._base("*") + "versions"
        found: set[str] = set()
        try:
            async for raw in self.redis.scan_iter(match=pattern, count=1000):
                middle = as_text(raw)[len(self.keys.prefix) + len("model:") : -len(":versions")]
                if MODEL_NAME.match(middle):
                    found.add(middle)
        except RedisError as exc:
            raise self._redis_failed(exc, "listing models") from exc
        return sorted(found)

    async def current(self, name: str) -> str | None:
        try:
            return await current_version(self.redis, self.keys, check_name(name))
        except RedisError as exc:
            raise self._redis_failed(exc, f"reading model {name!r}'s pointer") from exc

    async def versions(self, name: str) -> list[VersionInfo]:
        """Complete versions of ``name``, oldest first, with the serving one marked."""
        check_name(name)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.versions_key(name))
                pipe.get(self.keys.model_pointer(name))
                summaries, current = await pipe.execute()
        except RedisError as exc:
            raise self._redis_failed(exc, f"listing versions of {name!r}") from exc
        live = None if current is None else as_text(current)
        infos = [
            VersionInfo.from_summary(name, as_text(v), raw, as_text(v) == live)
            for v, raw in summaries.items()
        ]
        return sorted(infos, key=lambda info: info.version)

    async def manifest(self, name: str, version: str) -> dict[str, Any]:
        """The full manifest of a version, from S3."""
        s3 = self._need_s3()
        key = self.s3_prefix(check_name(name), check_version(version)) + MANIFEST
        try:
            reply = await s3.get_object(Bucket=self.settings.bucket, Key=key)
            async with reply["Body"] as body:
                data = await body.read()
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                raise ResourceNotFound(
                    f"model {name!r} has no manifest for version {version!r} at "
                    f"s3://{self.settings.bucket}/{key}; `recstream models list {name}` "
                    "shows the versions that exist"
                ) from exc
            raise translate(
                exc, f"manifest s3://{self.settings.bucket}/{key}", self.settings
            ) from exc
        except BotoCoreError as exc:
            raise translate(
                exc, f"manifest s3://{self.settings.bucket}/{key}", self.settings
            ) from exc
        return cast(dict[str, Any], orjson.loads(data))

    # --- switching -------------------------------------------------------------------

    async def promote(self, name: str, version: str) -> None:
        """Point serving at ``version``; refused unless the version is complete."""
        check_name(name)
        check_version(version)
        try:
            done = await run_lua(
                self.redis,
                _PROMOTE,
                2,
                self.versions_key(name),
                self.keys.model_pointer(name),
                version,
            )
        except RedisError as exc:
            raise self._redis_failed(exc, f"promoting {name} {version}") from exc
        if not done:
            raise ResourceNotFound(
                f"model {name!r} has no complete version {version!r} (unfinished, failed or "
                f"garbage-collected); `recstream models list {name}` shows the ones to promote"
            )
        await self._remember_serving(name, version)

    async def _remember_serving(self, name: str, version: str) -> None:
        """The durable copy of the serving pointer, so serving can restore what served
        after Redis lost it (recstream.model_restore). Without an S3 client (a registry
        that only promotes), the copy is left as it was."""
        if self.s3 is None:
            log.warning("no S3 client: the durable pointer of %s stays as it was", name)
            return
        key = serving_pointer_key(self.keys.namespace, name)
        body = _dumps({"namespace": self.keys.namespace, "name": name, "version": version})
        try:
            await self._put(self.s3, key, body, f"the serving pointer of {name}")
        except RecstreamError as exc:
            raise StoreUnavailable(
                f"{name} {version} serves, but its durable pointer "
                f"s3://{self.settings.bucket}/{key} was not written ({exc}); after a Redis "
                f"loss the previous version would be restored: run `recstream models "
                f"promote {name} {version}` again"
            ) from exc

    async def rollback(self, name: str) -> str:
        """Point serving at the newest complete version older than the current one."""
        infos = await self.versions(name)
        current = next((i.version for i in infos if i.current), None)
        older = [i.version for i in infos if current is None or i.version < current]
        if not older:
            what = f"older than {current}" if current else "at all"
            raise ResourceNotFound(
                f"model {name!r} has no complete version {what} to roll back to; "
                f"`recstream models list {name}` shows its versions"
            )
        try:
            switched = await run_lua(
                self.redis,
                _SWITCH_FROM,
                2,
                self.versions_key(name),
                self.keys.model_pointer(name),
                older[-1],
                current or "",
            )
        except RedisError as exc:
            raise self._redis_failed(exc, f"rolling back {name}") from exc
        if not switched:
            raise ConfigurationError(
                f"model {name!r} changed while rolling back (promoted or collected "
                f"meanwhile); check `recstream models list {name}` and roll back again"
            )
        await self._remember_serving(name, older[-1])
        return older[-1]

    # --- publishing --------------------------------------------------------------------

    async def publish(
        self,
        model: Model,
        run: RunInfo,
        *,
        promote: bool = True,
        gc: bool = True,
        version: str | None = None,
        progress: Progress | None = None,
    ) -> VersionInfo:
        """Publish a fitted model as a new version, then (by default) promote it and GC.

        On any failure before the version is complete, everything this publish wrote is
        deleted and the error is raised as `PublishError`; the serving version is untouched.
        """
        s3 = self._need_s3()
        name = check_name(model.name)
        version = check_version(version or new_version())
        report = progress or (lambda stage, advance, total: None)
        started = time.time()
        try:
            claimed = await self._claim(name, version, started + LEASE_S)
        except RedisError as exc:
            raise self._redis_failed(exc, f"starting to publish {name}") from exc
        if not claimed:
            raise ConfigurationError(
                f"version {version} of {name!r} exists already (published, in progress or "
                "being deleted); publish without choosing a version id"
            )
        try:
            with tempfile.TemporaryDirectory(prefix=f"recstream-{name}-") as tmp:
                directory = Path(tmp) / "model"
                directory.mkdir()
                async with self._kept_alive(name, version):
                    await asyncio.to_thread(model.save, directory)
                files = await self._upload_dir(s3, name, version, directory, report)
                records, dump_sha256 = await self._write_listed_records(
                    s3, name, version, model, report, Path(tmp) / REDIS_KEYS
                )
            manifest = {
                "format": MANIFEST_FORMAT,
                "name": name,
                "version": version,
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "created": datetime.fromtimestamp(started, tz=UTC).isoformat(),
                "created_unix": started,
                "published_unix": time.time(),
                "code_version": code_version(),
                "data": run.data.as_dict(),
                "params": model.params(),
                "metrics": dict(run.metrics),
                "search": run.search,
                "extra": dict(run.extra),
                "files": files,
                "redis": {
                    "records": records,
                    "prefix": self.keys.model(name, version, ""),
                    "key_list": REDIS_KEYS,
                    "dump": REDIS_RECORDS,
                    "dump_sha256": dump_sha256,
                },
            }
            await self._put(
                s3, self.s3_prefix(name, version) + MANIFEST, _dumps(manifest), "manifest"
            )
            summary = _summary(manifest)
            try:
                completed = await self._complete(name, version, summary)
            except RedisError as exc:
                raise self._redis_failed(exc, f"completing {name} {version}") from exc
            if not completed:
                raise PublishError(
                    f"publishing {name} {version} took longer than its {LEASE_S:.0f} s lease "
                    "and was collected as abandoned; nothing was promoted, run it again"
                )
        except BaseException as exc:
            # BaseException: a Ctrl-C (CancelledError) mid-publish must clean up as well.
            await self._discard_quietly(name, version)
            if isinstance(exc, Exception) and not isinstance(exc, PublishError):
                raise PublishError(
                    f"publishing model {name!r} version {version} failed ({exc}); "
                    "it was removed and the serving version is unchanged"
                ) from exc
            raise
        if promote:
            await self.promote(name, version)
        if gc:
            try:
                await self.gc(name)
            except RecstreamError:
                # The version is published and serving; old ones go at the next collection.
                log.warning("garbage collection of %s failed; will retry next time", name)
        live = promote or await self.current(name) == version
        info = VersionInfo.from_summary(name, version, _dumps(summary), live)
        return info

    async def restore(
        self,
        name: str,
        version: str | None = None,
        *,
        promote: bool = True,
        model_class: type[Model] | None = None,
    ) -> VersionInfo:
        try:
            return await self._restore(name, version, promote, model_class)
        except RedisError as exc:
            raise self._redis_failed(exc, f"restoring {name}") from exc

    async def _restore(
        self,
        name: str,
        version: str | None,
        promote: bool,
        model_class: type[Model] | None,
    ) -> VersionInfo:
        """Rebuild a version's Redis records from its S3 artifacts, e.g. after Redis lost
        its data: download the files, load the model, write its records under the same
        version id, mark it complete and (by default) promote it.

        ``version`` defaults to the version that served in this namespace (the durable
        pointer promote writes to S3), else the newest version in S3 with a manifest. The
        model class comes from the manifest and must live in the ``training`` package,
        unless ``model_class`` is given; every file is checked against its SHA-256.
        """
        s3 = self._need_s3()
        check_name(name)
        if version is None:
            # What served in this namespace (the durable pointer), else the newest.
            pointer = await self._get_optional(s3, serving_pointer_key(self.keys.namespace, name))
            if pointer is not None:
                version = str(orjson.loads(pointer)["version"])
        if version is None:
            for candidate in sorted(await self._s3_versions(s3, name), reverse=True):
                if await self._has_manifest(name, candidate):
                    version = candidate
                    break
            if version is None:
                raise ResourceNotFound(
                    f"model {name!r} has no published version in s3://{self.settings.bucket}/"
                    f"{self.s3_prefix(name)}; train it first (`recstream train`)"
                )
        manifest = await self.manifest(name, check_version(version))
        if version in {as_text(v) for v in await self.redis.hkeys(self.versions_key(name))}:
            raise ConfigurationError(
                f"model {name!r} version {version} is complete in Redis already; "
                f"promote it with `recstream models promote {name} {version}`"
            )
        if not await self._claim(name, version, time.time() + LEASE_S):
            raise ConfigurationError(
                f"model {name!r} version {version} is being published, restored or deleted "
                "right now; wait for that to finish, then restore again"
            )
        try:
            # The operator's restore reloads the model and checks every file; serving's
            # automatic one (recstream.model_restore) copies the record dump instead.
            await self._restore_by_loading(s3, name, version, manifest, model_class)
            summary = _summary(manifest)
            if not await self._complete(name, version, summary):
                raise PublishError(f"restoring {name} {version} outlived its lease; run it again")
        except BaseException:
            # The S3 artifacts are the source of truth here: only the Redis side goes.
            with contextlib.suppress(Exception):
                await self._delete_redis_prefix(self.keys.model(name, version, ""))
                await self.redis.zrem(self.pending_key(name), version)
            raise
        if promote:
            await self.promote(name, version)
        return VersionInfo.from_summary(
            name, version, _dumps(summary), promote or await self.current(name) == version
        )

    async def _get_optional(self, s3: S3Client, key: str) -> bytes | None:
        try:
            reply = await s3.get_object(Bucket=self.settings.bucket, Key=key)
            async with reply["Body"] as body:
                return await body.read()
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise translate(exc, f"s3://{self.settings.bucket}/{key}", self.settings) from exc
        except BotoCoreError as exc:
            raise translate(exc, f"s3://{self.settings.bucket}/{key}", self.settings) from exc

    async def _restore_by_loading(
        self,
        s3: S3Client,
        name: str,
        version: str,
        manifest: Mapping[str, Any],
        model_class: type[Model] | None,
    ) -> None:
        """A version published before record dumps: load the model and write its records."""
        cls = model_class or _model_class(str(manifest.get("model_class", "")))
        with tempfile.TemporaryDirectory(prefix=f"recstream-{name}-") as tmp:
            directory = Path(tmp) / "model"
            for entry in manifest.get("files", []):
                data = await self._get(s3, self.s3_prefix(name, version) + entry["path"])
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise ConfigurationError(
                        f"s3 file {entry['path']} of {name} {version} does not match the "
                        "SHA-256 in its manifest; restore another version"
                    )
                target = (directory / entry["path"]).resolve()
                if not target.is_relative_to(directory.resolve()):
                    raise ConfigurationError(
                        f"the manifest of {name} {version} names a file outside the "
                        f"model folder ({entry['path']!r}); restore another version"
                    )
                await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
                await asyncio.to_thread(target.write_bytes, data)
            async with self._kept_alive(name, version):
                model = await asyncio.to_thread(cls.load, directory)
            noop: Progress = lambda stage, advance, total: None  # noqa: E731
            await self._write_listed_records(
                s3, name, version, model, noop, Path(tmp) / REDIS_KEYS, upload_dump=False
            )

    async def _get(self, s3: S3Client, key: str) -> bytes:
        try:
            reply = await s3.get_object(Bucket=self.settings.bucket, Key=key)
            async with reply["Body"] as body:
                return await body.read()
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"s3://{self.settings.bucket}/{key}", self.settings) from exc

    async def _upload_dir(
        self, s3: S3Client, name: str, version: str, directory: Path, report: Progress
    ) -> list[dict[str, Any]]:
        paths = await asyncio.to_thread(_files_under, directory)
        if any(p.relative_to(directory).as_posix() in RESERVED for p in paths):
            raise ConfigurationError(
                f"model {name!r} saved a file named one of {RESERVED}, which publishing reserves"
            )
        limit = asyncio.Semaphore(S3_CONCURRENCY)

        async def upload(path: Path) -> dict[str, Any]:
            relative = path.relative_to(directory).as_posix()
            data = await asyncio.to_thread(path.read_bytes)
            async with limit:
                await self._put(s3, self.s3_prefix(name, version) + relative, data, relative)
                await self._renew(name, version)
            report("files", 1, len(paths))
            return {
                "path": relative,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(upload(p)) for p in paths]
        except* Exception as failed:
            # Report the first failure itself (it names the file and the fix), not a group.
            raise failed.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _put(self, s3: S3Client, key: str, data: bytes, what: str) -> None:
        try:
            await s3.put_object(Bucket=self.settings.bucket, Key=key, Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise translate(
                exc, f"uploading {what} to s3://{self.settings.bucket}/{key}", self.settings
            ) from exc

    async def _write_records(
        self,
        name: str,
        version: str,
        records: Iterable[RedisRecord],
        report: Progress,
        key_list: Path,
    ) -> int:
        count = flushed = members = 0
        renew_by = time.monotonic() + LEASE_S / 4
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                with (
                    gzip.open(key_list, "wb") as suffixes,
                    gzip.open(key_list.with_name(REDIS_RECORDS), "wb") as dump,
                ):
                    for record in records:
                        key = self.keys.model(name, version, record.suffix)
                        members += _queue(pipe, key, record)
                        suffixes.write(orjson.dumps(record.suffix) + b"\n")
                        dump.write(encode_record(record.suffix, record.kind, record.value))
                        count += 1
                        # Flush by size, and by time so that a model that computes its
                        # records slowly still renews its lease.
                        if members >= CHUNK_MEMBERS or time.monotonic() > renew_by:
                            await self._flush(pipe, name, version)
                            report("records", count - flushed, None)
                            members, flushed = 0, count
                            renew_by = time.monotonic() + LEASE_S / 4
                await self._flush(pipe, name, version)
                report("records", count - flushed, None)
        except RedisError as exc:
            raise self._redis_failed(exc, f"writing {name} {version}'s records") from exc
        return count

    @contextlib.asynccontextmanager
    async def _kept_alive(self, name: str, version: str) -> AsyncIterator[None]:
        """Renew the lease while a long step that cannot renew it runs (a model's own
        ``save`` or ``load`` in a thread: an ALS or session-kNN model can take minutes),
        so GC never collects a publish that is alive. A failed renewal is retried at the
        next tick; the completion step still refuses a version whose lease lapsed."""

        async def renew() -> None:
            with contextlib.suppress(StoreUnavailable):
                await self._renew(name, version)

        async with repeating(LEASE_S / 4, renew, name=f"lease[{name} {version}]"):
            yield

    async def _renew(self, name: str, version: str) -> None:
        try:
            await self.redis.zadd(self.pending_key(name), {version: time.time() + LEASE_S}, xx=True)
        except RedisError as exc:
            raise self._redis_failed(exc, f"renewing the lease of {name} {version}") from exc

    async def _flush(self, pipe: Any, name: str, version: str) -> None:
        # Renewing the lease with each chunk is what tells GC this publish is alive.
        pipe.zadd(self.pending_key(name), {version: time.time() + LEASE_S}, xx=True)
        await pipe.execute()

    # --- deleting ------------------------------------------------------------------------

    async def _discard_quietly(self, name: str, version: str) -> None:
        try:
            await asyncio.shield(self._discard(name, version))
        except Exception:
            # Left in `doomed` (or, if Redis was down, in `pending` until the lease lapses):
            # the next garbage collection finishes the job.
            log.exception("could not remove the failed publish %s %s; GC will", name, version)

    async def _discard(self, name: str, version: str) -> None:
        await run_lua(
            self.redis, _REAP, 2, self.pending_key(name), self.doomed_key(name), version, "inf"
        )
        await self._destroy(self._need_s3(), name, version)

    async def _write_listed_records(
        self,
        s3: S3Client,
        name: str,
        version: str,
        model: Model,
        progress: Progress,
        key_list: Path,
        *,
        upload_dump: bool = True,
    ) -> tuple[int, str]:
        """Write the model's records, then upload the list of keys written (GC deletes a
        version by that list, so it must describe exactly these keys) and the records
        themselves (serving restores them after a Redis loss without loading the model:
        recstream.model_restore); returns the count and the dump's SHA-256."""
        records = await self._write_records(
            name, version, model.redis_records(), progress, key_list
        )
        dump = await asyncio.to_thread(key_list.with_name(REDIS_RECORDS).read_bytes)
        if upload_dump:
            await self._put(
                s3, self.s3_prefix(name, version) + REDIS_RECORDS, dump, "the Redis records"
            )
        await self._put(
            s3,
            self.s3_prefix(name, version) + REDIS_KEYS,
            await asyncio.to_thread(key_list.read_bytes),
            "the list of Redis keys",
        )
        return records, hashlib.sha256(dump).hexdigest()

    async def _complete(self, name: str, version: str, summary: Mapping[str, Any]) -> bool:
        """The completion marker (written last): pending -> versions, with the summary."""
        return bool(
            await run_lua(
                self.redis,
                _COMPLETE,
                2,
                self.pending_key(name),
                self.versions_key(name),
                version,
                _dumps(summary),
            )
        )

    async def _claim(self, name: str, version: str, deadline: float) -> bool:
        return bool(
            await run_lua(
                self.redis,
                _CLAIM,
                3,
                self.pending_key(name),
                self.versions_key(name),
                self.doomed_key(name),
                version,
                deadline,
            )
        )

    async def _has_manifest(self, name: str, version: str) -> bool:
        try:
            await self.manifest(name, version)
        except ResourceNotFound:
            return False
        return True

    async def _destroy(
        self, s3: S3Client, name: str, version: str, *, keep_restorable: bool = False
    ) -> tuple[int, int]:
        """Delete a doomed version's Redis keys and S3 objects, then forget it.

        ``keep_restorable``: keep the S3 copy when it has a manifest (the manifest is
        written after every file, so such a copy is whole and `models restore` can rebuild
        Redis from it). Used for lapsed leases, which may be a slow or killed restore."""
        suffixes = await self._key_list(s3, name, version)
        if suffixes is None:
            # No key list (the publish died before writing it): find the keys by prefix.
            keys = await self._delete_redis_prefix(self.keys.model(name, version, ""))
        else:
            keys = await self._unlink([self.keys.model(name, version, x) for x in suffixes])
        objects = 0
        if not (keep_restorable and await self._has_manifest(name, version)):
            objects = await self._delete_s3_prefix(s3, self.s3_prefix(name, version))
        await self.redis.srem(self.doomed_key(name), version)
        return keys, objects

    async def _key_list(self, s3: S3Client, name: str, version: str) -> list[str] | None:
        key = self.s3_prefix(name, version) + REDIS_KEYS
        try:
            reply = await s3.get_object(Bucket=self.settings.bucket, Key=key)
            async with reply["Body"] as body:
                data = await body.read()
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise translate(
                exc, f"reading s3://{self.settings.bucket}/{key}", self.settings
            ) from exc
        except BotoCoreError as exc:
            raise translate(
                exc, f"reading s3://{self.settings.bucket}/{key}", self.settings
            ) from exc
        return [orjson.loads(line) for line in gzip.decompress(data).splitlines() if line]

    async def _delete_redis_prefix(self, prefix: str) -> int:
        return await self._unlink(
            [k async for k in self.redis.scan_iter(match=_glob_escape(prefix) + "*", count=1000)]
        )

    async def _unlink(self, keys: Sequence[bytes | str]) -> int:
        for i in range(0, len(keys), DELETE_BATCH):
            await self.redis.unlink(*keys[i : i + DELETE_BATCH])
        return len(keys)

    async def _delete_s3_prefix(self, s3: S3Client, prefix: str) -> int:
        deleted = 0
        try:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    await s3.delete_objects(
                        Bucket=self.settings.bucket,
                        Delete={"Objects": objects, "Quiet": True},  # type: ignore[typeddict-item]
                    )
                    deleted += len(objects)
        except (BotoCoreError, ClientError) as exc:
            raise translate(
                exc, f"deleting s3://{self.settings.bucket}/{prefix}", self.settings
            ) from exc
        return deleted

    async def _s3_versions(self, s3: S3Client, name: str) -> set[str]:
        found: set[str] = set()
        prefix = self.s3_prefix(name)
        try:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(
                Bucket=self.settings.bucket, Prefix=prefix, Delimiter="/"
            ):
                for common in page.get("CommonPrefixes", []):
                    version = common.get("Prefix", "")[len(prefix) :].rstrip("/")
                    if VERSION.match(version):
                        found.add(version)
        except (BotoCoreError, ClientError) as exc:
            raise translate(
                exc, f"listing s3://{self.settings.bucket}/{prefix}", self.settings
            ) from exc
        return found

    async def gc(self, name: str, *, keep: int | None = None, sweep: bool = False) -> GcReport:
        """Delete all but the newest ``keep`` complete versions (never the current one),
        publishes whose lease lapsed, and S3 files that belong to no version.

        Deleting a version reads its key list from S3, so collection never scans the
        keyspace, except for a publish that died before writing that list. ``sweep`` also
        scans every key under the model's prefix for keys that no version owns (there
        should be none; `recstream models gc --sweep` is the tool for doubt).
        """
        s3 = self._need_s3()
        check_name(name)
        keep = self.settings.model_keep_versions if keep is None else keep
        if keep < 1:
            raise ConfigurationError("keep at least one version (RECSTREAM_MODEL_KEEP_VERSIONS)")
        report = GcReport()
        versions_key, pointer = self.versions_key(name), self.keys.model_pointer(name)
        pending, doomed = self.pending_key(name), self.doomed_key(name)
        try:
            complete = sorted(as_text(v) for v in await self.redis.hkeys(versions_key))
            for version in complete[:-keep]:
                if await run_lua(self.redis, _RETIRE, 3, versions_key, pointer, doomed, version):
                    report.retired.append(version)
            now = time.time()
            leases = cast(
                list[tuple[bytes, float]], await self.redis.zrange(pending, 0, -1, withscores=True)
            )
            for raw, deadline in leases:
                if deadline < now and await run_lua(
                    self.redis, _REAP, 2, pending, doomed, raw, now
                ):
                    report.abandoned.append(as_text(raw))
            for member in sorted(await self.redis.smembers(doomed)):
                deleted, objects = await self._destroy(
                    s3, name, as_text(member), keep_restorable=as_text(member) in report.abandoned
                )
                report.redis_keys += deleted
                report.s3_objects += objects
            # List what exists *before* reading which versions are alive: a publish claims
            # its lease before writing anything, so whatever the listing saw belongs to a
            # version that the (later, atomic) read below reports, unless it is dead.
            by_version: dict[str, list[bytes]] = {}
            if sweep:
                base = self._base(name)
                async for raw_key in self.redis.scan_iter(
                    match=_glob_escape(base) + "*", count=1000
                ):
                    head, sep, _ = raw_key[len(base) :].partition(b":")
                    if sep:
                        by_version.setdefault(head.decode(), []).append(raw_key)
            in_s3 = await self._s3_versions(s3, name)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hkeys(versions_key)
                pipe.zrange(pending, 0, -1)
                pipe.smembers(doomed)
                pipe.get(pointer)
                alive_complete, alive_pending, dying, current = await pipe.execute()
            alive = {as_text(v) for v in [*alive_complete, *alive_pending, *dying]}
            if current is not None:
                alive.add(as_text(current))
            for version, found in by_version.items():
                if version not in alive:
                    report.redis_keys += await self._unlink(found)
            for version in sorted(in_s3 - alive):
                # S3 is the durable copy: a version Redis no longer knows (Redis lost its
                # data) stays restorable. Only a prefix with no manifest, older than any
                # live lease, is debris of a publish that died.
                if version_time(version) > now - LEASE_S or await self._has_manifest(name, version):
                    continue
                report.s3_objects += await self._delete_s3_prefix(s3, self.s3_prefix(name, version))
        except RedisError as exc:
            raise self._redis_failed(exc, f"collecting old versions of {name!r}") from exc
        return report


def _queue(pipe: Any, key: str, record: RedisRecord) -> int:
    """Add one record's writes to ``pipe`` in bounded commands (`queue_record`)."""
    return queue_record(pipe, key, record.suffix, record.kind, record.value)


def _model_class(path: str) -> type[Model]:
    """The class a manifest names; only from the training package, since the manifest
    comes from a bucket and importing whatever it names would run whatever it says."""
    module_name, _, attr = path.rpartition(".")
    if not module_name.startswith("training.") or not attr:
        raise ConfigurationError(
            f"the manifest names model class {path!r}, which is not in the training package; "
            "restore it from code that passes the class"
        )
    import importlib

    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"model class {path!r} of the manifest cannot be imported ({exc}); "
            "is this the code version that trained it?"
        ) from exc
    return cast(type[Model], cls)


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@asynccontextmanager
async def open_registry(settings: Settings) -> AsyncIterator[ModelRegistry]:
    """A `ModelRegistry` with its own Redis and S3 clients, closed on exit."""
    redis = aioredis.from_url(settings.redis_url, socket_connect_timeout=5.0)
    try:
        async with async_client(settings, "s3") as s3:
            yield ModelRegistry(redis, settings, s3)
    finally:
        await redis.aclose()


def iter_summaries(infos: Iterable[VersionInfo]) -> Iterator[dict[str, Any]]:
    """Versions as plain dicts (for `models list --json`)."""
    for info in infos:
        yield {
            "name": info.name,
            "version": info.version,
            "created": info.created,
            "current": info.current,
            "data": info.data,
            "metrics": info.metrics,
            "records": info.records,
            "code_version": info.code_version,
        }
