"""The user feature vector: counts, session, decayed affinities and a live embedding.

Per actor, in Redis (docs/architecture.md, "The live-state layout"):

* ``rs:{ns}:feat:{actor}`` HASH: ``n`` events applied, ``n:{event_type}`` per type (at
  most ``feature_cap`` types, the rest under ``n:_other``), ``first_ts``/``last_ts``
  (event time), the session (``sess``, ``sess_ts``, ``sess_n``), and decayed affinities
  ``a:{attr}:{value}`` = ``"{score}@{ts}"``: the score as of event time ``ts``, which a
  reader decays to ``now`` by ``2^(-(now - ts) / half_life(attr))``. ``k:{attr}``
  counts an attribute's values so the cap (``feature_cap``, smallest ``|score|``
  evicted) costs nothing until it is reached.
* ``rs:{ns}:emb:{actor}`` HASH: the decayed mean of the published ALS factors of the
  items the actor touched with a positive weight (``v`` version, ``w`` weight, ``ts``,
  ``x`` float32 little-endian). A newly published version rebuilds it from the window.

What moves an affinity: an event adds its type's weight (`Settings.event_weights`,
negative for ``dislike``/``hide``) to its item's categories, brand and configured
property attributes, and 1 to ``a:type:{event_type}`` (a decayed rate of that type: the
type *is* the feedback, so its weight would say nothing more). An impressed item that was
not the one acted on adds ``impression_weight`` (a small negative) to its own categories
and brand: shown, not taken.

Updates run inside the one script of the hot store (`agents.state`), after each event's
``seen`` check, so each event changes a feature vector exactly once. Updating a decayed
score is order-independent: an event older than the stored ``ts`` is decayed into it
instead of decaying the score forward.

Durable copy: DynamoDB ``{prefix}-features`` (pk ``{ns}#{actor}``), written after Redis
for every actor of a batch, merged back into Redis when Redis lost the hash (as windows).
Its store, `recstream.features.DynamoFeatures`, lives in recstream/ because serving reads
it too (it puts a lost vector back beside a restored window).
At login an anonymous session's vector moves into its user's (`SessionFeatures`, called
by the identity stage), idempotently, in Redis and DynamoDB.
`read_user_state` reads a user's window, features and embedding in one round trip, decoded
(tests and benchmarks; serving reads the same keys with its own script,
serving/pipeline/state.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from agents.catalog import ALS_MODEL, BatchContext
from agents.identity import Login
from agents.state import ApplyResult, redis_failure
from recstream.errors import StoreUnavailable
from recstream.features import DynamoFeatures, FeatureCopy, parse_score
from recstream.identity import SESSION_PREFIX
from recstream.keys import Keys, keys_of
from recstream.redisio import commands, pairs
from recstream.settings import Settings
from recstream.windows import Actor, WindowEntry
from streams.schema import Event

__all__ = [
    "FeatureStage",
    "FeaturesPart",
    "Session",
    "SessionFeatures",
    "UserState",
    "merge_embeddings",
    "merge_features",
    "persist_features",
    "read_user_state",
    "recover_lost_features",
]

MAX_VALUE_CHARS = 128
"""Longest attribute value kept in a field name (longer ones are cut)."""
RESERVED_ATTRIBUTES = frozenset({"type", "cat", "brand", "category"})

# The features part. K: feat, and when the embedding applies: emb, factors, window.
# ev.f: t the type's counter ("n:{type}"), s session id (or absent), actor, a [attr,
# "a:{attr}:{value}", delta, attr, ...] (flat), e {v, w}
# (embedding: version, weight) or absent. H: fcap, gap, fttl, ehl, wsize, hl (attr ->
# half-life; hld for any other attribute).
# Flag: the feature hash had to be created (new actor, or a hash Redis lost).
#
# Within a chunk an actor's fields are kept in Lua, parsed (F[key]: counters and times as
# numbers, affinities as score and time), so the actor's next event reads only fields it
# has not seen yet (one HMGET) and every changed field is formatted and written once, at
# the end of the chunk (one HSET per hash). The embedding is kept the same way (E[key]).
_FEATURES_PRELUDE = """
local F = {}
local E = {}
local FACTORS = {}
local WEIGHTS = nil
local F_FIXED = {'n', 'k:n', 'n:_other', 'first_ts', 'last_ts', 'sess', 'sess_ts', 'sess_n'}
local F_TIMES = {first_ts = true, last_ts = true, sess_ts = true}
-- c.v[name]: the field's value (a number, or sess's string; false: absent); c.s/c.t[name]:
-- an affinity's score and time; c.d[name]: changed since read; c.m[attr]: the names of
-- the attribute's values in the hash, once an eviction needed them (kept up to date
-- for the rest of the chunk, so an actor at the cap reads its hash once per chunk).
-- "{score}@{ts}" as two numbers (a plain find: a pattern costs more, once per affinity).
local function f_score(raw)
  local at = string.find(raw, '@', 1, true)
  if not at then return nil, nil end
  return tonumber(string.sub(raw, 1, at - 1)), tonumber(string.sub(raw, at + 1))
