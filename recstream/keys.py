"""The Redis key layout, in one place. docs/architecture.md lists who writes and reads each.

Every key starts with ``rs:{namespace}:`` so one Redis can serve several sites or
surfaces, and every key has a cap or a TTL so memory stays bounded:

    rs:{ns}:win:{actor}                 LIST  recent interactions, newest first   cap + TTL
    rs:{ns}:seen:{actor}                ZSET  event ids applied (idempotence)      cap + TTL
    rs:{ns}:pop                         ZSET  item -> weighted interaction count  cap
    rs:{ns}:pop:touched                 ZSET  item -> last counted (evicts LRU)   cap
    rs:{ns}:feat:{actor}                HASH  user feature vector (agents/features) TTL
    rs:{ns}:emb:{actor}                 HASH  live embedding: decayed mean of item factors  TTL
    rs:{ns}:pop:decayed                 ZSET  item -> forward-decayed weighted count  cap
    rs:{ns}:pop:cat:{category}          ZSET  the same within one category         cap
    rs:{ns}:cnt:{span}:{start}          ZSET  item -> weighted count in a time bucket   TTL
    rs:{ns}:cnt:{span}:{start}:cat:{c}  ZSET  the same within one category         TTL
    rs:{ns}:cnt:index                   ZSET  bucket key -> event time it expires  swept
    rs:{ns}:cats                        ZSET  category -> last event time          cap
    rs:{ns}:trend:clock                 HASH  t: newest event time applied (trend "now")
    rs:{ns}:trend:lock                  STR   materializer lock (one worker a tick) TTL
    rs:{ns}:trend:{window}              ZSET  item -> trend score (materialized)   cap
    rs:{ns}:trend:{window}:cat:{cat}    ZSET  the same within one category         cap
    rs:{ns}:item:{item_id}              STR   catalog item (streams.schema.Item JSON)  catalog
    rs:{ns}:user:{user_id}              STR   catalog user (streams.schema.User JSON)  catalog
    rs:{ns}:served:{recommendation_id}  STR   what serving answered (JSON)          TTL
    rs:{ns}:alias:{session_id}          STR   user id the session logged in as      TTL
    rs:{ns}:attr:{strategy}             HASH  attributed impressions, clicks, ... revenue
    rs:{ns}:attr_day:{day}:{strategy}   HASH  the same for one UTC day (YYYYMMDD)     TTL
    rs:{ns}:attr_var:{strategy}:{variant} HASH the same per experiment variant    one per variant
    rs:{ns}:attr_dirty                  HASH  counter changed since its DynamoDB copy  emptied
    rs:{ns}:attr_seen:{actor}           ZSET  event ids attributed (idempotence)   cap + TTL
    rs:{ns}:served_to:{actor}           ZSET  recommendation id -> served time     cap + TTL
    rs:{ns}:model:{name}:current        STR   serving version of a trained model  one per model
    rs:{ns}:model:{name}:{version}:...  *     that version's published data       last K versions
    rs:_rl:{subject}                    STR   rate-limit TAT (serving/ratelimit.py)  TTL

docs/architecture.md gives each key's exact format and bound; the functions below are
the only place key strings are built.

``actor`` is the user id, or ``session:{session_id}`` for anonymous visitors.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys", "keys_of"]


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str = "default"

    @property
    def prefix(self) -> str:
        return f"rs:{self.namespace}:"

    def window(self, actor: str) -> str:
        return f"{self.prefix}win:{actor}"

    def seen(self, actor: str) -> str:
        return f"{self.prefix}seen:{actor}"

    @property
    def popularity(self) -> str:
        return f"{self.prefix}pop"

    @property
    def popularity_touched(self) -> str:
        """item -> when last counted; the popularity cap evicts the least recent."""
        return f"{self.prefix}pop:touched"

    def features(self, actor: str) -> str:
        return f"{self.prefix}feat:{actor}"

    def embedding(self, actor: str) -> str:
        return f"{self.prefix}emb:{actor}"

    @property
    def popularity_decayed(self) -> str:
        return f"{self.prefix}pop:decayed"

    def popularity_category(self, category: str) -> str:
        return f"{self.prefix}pop:cat:{category}"

    def counts_bucket(self, span_s: int, start: int, category: str | None = None) -> str:
        """Weighted counts of the events whose time falls in [start, start + span_s),
        of all items or of one category's."""
        base = f"{self.prefix}cnt:{span_s}:{start}"
        return base if category is None else self.category_bucket(base, category)

    @staticmethod
    def category_bucket(bucket: str, category: str) -> str:
        """The key of one category's counts in the time bucket whose key (all items'
        counts, `counts_bucket` without a category) is ``bucket``."""
        return f"{bucket}:cat:{category}"

    @property
    def counts_index(self) -> str:
        """bucket key -> the event time after which no trend window reads it (swept then)."""
        return f"{self.prefix}cnt:index"

    @property
    def categories(self) -> str:
        """category -> newest event time: which per-category lists exist (capped)."""
        return f"{self.prefix}cats"

    @property
    def trend_clock(self) -> str:
        """HASH ``t``: the newest event time applied, the "now" of the trend windows;
        ``since``: from which event time the counts are complete (0: all of the archive;
        set to the first event's time when the hash is created, i.e. after a Redis loss)."""
        return f"{self.prefix}trend:clock"

    @property
    def trend_lock(self) -> str:
        return f"{self.prefix}trend:lock"

    @property
    def trend_rebuild(self) -> str:
        """STRING: the worker rebuilding the trends from the archive after a Redis loss."""
        return f"{self.prefix}trend:rebuild"

    def trending(self, window: str, category: str | None = None) -> str:
        """``window`` is ``1h`` or ``24h``; the agents materialize these every few seconds."""
        base = f"{self.prefix}trend:{window}"
        return base if category is None else f"{base}:cat:{category}"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}item:{item_id}"

    def user(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}"

    def served(self, recommendation_id: str) -> str:
        return f"{self.prefix}served:{recommendation_id}"

    def alias(self, session_id: str) -> str:
        return f"{self.prefix}alias:{session_id}"

    def attribution(self, strategy: str) -> str:
        return f"{self.prefix}attr:{strategy}"

    # --- attribution (agents/attribution.py); see docs/agents-attribution.md ---
    def attribution_day(self, strategy: str, day: str) -> str:
        """The strategy's counters for one UTC day, ``day`` = ``YYYYMMDD``."""
        return f"{self.prefix}attr_day:{day}:{strategy}"

    def attribution_variant(self, strategy: str, variant: str) -> str:
        return f"{self.prefix}attr_var:{strategy}:{variant}"

    @property
    def attribution_dirty(self) -> str:
        """Counter key -> changes not yet copied to DynamoDB."""
        return f"{self.prefix}attr_dirty"

    def attribution_seen(self, actor: str) -> str:
        """The actor's event ids already attributed, so a replay attributes nothing twice."""
        return f"{self.prefix}attr_seen:{actor}"

    def served_to(self, actor: str) -> str:
        """The actor's latest recommendation ids -> when served (matches un-tagged clicks)."""
        return f"{self.prefix}served_to:{actor}"

    def model_pointer(self, name: str) -> str:
        return f"{self.prefix}model:{name}:current"

    def model(self, name: str, version: str, suffix: str) -> str:
        return f"{self.prefix}model:{name}:{version}:{suffix}"

    @staticmethod
    def rate_limit(subject: str) -> str:
        """GCRA state of one client (``ip:…`` or ``key:{id}:{scope}``), across namespaces;
        ``_`` cannot start a namespace, so this never collides with one."""
        return f"rs:_rl:{subject}"


_KEYS: dict[str, Keys] = {}


def keys_of(namespace: str) -> Keys:
    """The (immutable) `Keys` of a namespace, built once: the agents' hot path asks for
    them per event."""
    found = _KEYS.get(namespace)
    if found is None:
        if len(_KEYS) > 10_000:
            _KEYS.clear()
        found = _KEYS[namespace] = Keys(namespace)
    return found
