"""The one settings object, read from ``RECSTREAM_*`` environment variables.

Build it once per entry point (`Settings()`), then pass it down. Nothing else in the
code base reads the environment. The defaults point at the embedded local stack that
`recstream up` starts; setting ``RECSTREAM_AWS_ENDPOINT_URL=`` (empty) means real AWS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_EVENT_WEIGHTS", "NAMESPACE_PATTERN", "Settings"]

# Namespaces appear in Redis keys, DynamoDB partition keys and URL paths, so they are
# restricted to characters that are safe in all three.
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DEFAULT_EVENT_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"view": 1.0, "click": 1.0, "like": 2.0, "share": 2.0, "add_to_cart": 3.0, "purchase": 5.0}
)
"""Weight of each built-in event type: purchase > add_to_cart > like/share > view/click."""
# Worst case of one window entry as JSON (agents/state.py WindowEntry): three ids of 256
# control characters, each escaped to 6 bytes, plus the type, time and value;
# tests/reliability/test_limits.py measures it.
WORST_WINDOW_ENTRY_BYTES = 4_800
# DynamoDB's 400 KB item limit, less the key, attribute names and the other attributes.
DYNAMODB_ITEM_BUDGET = 400 * 1024 - 4_096
_DEFAULT_PASSWORDS = frozenset({"test", "password", "redis", "secret", "changeme", "admin"})
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[?::1\]?)$")


class Settings(BaseSettings):
    """Every endpoint, resource name, port and budget recstream uses."""

    model_config = SettingsConfigDict(env_prefix="RECSTREAM_", frozen=True, extra="ignore")

    env: Literal["local", "production"] = "local"
    namespace: str = Field("default", pattern=NAMESPACE_PATTERN)
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces the API accepts (JSON list, e.g. ["shop", "app"]); empty accepts any.
    Each namespace costs a few capped Redis keys, so public deployments should list theirs."""

    # --- AWS ---------------------------------------------------------------------
    aws_endpoint_url: str | None = "http://127.0.0.1:4566"
    """Endpoint of the AWS API emulator. Empty means real AWS; with RECSTREAM_ENV=production
    unset means real AWS too."""
    kinesis_endpoint_url: str | None = None
    """Kinesis-only override, e.g. kinesis-mock beside moto. Defaults to aws_endpoint_url."""
    aws_region: str = "us-east-1"
    stream_name: str = "recstream-events"
    stream_shards: int = Field(2, ge=1, le=500)
    table_prefix: str = "recstream"
    bucket: str = "recstream-archive"
    dlq_name: str = "recstream-dlq"

    # --- stream runtime (streams/kinesis: the faust transport, leases, checkpoints) ---
    worker_id: str | None = None
    """This worker's lease owner name; defaults to host:pid."""
    lease_duration_s: float = Field(10.0, gt=0)
    """A lease not renewed for this long may be taken by another worker."""
    poll_interval_s: float = Field(0.2, ge=0.0)
    """Pause between GetRecords calls on one shard (Kinesis allows 5 calls/s per shard)."""
    # (stream-runtime settings end here)

    # --- Redis -------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"

    # --- processes of the embedded stack (`recstream up`) -------------------------
    state_dir: Path = Path(".recstream")
    """Where `recstream up` keeps pid files, logs and redis-server's data."""
    kinesis_mock_dir: Path = Path(".recstream/tools/node_modules/kinesis-local")

    # --- API -----------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    max_batch: int = Field(500, ge=1, le=500)
    """Largest batch `POST /v1/events` accepts; 500 is also Kinesis's PutRecords limit."""
    ranking_budget_ms: float = Field(50.0, gt=0)
    store_timeout_ms: float = Field(20.0, gt=0)
    """How long ranking waits for one store before it degrades to what it has."""

    agents_metrics_port: int | None = Field(None, ge=1, le=65535)
    """When set, `recstream agents` serves Prometheus metrics (lag, checkpoints, batches)
    on this port. Off by default so several workers can share a host."""

    # --- agents and state -----------------------------------------------------------
    window_size: int = Field(50, ge=1, le=1000)
    """How many recent interactions each user's window keeps."""
    window_ttl_s: int = Field(30 * 86400, ge=60)
    dedup_ttl_s: int = Field(7 * 86400, ge=60)
    """How long an actor's applied event ids are remembered after their last event."""
    dedup_per_actor: int = Field(256, ge=16)
    """How many of each actor's latest event ids are remembered, so a replayed event
    changes nothing. Per actor rather than global keeps memory bounded by the number of
    active actors, not by the event rate; replays after a crash are seconds old."""
    popularity_cap: int = Field(10_000, ge=10)
    """How many items the popularity counter keeps (lowest scores are evicted)."""
    agent_batch_size: int = Field(500, ge=1)
    agent_batch_window_s: float = Field(0.05, gt=0)
    start_position: str = "trim_horizon"
    """Where a stream consumer with no checkpoint starts: trim_horizon, latest or unix seconds."""
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))

    @field_validator("event_weights")
    @classmethod
    def _non_negative_weights(cls, value: dict[str, float]) -> dict[str, float]:
        negative = {k: w for k, w in value.items() if w < 0}
        if negative:
            raise ValueError(f"event weights must be 0 or more; fix {negative}")
        return value

    """Weight of each event type in counters and training; unknown custom types weigh 1."""

    # --- training (training/) --------------------------------------------------------
    model_keep_versions: int = Field(5, ge=1)
    """How many published versions of each model are kept; older ones are deleted."""
    # (training settings end here)

    # --- reliability and security (serving/auth.py, ratelimit.py, middleware.py; docs/security.md)
    require_api_keys: bool | None = None
    """Whether every route but the probes needs an API key. Unset: required in production,
    open in local mode (the API logs a warning at start-up when it is open)."""
    apikey_cache_ttl_s: float = Field(30.0, ge=0.0)
    """How long a verified key is trusted without reading DynamoDB again: a revoked key
    stops working within this many seconds on every API process."""
    apikey_cache_size: int = Field(10_000, ge=1)
    apikey_sigv4_secret: str | None = Field(None, repr=False)
    """Server secret from which each key's SigV4 secret access key is derived (HMAC of the
    key id), so unchanged boto3 clients can sign Personalize-compatible calls. Unset: SigV4
    is refused. Changing it invalidates every SigV4 credential (bearer keys keep working)."""
    ops_routes_open: bool = True
    """/healthz, /readyz and /metrics need no key (load balancers and scrapers); false
    makes them need an `admin` key."""
    rate_limit_enabled: bool | None = None
    """Unset: limits apply wherever API keys are required (production), not in the open
    local mode (whose tests and demos post as fast as they can from one address)."""
    rate_limits: dict[str, float] = Field(
        default_factory=lambda: {
            "events:write": 500.0,
            "recommendations:read": 200.0,
            "admin": 20.0,
        }
    )
    """Requests per second allowed to one API key, by the scope its route needs (GCRA)."""
    rate_limit_ip: float = Field(50.0, gt=0)
    """Requests per second allowed to one client IP address (before any key is checked)."""
    rate_limit_burst_s: float = Field(2.0, gt=0)
    """Burst allowance, in seconds of the rate: a limit of 100/s with 2 s admits 200 at once."""
    rate_limit_fail: Literal["open", "closed"] = "open"
    """When Redis is down: admit requests unlimited (open) or refuse them with 503 (closed)."""
    trust_forwarded_for: bool = False
    """Take the client IP from X-Forwarded-For (only behind a proxy that sets it)."""
    max_body_bytes: int = Field(6 * 1024 * 1024, ge=1024)
    """Largest request body any route reads; bigger bodies get 413 before they are read."""
    ready_timeout_s: float = Field(2.0, gt=0)
    """How long /readyz waits for each dependency before calling it unreachable."""
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    @field_validator("apikey_sigv4_secret", "require_api_keys", "rate_limit_enabled", mode="before")
    @classmethod
    def _empty_security_means_none(cls, value: object) -> object:
        # `to_env` writes None as an empty variable; read it back as unset.
        return None if isinstance(value, str) and not value.strip() else value

    # (reliability and security settings end here)

    @field_validator(
        "aws_endpoint_url",
        "kinesis_endpoint_url",
        "worker_id",
        "agents_metrics_port",
        mode="before",
    )
    @classmethod
    def _empty_means_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _refuse_loopback_in_production(self) -> Settings:
        if self.env == "production":
            if "aws_endpoint_url" not in self.model_fields_set:
                # The local default must not leak into production: unset means real AWS.
                object.__setattr__(self, "aws_endpoint_url", None)
            for name in ("aws_endpoint_url", "kinesis_endpoint_url"):
                url = getattr(self, name)
                if url and _LOOPBACK.match(urlsplit(url).hostname or ""):
                    raise ValueError(
                        f"RECSTREAM_{name.upper()}={url} points at loopback while "
                        "RECSTREAM_ENV=production; unset it (or set it empty) to use real AWS"
                    )
        return self

    @model_validator(mode="after")
    def _production_and_limits(self) -> Settings:
        # DynamoDB refuses a whole BatchWriteItem when one item is over 400 KB, so a window
        # of valid events with long ids must fit: see WORST_WINDOW_ENTRY_BYTES.
        if self.window_size * WORST_WINDOW_ENTRY_BYTES > DYNAMODB_ITEM_BUDGET:
            raise ValueError(
                f"RECSTREAM_WINDOW_SIZE={self.window_size} can exceed DynamoDB's 400 KB item "
                f"limit with valid events (up to {WORST_WINDOW_ENTRY_BYTES} bytes each); use "
                f"at most {DYNAMODB_ITEM_BUDGET // WORST_WINDOW_ENTRY_BYTES}"
            )
        if self.env != "production":
            return self
        problems: list[str] = []
        if self.require_api_keys is False:
            problems.append("RECSTREAM_REQUIRE_API_KEYS=false (production always needs keys)")
        if urlsplit(self.redis_url).scheme != "rediss":
            problems.append("RECSTREAM_REDIS_URL must use rediss:// (TLS)")
        password = urlsplit(self.redis_url).password
        if password is not None and password.lower() in _DEFAULT_PASSWORDS:
            problems.append("RECSTREAM_REDIS_URL carries a default password; set a real one")
        if self.aws_endpoint_url is not None or self.kinesis_endpoint_url is not None:
            # recstream/aws.py signs calls to a custom endpoint with the emulator's dummy
            # credentials ("test"), which must never reach a real deployment.
            problems.append(
                "RECSTREAM_AWS_ENDPOINT_URL / RECSTREAM_KINESIS_ENDPOINT_URL are set; a custom "
                "endpoint is used with the emulator's default credentials, so leave them unset"
            )
        secret = self.apikey_sigv4_secret
        if secret is not None and (len(secret) < 32 or secret.lower() in _DEFAULT_PASSWORDS):
            problems.append(
                "RECSTREAM_APIKEY_SIGV4_SECRET must be at least 32 random characters "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if problems:
            raise ValueError("RECSTREAM_ENV=production refuses: " + "; ".join(problems))
        return self

    @property
    def rate_limiting(self) -> bool:
        if self.rate_limit_enabled is None:
            return self.api_keys_required
        return self.rate_limit_enabled

    @property
    def api_keys_required(self) -> bool:
        """Keys are required in production, and wherever RECSTREAM_REQUIRE_API_KEYS=true."""
        if self.require_api_keys is None:
            return self.env == "production"
        return self.require_api_keys

    # --- derived names ---------------------------------------------------------------
    @property
    def windows_table(self) -> str:
        return f"{self.table_prefix}-windows"

    @property
    def leases_table(self) -> str:
        return f"{self.table_prefix}-leases"

    @property
    def apikeys_table(self) -> str:
        return f"{self.table_prefix}-apikeys"

    @property
    def kinesis_endpoint(self) -> str | None:
        return self.kinesis_endpoint_url or self.aws_endpoint_url

    @property
    def local(self) -> bool:
        """True when talking to an emulator rather than real AWS."""
        return self.aws_endpoint_url is not None

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def to_env(self) -> dict[str, str]:
        """These settings as RECSTREAM_* variables, for child processes."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                text = ""
            elif isinstance(value, dict | list):
                text = json.dumps(value)
            else:
                text = str(value)
            env[f"RECSTREAM_{name.upper()}"] = text
        return env

    def weight(self, event_type: str) -> float:
        return self.event_weights.get(event_type, 1.0)