end
local function f_parse(c, name, raw)
  if not raw then
    c.v[name] = false
  elseif string.sub(name, 1, 2) == 'a:' then
    c.v[name] = true
    c.s[name], c.t[name] = f_score(raw)
  elseif name == 'sess' then
    c.v[name] = raw
  else
    c.v[name] = tonumber(raw)
  end
end
-- (names, F_MISSING: tables of the chunk, reused by every event with explicit counts:
-- a table made per event costs its allocation and its growth)
local F_NAMES = {}
local F_MISSING = {}
local function f_load(c, key, names, count)
  local missing, nm = F_MISSING, 0
  for i = 1, count do
    local name = names[i]
    if c.v[name] == nil then
      if c.empty then
        c.v[name] = false
      else
        nm = nm + 1
        missing[nm] = name
      end
    end
  end
  if nm > 0 then
    local got = redis.call('HMGET', key, unpack(missing, 1, nm))
    for i = 1, nm do f_parse(c, missing[i], got[i]) end
  end
end
local function f_num(c, name)
  local value = c.v[name]
  if value then return value end
  return 0
end
local function f_set(c, name, value)
  c.v[name] = value
  c.d[name] = true
end
local function f_aff(c, name, s, t)
  c.v[name] = true
  c.s[name] = s
  c.t[name] = t
  c.d[name] = true
end
local function f_flush(key, c)
  local args = {}
  local n = 0
  for name in pairs(c.d) do
    local value = c.v[name]
    if value then
      if value == true then
        value = fmt(c.s[name]) .. '@' .. fmt(c.t[name])
      elseif F_TIMES[name] then
        value = fmt(value)
      elseif name ~= 'sess' then
        value = string.format('%d', value)
      end
      args[n + 1] = name
      args[n + 2] = value
      n = n + 2
    end
  end
  if n > 0 then redis.call('HSET', key, unpack(args)) end
  c.d = {}
