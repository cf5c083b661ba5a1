"""Rate limits per API key and per client IP: GCRA in Redis, atomic in one Lua script.

GCRA (the generic cell rate algorithm) keeps one number per subject, the theoretical
arrival time (TAT) of its next request. A limit of ``rate`` per second with a burst of
``burst`` requests admits a request at time ``now`` when ``TAT - now <= (burst - 1) / rate``,
then moves TAT on by ``1 / rate``. One key per subject, one round trip, no background
refill, and the clock is Redis's own (``TIME``), so API processes with skewed clocks
agree.

Answers carry ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset``
(seconds until the bucket is full again, per the IETF draft); a refusal is a ``429`` with
``Retry-After``. When Redis cannot be reached, ``Settings.rate_limit_fail`` decides:
``open`` admits the request unlimited (and counts it in
``recstream_ratelimit_unavailable_total``), ``closed`` answers ``503``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Final, Literal

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recstream.keys import Keys
from recstream.settings import Settings
from serving.middleware import send_error

__all__ = ["Decision", "RateLimitMiddleware", "RateLimiter"]

log = logging.getLogger(__name__)

LIMITED = Counter(
    "recstream_ratelimit_limited_total", "Requests refused with 429, by subject kind.", ["by"]
)
UNAVAILABLE = Counter(
    "recstream_ratelimit_unavailable_total",
    "Requests whose limit could not be checked because Redis was down, by outcome.",
    ["outcome"],
)

# KEYS[1]: the subject's TAT key. ARGV: interval (µs per request), tolerance (µs of burst).
# Returns {allowed, remaining, retry_after_us, reset_us}.
GCRA_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance - interval
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl_ms)
local remaining = math.floor((now - (new_tat - tolerance - interval)) / interval)
return {1, remaining, 0, new_tat - now}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float
    reset_s: float

    def headers(self) -> dict[str, str]:
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


class RateLimiter:
    """GCRA limits in Redis; `check` is one EVALSHA (the script is loaded on first use)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._script = redis.register_script(GCRA_LUA)

    async def check(self, subject: str, rate: float) -> Decision:
        burst = max(1, math.ceil(rate * self.settings.rate_limit_burst_s))
        interval_us = max(1, round(1_000_000 / rate))
        tolerance_us = interval_us * (burst - 1)
        allowed, remaining, retry_us, reset_us = await self._script(
            keys=[Keys.rate_limit(subject)], args=[interval_us, tolerance_us]
        )
        return Decision(
            allowed=bool(allowed),
            limit=burst,
            remaining=int(remaining),
            retry_after_s=int(retry_us) / 1e6,
            reset_s=int(reset_us) / 1e6,
        )


def client_ip(scope: Scope, settings: Settings) -> str:
    if settings.trust_forwarded_for:
        forwarded = Headers(scope=scope).get("x-forwarded-for", "")
        if forwarded:
            # The proxy appends the address it saw: the right-most entry is the one we
            # can trust (left ones are whatever the client wrote).
            return forwarded.split(",")[-1].strip()
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class RateLimitMiddleware:
    """``by="ip"``: every request, limited per client address. ``by="key"``: requests
    carrying an API key (set by `AuthMiddleware`), limited by the scope of the route."""

    def __init__(self, app: ASGIApp, settings: Settings, by: Literal["ip", "key"]) -> None:
        self.app = app
        self.settings = settings
        self.by = by
        self._limiter: RateLimiter | None = None

    def _limit(self, scope: Scope) -> tuple[str, float] | None:
        if self.by == "ip":
            return f"ip:{client_ip(scope, self.settings)}", self.settings.rate_limit_ip
        key = scope.get("state", {}).get("api_key")
        if key is None:
            return None
        from serving.auth import rule_for

        rule, _ = rule_for(scope["method"], scope["path"])
        need = "admin" if rule.need in ("ops", "open") else rule.need
        rate = self.settings.rate_limits.get(need)
        if rate is None:
            return None
        return f"key:{key.key_id}:{need}", rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.settings.rate_limiting:
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        if limit is None:
            await self.app(scope, receive, send)
            return
        if self._limiter is None:
            self._limiter = RateLimiter(scope["app"].state.redis, self.settings)
        subject, rate = limit
        try:
            decision = await self._limiter.check(subject, rate)
        except (RedisError, OSError) as exc:
            if self.settings.rate_limit_fail == "closed":
                UNAVAILABLE.labels(outcome="refused").inc()
                log.error("rate limit unavailable, refusing (fail-closed): %s", exc)
                await send_error(
                    send,
                    503,
                    "rate_limit_unavailable",
                    "the rate limiter is unavailable; retry shortly",
                    {"Retry-After": "1"},
                )
                return
            UNAVAILABLE.labels(outcome="admitted").inc()
            log.warning("rate limit unavailable, admitting (fail-open): %s", exc)
            await self.app(scope, receive, send)
            return
        headers = decision.headers()
        if not decision.allowed:
            LIMITED.labels(by=self.by).inc()
            what = "this API key" if self.by == "key" else "this client address"
            await send_error(
                send,
                429,
                "rate_limited",
                f"too many requests from {what} (limit {rate:g}/s, burst {decision.limit}); "
                f"retry after {headers['Retry-After']} s",
                headers,
            )
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                mutable = MutableHeaders(scope=message)
                # The innermost limit (per key) is the one that binds; keep it.
                for name, value in headers.items():
                    if name.lower() not in mutable or self.by == "key":
                        mutable[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
