"""API keys: creation, salted-hash storage in DynamoDB, verification with a bounded cache.

A key reads ``rs_<id>_<secret>``: ``<id>`` (12 hex characters) is public and is the
DynamoDB partition key of table ``{prefix}-apikeys``; ``<secret>`` (43 url-safe
characters, 256 bits) is shown once, when the key is created, and only its scrypt hash
(per-key random salt) is stored. Each key carries scopes (``events:write``,
``recommendations:read``, ``admin``; admin implies the others) and the namespaces it may
use (``*`` for all).

Verification costs one DynamoDB read and one scrypt on a cache miss; the result is
cached in process for ``Settings.apikey_cache_ttl_s`` (default 30 s), so revoking a key
takes effect on every API process within that time. Unknown ids are cached too, so a
flood of made-up keys costs one read per id per TTL, not one per request.

SigV4 (the Personalize-compatible routes): a signature can only be checked with the
signer's secret, which a hash cannot give back. So each key's SigV4 secret access key is
derived, ``HMAC-SHA256(Settings.apikey_sigv4_secret, key_id)``, and nothing reversible is
stored; the access key id is ``rs_<id>``. The trade-off (docs/security.md): whoever holds
the server secret can derive every key's SigV4 secret, and rotating it re-issues them all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from botocore.exceptions import BotoCoreError, ClientError

from recstream.aws import translate
from recstream.errors import ConfigurationError
from recstream.settings import NAMESPACE_PATTERN, Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = [
    "SCOPES",
    "ApiKey",
    "ApiKeyStore",
    "KeyCache",
    "Scope",
    "hash_secret",
    "parse_key",
    "sigv4_secret",
]

Scope = Literal["events:write", "recommendations:read", "admin"]
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
_KEY = re.compile(r"^rs_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_ACCESS_KEY = re.compile(r"^rs_([0-9a-f]{12})$")
_NAMESPACE = re.compile(NAMESPACE_PATTERN)
# scrypt's "interactive" cost (16 MiB, ~50 ms): a stolen table stays useless, and the
# cache keeps it off the request path. The secrets are 256 bits, so this is defence in depth.
_SCRYPT: Final = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


def hash_secret(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def parse_key(presented: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    match = _KEY.match(presented)
    return (match.group(1), match.group(2)) if match else None


def access_key_id(key_id: str) -> str:
    return f"rs_{key_id}"


def key_id_from_access_key(access_key: str) -> str | None:
    match = _ACCESS_KEY.match(access_key)
    return match.group(1) if match else None


def sigv4_secret(settings: Settings, key_id: str) -> str | None:
    """The SigV4 secret access key of a key, or None when SigV4 is not configured."""
    if settings.apikey_sigv4_secret is None:
        return None
    server = settings.apikey_sigv4_secret.encode()
    digest = hmac.new(server, b"recstream-sigv4:" + key_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key (never its secret): who may do what, where."""

    key_id: str
    scopes: frozenset[str]
    namespaces: frozenset[str]
    name: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def allows(self, scope: str, namespace: str | None) -> bool:
        if self.revoked:
            return False
        if scope not in self.scopes and "admin" not in self.scopes:
            return False
        return namespace is None or "*" in self.namespaces or namespace in self.namespaces

    def describe(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "namespaces": sorted(self.namespaces),
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass
class KeyCache:
    """A bounded LRU of verification results, each trusted for ``ttl`` seconds."""

    ttl: float
    size: int
    _entries: OrderedDict[str, tuple[float, ApiKey | None]] = field(default_factory=OrderedDict)

    def get(self, token: str) -> tuple[bool, ApiKey | None]:
        entry = self._entries.get(token)
        if entry is None or entry[0] < time.monotonic():
            self._entries.pop(token, None)
            return False, None
        self._entries.move_to_end(token)
        return True, entry[1]

    def put(self, token: str, key: ApiKey | None) -> None:
        self._entries[token] = (time.monotonic() + self.ttl, key)
        self._entries.move_to_end(token)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class ApiKeyStore:
    """Keys in DynamoDB table ``Settings.apikeys_table`` (partition key ``key_id``)."""

    def __init__(self, client: DynamoDBClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.table = settings.apikeys_table
        self.cache = KeyCache(settings.apikey_cache_ttl_s, settings.apikey_cache_size)

    # --- administration (the CLI) -------------------------------------------------------

    async def create(
        self, scopes: Iterable[str], namespaces: Iterable[str], name: str = ""
    ) -> tuple[ApiKey, str]:
        """A new key and its plaintext (shown once; only a salted hash is stored)."""
        scope_set = frozenset(scopes)
        unknown = scope_set - set(SCOPES)
        if not scope_set or unknown:
            raise ConfigurationError(
                f"unknown scopes {sorted(unknown)}; use one or more of {', '.join(SCOPES)}"
            )
        namespace_set = frozenset(namespaces) or frozenset({"*"})
        bad = {n for n in namespace_set if n != "*" and not _NAMESPACE.match(n)}
        if bad:
            raise ConfigurationError(f"namespaces {sorted(bad)} must match {NAMESPACE_PATTERN}")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        digest = await asyncio.to_thread(hash_secret, secret, salt)
        key = ApiKey(key_id, scope_set, namespace_set, name, time.time())
        item = {
            "key_id": {"S": key_id},
            "hash": {"B": digest},
            "salt": {"B": salt},
            "scopes": {"SS": sorted(scope_set)},
            "namespaces": {"SS": sorted(namespace_set)},
            "name": {"S": name},
            "created_at": {"N": repr(key.created_at)},
        }
        try:
            await self.client.put_item(
                TableName=self.table,
                Item=item,  # type: ignore[arg-type]
                ConditionExpression="attribute_not_exists(key_id)",
            )
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"storing an API key in {self.table!r}", self.settings) from exc
        return key, f"rs_{key_id}_{secret}"

    async def list(self) -> list[ApiKey]:
        keys: list[ApiKey] = []
        request: dict[str, Any] = {"TableName": self.table}
        try:
            while True:
                page = await self.client.scan(**request)
                keys.extend(self._key(item) for item in page.get("Items", []))
                if "LastEvaluatedKey" not in page:
                    break
                request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"listing API keys in {self.table!r}", self.settings) from exc
        return sorted(keys, key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> bool:
        """Mark a key revoked (kept for the audit trail); False if there is no such key."""
        try:
            await self.client.update_item(
                TableName=self.table,
                Key={"key_id": {"S": key_id}},
                UpdateExpression="SET revoked_at = :now",
                ConditionExpression="attribute_exists(key_id)",
                ExpressionAttributeValues={":now": {"N": repr(time.time())}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise translate(exc, f"revoking API key {key_id!r}", self.settings) from exc
        except BotoCoreError as exc:
            raise translate(exc, f"revoking API key {key_id!r}", self.settings) from exc
        self.cache.clear()
        return True

    # --- the request path ---------------------------------------------------------------

    async def verify(self, presented: str) -> ApiKey | None:
        """The key behind a presented ``rs_<id>_<secret>``, or None if it is not valid
        (unknown, wrong secret, malformed or revoked)."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        # Cache by a digest of the whole key: a wrong secret for a real id is its own entry.
        token = hashlib.sha256(presented.encode()).hexdigest()
        hit, cached = self.cache.get(token)
        if hit:
            return cached
        key_id, secret = parsed
        item = await self._item(key_id)
        key: ApiKey | None = None
        if item is not None:
            digest = await asyncio.to_thread(hash_secret, secret, bytes(item["salt"]["B"]))
            if hmac.compare_digest(digest, bytes(item["hash"]["B"])):
                key = self._key(item)
        if key is not None and key.revoked:
            key = None
        self.cache.put(token, key)
        return key

    async def lookup(self, key_id: str) -> ApiKey | None:
        """A live key by id (SigV4 checks the signature itself), cached like `verify`."""
        token = f"id:{key_id}"
        hit, cached = self.cache.get(token)
        if hit:
            return cached
        item = await self._item(key_id)
        key = None if item is None else self._key(item)
        if key is not None and key.revoked:
            key = None
        self.cache.put(token, key)
        return key

    async def _item(self, key_id: str) -> dict[str, Any] | None:
        try:
            response = await self.client.get_item(
                TableName=self.table, Key={"key_id": {"S": key_id}}, ConsistentRead=True
            )
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"reading API key {key_id!r}", self.settings) from exc
        item = response.get("Item")
        return dict(item) if item is not None else None

    @staticmethod
    def _key(item: dict[str, Any]) -> ApiKey:
        revoked = item.get("revoked_at")
        return ApiKey(
            key_id=item["key_id"]["S"],
            scopes=frozenset(item["scopes"]["SS"]),
            namespaces=frozenset(item["namespaces"]["SS"]),
            name=item.get("name", {}).get("S", ""),
            created_at=float(item.get("created_at", {}).get("N", "0")),
            revoked_at=float(revoked["N"]) if revoked else None,
        )