end
-- The names of ``attr``'s values in the hash, as of now: the cache knows every field of a
-- hash the chunk created (c.empty); otherwise HSCAN MATCH reads the attribute's fields
-- (Redis filters them: HGETALL's other fields would each become a Lua string), and those
-- the cache does not hold yet are parsed into it (the cache's own are as new or newer).
local function f_members(key, c, attr)
  local m = c.m[attr]
  if m then return m end
  m = {}
  local prefix = 'a:' .. attr .. ':'
  local n = #prefix
  if not c.empty then
    local pattern = string.gsub(prefix, '([%*%?%[%]\\])', '\\%1') .. '*'
    local cursor = '0'
    repeat
      local page = redis.call('HSCAN', key, cursor, 'MATCH', pattern, 'COUNT', 1000)
      cursor = page[1]
      local all = page[2]
      for j = 1, #all, 2 do
        local name = all[j]
        if c.v[name] == nil then f_parse(c, name, all[j + 1]) end
      end
    until cursor == '0'
  end
  for name, value in pairs(c.v) do
    if value == true and string.sub(name, 1, n) == prefix then m[name] = true end
  end
  c.m[attr] = m
  return m
end
-- A decayed running mean (x, W, at) in ``m``, with the touch y (weight w, time t) added:
-- the newest time is the reference, older touches decay in.
local function e_add(m, y, w, t, hl, n)
  local x = m.x
  if not x then
    x = {}
    for i = 1, n do x[i] = y[i] end
    m.x, m.W, m.at = x, w, t
    return
  end
  local g, f0 = w, 1
  if t >= m.at then
    f0 = 2 ^ (-(t - m.at) / hl)
    m.at = t
  else
    g = w * 2 ^ (-(m.at - t) / hl)
  end
  local W = m.W
  local W2 = W * f0 + g
  -- (the two factors once, not per element: the loop is most of an update's cost)
  local a, b = W * f0 / W2, g / W2
  for i = 1, n do x[i] = x[i] * a + y[i] * b end
  m.W = W2
end
-- An item's factors as numbers, unpacked once per chunk (only read, never changed).
local FACTOR_T = {}
local LAYOUTS = {}
local function factor_t(raw, layout)
  local y = FACTOR_T[raw]
  if not y then
    y = {struct.unpack(layout, raw)}
    FACTOR_T[raw] = y
  end
  return y
end
local function factor(key, item)
  local known = FACTORS[key]
  if not known then
    known = {}
    FACTORS[key] = known
  end
  local raw = known[item]
  if raw == nil then
    raw = redis.call('HGET', key, item) or false
    known[item] = raw
  end
  return raw
end
"""

_FEATURES_LUA = """
local f = ev['f']
local key = K[1]
local ts = ev['ts']
local cap = H['fcap']
local created = 0
local c = F[key]
if not c then
  c = {v = {}, s = {}, t = {}, d = {}, m = {}, empty = false}
  if redis.call('EXISTS', key) == 0 then
    created = 1
    c.empty = true
  end
  F[key] = c
end
local V = c.v
local tfield = f['t']
local aff = f['a']
local names = F_NAMES
names[1] = tfield
local count = 1
if not c.fixed then
  for i = 1, #F_FIXED do names[count + i] = F_FIXED[i] end
  count = count + #F_FIXED
  c.fixed = true
end
for i = 1, #aff, 3 do
  local fld = aff[i + 1]
  if V[fld] == nil then
    names[count + 1] = fld
    names[count + 2] = 'k:' .. aff[i]
    count = count + 2
  end
end
f_load(c, key, names, count)
f_set(c, 'n', f_num(c, 'n') + 1)
if not V[tfield] then
  if f_num(c, 'k:n') >= cap then
    tfield = 'n:_other'
  else
    f_set(c, 'k:n', f_num(c, 'k:n') + 1)
  end
end
f_set(c, tfield, f_num(c, tfield) + 1)
local first = V['first_ts']
if (not first) or ts < first then f_set(c, 'first_ts', ts) end
local last = V['last_ts']
local sess = f['s']
if sess then
  local cur = V['sess']
  local cur_ts = V['sess_ts']
  if cur == sess then
    f_set(c, 'sess_n', f_num(c, 'sess_n') + 1)
    if ts < cur_ts then f_set(c, 'sess_ts', ts) end
  elseif (not cur_ts) or ts >= cur_ts then
    f_set(c, 'sess', sess)
    f_set(c, 'sess_ts', ts)
    f_set(c, 'sess_n', 1)
  end
  -- (a late event of an older session leaves the current one alone)
elseif (not last) or ts - last > H['gap'] then
  -- No session id: inactivity longer than the gap starts a session, named as training
  -- names derived sessions ("{actor}#{first second}").
  f_set(c, 'sess', f['actor'] .. '#' .. string.format('%d', math.floor(ts)))
  f_set(c, 'sess_ts', ts)
  f_set(c, 'sess_n', 1)
else
  f_set(c, 'sess_n', f_num(c, 'sess_n') + 1)
end
if (not last) or ts > last then f_set(c, 'last_ts', ts) end
for i = 1, #aff, 3 do
  local attr, fld, delta = aff[i], aff[i + 1], aff[i + 2]
  local hl = H['hl'][attr] or H['hld']
  if V[fld] then
    local s, t0 = c.s[fld], c.t[fld]
    if ts >= t0 then
      f_aff(c, fld, s * 2 ^ (-(ts - t0) / hl) + delta, ts)
    else
      f_aff(c, fld, s + delta * 2 ^ (-(t0 - ts) / hl), t0)
    end
  else
    f_aff(c, fld, delta, ts)
    local members = c.m[attr]
    if members then members[fld] = true end
    local kname = 'k:' .. attr
    local k = f_num(c, kname) + 1
    f_set(c, kname, k)
    if k > cap then
      -- Over the cap: evict the value with the smallest |score| as of now (ties: the
      -- smallest name), which may be the new one when it is the weakest. The scores
      -- come from the cache (the same doubles the hash holds as %.17g).
      members = f_members(key, c, attr)
      local worst, worst_score = nil, nil
      local S, T = c.s, c.t
      for name in pairs(members) do
        local v = math.abs(S[name] * 2 ^ (-math.max(0, ts - T[name]) / hl))
        if (not worst) or v < worst_score or (v == worst_score and name < worst) then
          worst, worst_score = name, v
        end
      end
      redis.call('HDEL', key, worst)
      V[worst] = false
      members[worst] = nil
      f_set(c, kname, k - 1)
    end
  end
end
touch(key, H['fttl'])
local e = f['e']
if e then
  local raw = factor(K[3], ev['item'])
  if raw and #raw > 0 and #raw % 4 == 0 then
    local n = #raw / 4
    local layout = LAYOUTS[n]
    if not layout then
      layout = '<' .. string.rep('f', n)
      LAYOUTS[n] = layout
    end
    local st = E[K[2]]
    if not st then
      local cur = redis.call('HMGET', K[2], 'v', 'w', 'ts', 'x')
      st = {v = cur[1], w = tonumber(cur[2]), at = tonumber(cur[3]), raw = cur[4]}
      E[K[2]] = st
    end
    local m = {}
    local hl = H['ehl']
    if st.v == e['v'] and st.raw and #st.raw == #raw then
      m.x, m.W, m.at = {struct.unpack(layout, st.raw)}, st.w, st.at
      e_add(m, factor_t(raw, layout), e['w'], ts, hl, n)
    else
      -- A new model version (or the first): rebuild from the window, oldest first, in the
      -- new factor space (the old vector is not comparable).
      if not WEIGHTS then WEIGHTS = cjson.decode(ARGV[2]) end
      if HOOK.window then HOOK.window(K[4]) end
      local entries = redis.call('LRANGE', K[4], '0', istr(H['wsize'] - 1))
      for i = #entries, 1, -1 do
        local doc = cjson.decode(entries[i])
        local w = WEIGHTS[doc['t']] or 1
        if w > 0 then
          local y = factor(K[3], doc['i'])
          if y and #y == #raw then e_add(m, factor_t(y, layout), w, doc['ts'], hl, n) end
        end
      end
    end
    if m.x then
      -- stored as float32 after every event, as a chunk of one would: the same events
      -- give the same bytes however they are batched
      st.v, st.w, st.at, st.dirty = e['v'], m.W, m.at, true
      st.raw = struct.pack(layout, unpack(m.x, 1, n))
      touch(K[2], H['fttl'])
    end
  end
end
return created
"""

_FEATURES_FINISH = """
for key, c in pairs(F) do f_flush(key, c) end
for key, st in pairs(E) do
  if st.dirty then
    redis.call('HSET', key, 'v', st.v, 'w', fmt(st.w), 'ts', fmt(st.at), 'x', st.raw)
  end
end
"""


def _value(text: object) -> str:
    return str(text)[:MAX_VALUE_CHARS]


class FeaturesPart:
    """The feature-vector share of the hot store's script (see the module docstring)."""

    name = "f"
    lua = _FEATURES_LUA
    prelude = _FEATURES_PRELUDE
    finish = _FEATURES_FINISH

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Event properties that are affinity attributes: the configured names that are
        # not built in; a ':' would make the field name ambiguous, so such names are left.
        self.property_attributes = tuple(
            a
            for a in settings.affinity_half_life_s
            if a not in RESERVED_ATTRIBUTES and ":" not in a
        )
        self.header = {
            "fcap": settings.feature_cap,
            "gap": settings.session_gap_s,
            "fttl": settings.window_ttl_s,
            "ehl": settings.embedding_half_life_s,
            "wsize": settings.window_size,
            # half-lives once per chunk, not once per affinity of every event
            "hl": {
                attr: settings.half_life(attr)
                for attr in ("type", "cat", "brand", *self.property_attributes)
            },
            "hld": settings.affinity_default_half_life_s,
        }
        self._weights = dict(settings.event_weights)
        self._keys: dict[tuple[str, str, str | None], tuple[str, ...]] = {}
        # the hash fields of the type's, categories' and brands' affinities, by value
        self._type_fields: dict[str, str] = {}
        self._cat_fields: dict[str, str] = {}
        self._brand_fields: dict[str, str] = {}

    def deltas(self, event: Event, context: BatchContext) -> dict[tuple[str, str], float]:
        """What ``event`` adds to each affinity ``(attr, value)``, summed."""
        out: dict[tuple[str, str], float] = {("type", event.event_type): 1.0}
        if event.item_id is None:
            return out
        weight = self._weights.get(event.event_type, 1.0)
        facts = context.facts(event)
        for category in facts.categories:
            key = ("cat", _value(category))
            out[key] = out.get(key, 0.0) + weight
        if facts.brand is not None:
            key = ("brand", _value(facts.brand))
            out[key] = out.get(key, 0.0) + weight
        if self.property_attributes and event.properties:
            for attr in self.property_attributes:
                if attr in event.properties:
                    key = (attr, _value(event.properties[attr]))
                    out[key] = out.get(key, 0.0) + weight
        shown_weight = self.settings.impression_weight
        if event.impression and shown_weight != 0 and weight > 0:
            for other in dict.fromkeys(event.impression):
                if other == event.item_id:
                    continue
                shown = context.facts(event, other)
                for category in shown.categories:
                    key = ("cat", _value(category))
                    out[key] = out.get(key, 0.0) + shown_weight
                if shown.brand is not None:
                    key = ("brand", _value(shown.brand))
                    out[key] = out.get(key, 0.0) + shown_weight
        return out

    def _keys_of(self, namespace: str, actor: str, version: str | None) -> tuple[str, ...]:
        """An actor's keys (with an ALS version: its embedding's too), built once per
        actor and version while they stay in this small cache."""
        found = self._keys.get((namespace, actor, version))
        if found is None:
            if len(self._keys) > 10_000:
                self._keys.clear()
            keys = keys_of(namespace)
            found = (keys.features(actor),)
            if version is not None:
                found += (
                    keys.embedding(actor),
                    keys.model(ALS_MODEL, version, "factors"),
                    keys.window(actor),
                )
            self._keys[(namespace, actor, version)] = found
        return found

    @staticmethod
    def _field(fields: dict[str, str], attr: str, value: str) -> str:
        """The hash field ``a:{attr}:{value}`` of an affinity, kept in ``fields``."""
        if len(fields) > 10_000:
            fields.clear()
        found = fields[value] = f"a:{attr}:{_value(value)}"
        return found

    def affinities(self, event: Event, context: BatchContext) -> list[Any]:
        """`deltas` as one flat list (attr, field, delta, attr, ...): a Lua table per
        affinity costs more to decode than the values in it, and the field names are
        made here, not by string concatenation in Lua for every event.

        The common event (its item's categories and brand, no impressions counted, no
        property attribute) is listed directly, the names looked up (a tuple key, a
        dict of sums and the names formatted for each affinity of every event were a
        fifth of the chunk's encoding: session 11 in docs/agents.md); the others go
        through `deltas`, which defines both."""
        type_name = self._type_fields.get(event.event_type) or self._field(
            self._type_fields, "type", event.event_type
        )
        if event.item_id is None:
            return ["type", type_name, 1.0]
        properties = event.properties
        if (event.impression and self.settings.impression_weight != 0) or (
            self.property_attributes
            and properties
            and any(attr in properties for attr in self.property_attributes)
        ):
            return self._flat(self.deltas(event, context))
        weight = 0.0 + self._weights.get(event.event_type, 1.0)  # (`deltas`' first sum)
        facts = context.facts(event)
        flat: list[Any] = ["type", type_name, 1.0]
        categories = facts.categories
        cats = self._cat_fields
        if len(categories) == 1:
            category = categories[0]
            flat += ("cat", cats.get(category) or self._field(cats, "cat", category), weight)
        elif categories:
            fields = [cats.get(c) or self._field(cats, "cat", c) for c in categories]
            if len(set(fields)) < len(fields):
                return self._flat(self.deltas(event, context))  # a category counted twice
            for field in fields:
                flat += ("cat", field, weight)
        brand = facts.brand
        if brand is not None:
            brands = self._brand_fields
            flat += ("brand", brands.get(brand) or self._field(brands, "brand", brand), weight)
        return flat

    @staticmethod
    def _flat(deltas: dict[tuple[str, str], float]) -> list[Any]:
        return [
            x for (attr, value), delta in deltas.items() for x in (attr, f"a:{attr}:{value}", delta)
        ]

    def encode(self, event: Event, context: BatchContext) -> tuple[tuple[str, ...], Any]:
        doc: dict[str, Any] = {
            "t": f"n:{event.event_type}",
            "actor": event.actor,
            "a": self.affinities(event, context),
        }
        if event.session_id is not None:
            doc["s"] = event.session_id
        version = context.als_version.get(event.namespace)
        if version is not None and event.item_id is not None:
            weight = self._weights.get(event.event_type, 1.0)
            if weight > 0:
                doc["e"] = {"v": version, "w": weight}
                return self._keys_of(event.namespace, event.actor, version), doc
        return self._keys_of(event.namespace, event.actor, None), doc


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    started: float
    events: int


@dataclass(frozen=True)
class UserState:
    """Everything the agents keep about one actor, as of ``now``."""

    window: list[WindowEntry]
    events: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    """Events per type (``_other`` beyond the cap)."""
    first_ts: float | None = None
    last_ts: float | None = None
    session: Session | None = None
    affinities: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """attr -> value -> score decayed to ``now`` (negative: the actor turns it down)."""
    embedding: npt.NDArray[np.float32] | None = None
    embedding_version: str | None = None
    embedding_weight: float = 0.0

    def top(self, attr: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` strongest values of ``attr``, best first."""
        values = self.affinities.get(attr, {})
        return sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def decayed(raw: str, half_life: float, now: float) -> float:
    score, ts = parse_score(raw)
    return float(score * 2.0 ** (-max(0.0, now - ts) / half_life))


def state_from(
    window: Sequence[bytes],
    feat: Mapping[bytes, bytes],
    emb: Mapping[bytes, bytes],
    settings: Settings,
    now: float,
) -> UserState:
    fields = {_text(k): _text(v) for k, v in feat.items() if k != b"x"}
    counts: dict[str, int] = {}
    affinities: dict[str, dict[str, float]] = {}
    for name, value in fields.items():
        if name.startswith("n:"):
            counts[name[2:]] = int(value)
        elif name.startswith("a:"):
            _, attr, item = name.split(":", 2)
            affinities.setdefault(attr, {})[item] = decayed(value, settings.half_life(attr), now)
    session = None
    if "sess" in fields:
        session = Session(fields["sess"], float(fields["sess_ts"]), int(fields.get("sess_n", 0)))
    vector = None
    version = None
    weight = 0.0
    if b"x" in emb and b"v" in emb:
        vector = np.frombuffer(emb[b"x"], dtype="<f4").astype(np.float32)
        version = _text(emb[b"v"])
        weight = float(emb[b"w"]) * 2.0 ** (
            -max(0.0, now - float(emb[b"ts"])) / settings.embedding_half_life_s
        )
    return UserState(
        window=[WindowEntry.loads(raw) for raw in window],
        events=int(fields.get("n", 0)),
        counts=counts,
        first_ts=float(fields["first_ts"]) if "first_ts" in fields else None,
        last_ts=float(fields["last_ts"]) if "last_ts" in fields else None,
        session=session,
        affinities=affinities,
        embedding=vector,
        embedding_version=version,
        embedding_weight=weight,
    )


async def read_user_state(
    redis: aioredis.Redis,
    settings: Settings,
    namespace: str,
    actor: str,
    now: float | None = None,
) -> UserState:
    """One actor's window, feature vector and live embedding in ONE Redis round trip,
    with affinities decayed to ``now`` (default: the wall clock)."""
    keys = Keys(namespace)
    pipe = redis.pipeline(transaction=False)
    pipe.lrange(keys.window(actor), 0, settings.window_size - 1)
    pipe.hgetall(keys.features(actor))
    pipe.hgetall(keys.embedding(actor))
    try:
        window, feat, emb = await pipe.execute()
    except RedisError as exc:
        raise redis_failure(f"reading the state of {actor!r}", exc) from exc
    return state_from(window, feat, emb, settings, time.time() if now is None else now)


# --- merging a durable copy back (Redis lost the hash) ---------------------------------


def _combine(a: str, b: str, half_life: float) -> str:
    sa, ta = parse_score(a)
    sb, tb = parse_score(b)
    at = max(ta, tb)
    score = sa * 2.0 ** (-(at - ta) / half_life) + sb * 2.0 ** (-(at - tb) / half_life)
    return f"{score!r}@{at!r}"


def merge_features(
    hot: Mapping[str, str], durable: Mapping[str, str], settings: Settings
) -> dict[str, str]:
    """The union of a hash Redis rebuilt from new events (``hot``) and its durable copy
    from before the loss: counts add, times widen, the later session wins, affinities
    combine with their decay and are capped again."""
    out: dict[str, str] = {}
    for name in set(hot) | set(durable):
        h, d = hot.get(name), durable.get(name)
        if h is None or d is None:
            out[name] = h if h is not None else d  # type: ignore[assignment]
        elif name == "n" or name.startswith("n:"):
            out[name] = str(int(h) + int(d))
        elif name == "first_ts":
            out[name] = repr(min(float(h), float(d)))
        elif name == "last_ts":
            out[name] = repr(max(float(h), float(d)))
        elif name.startswith("a:"):
            out[name] = _combine(h, d, settings.half_life(name.split(":", 2)[1]))
        else:
            out[name] = h
    if "sess" in hot and "sess" in durable:
        newer = hot if float(hot["sess_ts"]) >= float(durable["sess_ts"]) else durable
        for name in ("sess", "sess_ts", "sess_n"):
            out[name] = newer[name]
        if hot["sess"] == durable["sess"]:
            out["sess_n"] = str(int(hot["sess_n"]) + int(durable["sess_n"]))
            out["sess_ts"] = repr(min(float(hot["sess_ts"]), float(durable["sess_ts"])))
    # caps again, and the counters of what is kept
    by_attr: dict[str, list[str]] = {}
    for name in out:
        if name.startswith("a:"):
            by_attr.setdefault(name.split(":", 2)[1], []).append(name)
    for name in [n for n in out if n.startswith("k:")]:
        del out[name]
    for attr, names in by_attr.items():
        if len(names) > settings.feature_cap:
            newest = max(parse_score(out[n])[1] for n in names)
            names.sort(key=lambda n: (-abs(decayed(out[n], settings.half_life(attr), newest)), n))
            for name in names[settings.feature_cap :]:
                del out[name]
            names = names[: settings.feature_cap]
        out[f"k:{attr}"] = str(len(names))
    types = [n for n in out if n.startswith("n:") and n != "n:_other"]
    out["k:n"] = str(len(types))
    return out


def merge_embeddings(
    hot: Mapping[str, bytes], durable: Mapping[str, bytes], half_life: float
) -> dict[str, bytes]:
    """Two embeddings of one actor: weighted by their decayed weights when they come from
    the same model version, else the hot (newer) one."""
    if not durable:
        return dict(hot)
    if not hot or hot.get("v") != durable.get("v"):
        return dict(hot or durable)
    wa, ta = float(hot["w"]), float(hot["ts"])
    wb, tb = float(durable["w"]), float(durable["ts"])
    at = max(ta, tb)
    ga, gb = wa * 2.0 ** (-(at - ta) / half_life), wb * 2.0 ** (-(at - tb) / half_life)
    xa = np.frombuffer(hot["x"], "<f4").astype(np.float64)
    xb = np.frombuffer(durable["x"], "<f4").astype(np.float64)
    x = (xa * ga + xb * gb) / (ga + gb)
    return {
        "v": hot["v"],
        "w": repr(ga + gb).encode(),
        "ts": repr(at).encode(),
        "x": x.astype("<f4").tobytes(),
    }


async def _hashes(
    redis: aioredis.Redis, actors: Sequence[Actor]
) -> list[tuple[dict[str, str], dict[str, bytes]]]:
    batch: list[tuple[str, str]] = []
    for namespace, actor in actors:
        keys = keys_of(namespace)
        batch += [("HGETALL", keys.features(actor)), ("HGETALL", keys.embedding(actor))]
    try:
        rows = await commands(redis, batch)
    except RedisError as exc:
        raise redis_failure(f"reading {len(actors)} feature vectors", exc) from exc
    # The agents' clients reply bytes: decoded by the C methods, not a Python call per
    # field; a client that decodes its replies gets the converters that take both.
    text, raw = (
        (_text, _bytes)
        if redis.connection_pool.get_encoder().decode_responses  # type: ignore[no-untyped-call]
        else (bytes.decode, bytes)
    )
    return [
        (
            {text(k): text(v) for k, v in pairs(rows[i])},
            {text(k): raw(v) for k, v in pairs(rows[i + 1])},
        )
        for i in range(0, len(rows), 2)
    ]


async def persist_features(
    redis: aioredis.Redis, durable: DynamoFeatures, actors: Iterable[Actor]
) -> int:
    """Copy the current feature vectors of ``actors`` to DynamoDB; returns how many."""
    actors = list(actors)
    if not actors:
        return 0
    rows = await _hashes(redis, actors)
    await durable.put({a: FeatureCopy(f, e) for a, (f, e) in zip(actors, rows, strict=True) if f})
    return len(actors)


async def recover_lost_features(
    redis: aioredis.Redis, durable: DynamoFeatures, fresh: Iterable[Actor], settings: Settings
) -> int:
    """Merge the durable copy into hashes the hot store had to create, so a feature vector
    Redis lost continues from where it was; returns how many were merged.

    An anonymous session that has logged in is left alone: its durable copy was merged
    into its user's at the login (`SessionFeatures`), so bringing it back would count it
    twice once the session's new events move to the user too."""
    fresh = list(fresh)
    sessions = [(ns, actor) for ns, actor in fresh if actor.startswith(SESSION_PREFIX)]
    if sessions:
        try:
            aliases = await redis.mget(
                [keys_of(ns).alias(actor[len(SESSION_PREFIX) :]) for ns, actor in sessions]
            )
        except RedisError as exc:
            raise redis_failure("reading session aliases", exc) from exc
        stitched = {a for a, alias in zip(sessions, aliases, strict=True) if alias is not None}
        fresh = [a for a in fresh if a not in stitched]
    found = await durable.get_many(fresh) if fresh else {}
    for (namespace, actor), copy in found.items():
        keys = Keys(namespace)
        feat_key, emb_key = keys.features(actor), keys.embedding(actor)
        for _ in range(10):
            try:
                async with redis.pipeline(transaction=True) as pipe:
                    # WATCH: an event applied meanwhile makes EXEC fail, and the merge is
                    # redone on what it wrote.
                    await pipe.watch(feat_key, emb_key)
                    raw_f = await pipe.hgetall(feat_key)
                    raw_e = await pipe.hgetall(emb_key)
                    hot_f = {_text(k): _text(v) for k, v in raw_f.items()}
                    hot_e = {_text(k): _bytes(v) for k, v in raw_e.items()}
                    merged = merge_features(hot_f, copy.features, settings)
                    embedding = merge_embeddings(
                        hot_e, copy.embedding, settings.embedding_half_life_s
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(feat_key, emb_key)
                    pipe.hset(feat_key, mapping=merged)  # type: ignore[arg-type]
                    pipe.expire(feat_key, settings.window_ttl_s)
                    if embedding:
                        pipe.hset(emb_key, mapping=embedding)  # type: ignore[arg-type]
                        pipe.expire(emb_key, settings.window_ttl_s)
                    await pipe.execute()
                break
            except WatchError:
                continue
            except RedisError as exc:
                raise redis_failure(f"merging the feature vector of {actor!r}", exc) from exc
        else:
            raise StoreUnavailable(
                f"the feature vector of {actor!r} kept changing while being restored; retry"
            )
    return len(found)


class FeatureStage:
    """The windows agent's stage for feature vectors: before identity stitching, merge
    back the durable copies of hashes Redis lost (so a session that logs in now moves
    all of its history); after the batch, copy every touched vector to DynamoDB (all
    actors of the batch, so a replay after a crash between the two writes still brings
    the durable copy up to date)."""

    def __init__(self, redis: aioredis.Redis, durable: DynamoFeatures, settings: Settings) -> None:
        self.redis = redis
        self.durable = durable
        self.settings = settings

    async def recover(self, result: ApplyResult) -> None:
        fresh = result.created.get(FeaturesPart.name, frozenset())
        if fresh:
            await recover_lost_features(self.redis, self.durable, fresh, self.settings)

    async def after(self, events: Sequence[Event], result: ApplyResult) -> None:
        await persist_features(self.redis, self.durable, {(e.namespace, e.actor) for e in events})


# --- identity stitching: a session's feature vector joins its user's ---------------------


class SessionFeatures:
    """Moves an anonymous session's feature vector into its user's when the session logs
    in (`agents.identity.IdentityStitcher` calls `stitch` for every login of a batch and
    every session found logged in since).

    In Redis, one optimistic transaction (WATCH on both hashes of both actors) merges the
    session's ``feat``/``emb`` into the user's (`merge_features`, `merge_embeddings`:
    counts add, times widen, the later session wins or the same one adds up, affinities
    and embeddings combine with their decay) and deletes the session's, so a replayed
    login, or any later stitch of the session, finds nothing left to move: idempotent.
    When the user's hash is missing (a new user, or Redis lost it) its durable copy is
    merged in too, so the merge never overwrites the user's history.

    Durably: the session's DynamoDB copy is deleted before the move (a crash in between
    leaves the hot hash, which the replayed login moves), and the user's merged vector
    is written after it. A session whose hot hash Redis lost is merged from its DynamoDB
    copy, once, at the login that first names its user (the copy is deleted after).
    """

    def __init__(self, redis: aioredis.Redis, durable: DynamoFeatures, settings: Settings) -> None:
        self.redis = redis
        self.durable = durable
        self.settings = settings

    async def stitch(self, logins: Sequence[Login]) -> set[Actor]:
        """Merge each login's session into its user; returns the users that changed."""
        if not logins:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for login in logins:
            keys = keys_of(login.namespace)
            pipe.exists(keys.features(login.session_actor))
            pipe.exists(keys.features(login.user_id))
        try:
            found = await pipe.execute()
        except RedisError as exc:
            raise redis_failure("checking session feature vectors", exc) from exc
        hot: list[Login] = []
        lost: list[Login] = []
        user_missing: set[Actor] = set()
        for n, login in enumerate(logins):
            if found[2 * n]:
                hot.append(login)
            elif login.new_alias:
                lost.append(login)
            if not found[2 * n + 1]:
                user_missing.add((login.namespace, login.user_id))
        copies = {}
        if lost:
            copies = await self.durable.get_many([(x.namespace, x.session_actor) for x in lost])
            lost = [x for x in lost if (x.namespace, x.session_actor) in copies]
        todo = hot + lost
        if not todo:
            return set()
        wanted = {(x.namespace, x.user_id) for x in todo} & user_missing
        users = await self.durable.get_many(sorted(wanted)) if wanted else {}
        if hot:
            # First the session's durable copy: if we crash after it, the hot hash is still
            # there and the replayed login moves it; never both.
            await self.durable.delete((x.namespace, x.session_actor) for x in hot)
        changed: set[Actor] = set()
        for login in todo:
            user = (login.namespace, login.user_id)
            session_copy = copies.get((login.namespace, login.session_actor))
            if await self._move(login, session_copy, users.pop(user, None)):
                changed.add(user)
        if changed:
            await persist_features(self.redis, self.durable, changed)
        if lost:
            await self.durable.delete((x.namespace, x.session_actor) for x in lost)
        return changed

    async def _move(
        self, login: Login, session_copy: FeatureCopy | None, user_copy: FeatureCopy | None
    ) -> bool:
        s = self.settings
        keys = keys_of(login.namespace)
        session, user = login.session_actor, login.user_id
        session_f, session_e = keys.features(session), keys.embedding(session)
        user_f, user_e = keys.features(user), keys.embedding(user)
        half_life = s.embedding_half_life_s
        for _ in range(10):
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    # WATCH: an event applied to either actor meanwhile (another shard)
                    # makes EXEC fail, and the merge is redone on what it wrote.
                    await pipe.watch(session_f, session_e, user_f, user_e)
                    hot_sf = _decoded(await pipe.hgetall(session_f))
                    hot_se = _raw(await pipe.hgetall(session_e))
                    hot_uf = _decoded(await pipe.hgetall(user_f))
                    hot_ue = _raw(await pipe.hgetall(user_e))
                    if hot_sf:
                        source_f, source_e = hot_sf, hot_se
                    elif session_copy is not None:
                        source_f, source_e = session_copy.features, session_copy.embedding
                    else:
                        return False  # moved already (a replay): nothing to do
                    if not hot_uf and user_copy is not None:
                        hot_uf = merge_features({}, user_copy.features, s)
                        hot_ue = merge_embeddings(
                            hot_ue, user_copy.embedding, s.embedding_half_life_s
                        )
                    merged = merge_features(hot_uf, source_f, s)
                    embedding = merge_embeddings(hot_ue, source_e, half_life)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(user_f, user_e, session_f, session_e)
                    pipe.hset(user_f, mapping=merged)  # type: ignore[arg-type]
                    pipe.expire(user_f, s.window_ttl_s)
                    if embedding:
                        pipe.hset(user_e, mapping=embedding)  # type: ignore[arg-type]
                        pipe.expire(user_e, s.window_ttl_s)
                    await pipe.execute()
                    return True
            except WatchError:
                continue
            except RedisError as exc:
                raise redis_failure(
                    f"merging the features of {session!r} into {user!r}", exc
                ) from exc
        raise StoreUnavailable(
            f"the feature vectors of {session!r} and {user!r} kept changing while being "
            "merged; retry"
        )


def _decoded(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _raw(raw: Mapping[Any, Any]) -> dict[str, bytes]:
    return {_text(k): _bytes(v) for k, v in raw.items()}
