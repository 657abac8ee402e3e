"""Per-business slots: leases in Redis that cap recordings in work per tenant.

A business may have at most its limit of entries in work at once, counted over
every consumer on every host. Slots are leases: a sorted set per business
(``{ns}:slots:<business>``) whose members are the entry ids holding a slot,
scored with their lease expiry (Redis server time, ms). A holder renews its
lease while it works; a crashed holder's slot expires within one lease period.

An entry read while its business is at its limit is *parked*: in one Lua call
its fields move from the stream (XACK + XDEL) onto the business's list
``{ns}:parked:<business>`` (oldest first), so it holds no consumer concurrency
and is not re-read. When a slot frees, the release script moves the oldest
parked entry back onto the stream, with the slot already reserved for its new
id, in the same atomic call. An entry is therefore never both parked and in
the stream, and never in neither. A sweeper run by every consumer wakes parked
entries whose slots freed without a release (a holder that crashed).

Order within a business is kept: while a business has parked entries, a new
entry parks behind them even if a slot is free, and entries that had been
delivered before (reclaimed, or woken but not started in time) park at the front.
Delivery counts survive parking in the ``prior_deliveries`` field.

Limits: ``STREAMREC_BUSINESS_SLOTS`` for every business, overridden per business
in the hash ``{ns}:slot-limits`` (``streamrec slots set BUSINESS N``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from streamrec.keys import Keys

PRIOR = "prior_deliveries"

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function limit_of(limits, business, default)
  return tonumber(redis.call('HGET', limits, business)) or tonumber(default)
end

-- Move parked entries into free slots: XADD back with the slot reserved.
local function wake(stream, parked_set, slots, parked, business, limit, now, lease)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  local woken = 0
  while redis.call('ZCARD', slots) < limit do
    local item = redis.call('LPOP', parked)
    if not item then break end
    local p = cjson.decode(item)
    local args = {}
    for i = 1, #p.f do args[i] = p.f[i] end
    if p.d > 0 then
      args[#args + 1] = 'prior_deliveries'
      args[#args + 1] = tostring(p.d)
    end
    local id = redis.call('XADD', stream, '*', unpack(args))
    redis.call('ZADD', slots, now + lease, id)
    woken = woken + 1
  end
  if redis.call('LLEN', parked) == 0 then redis.call('SREM', parked_set, business) end
  return woken
end
"""

# KEYS: stream, parked set, limits, then per entry: its slots key, its parked key.
# ARGV: group, lease ms, default limit, then per entry: id, business, deliveries so
# far (prior_deliveries included).
# Returns per entry: 1 run (slot held), 0 parked, -1 no longer in the stream.
ACQUIRE = (
    _COMMON
    + """
local now = now_ms()
local lease, default = tonumber(ARGV[2]), ARGV[3]
local out = {}
for i = 0, (#ARGV - 3) / 3 - 1 do
  local id, business = ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  local deliveries = tonumber(ARGV[6 + 3 * i])
  local slots, parked = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local limit = limit_of(KEYS[3], business, default)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
  if not entry then
    out[#out + 1] = -1
  elseif redis.call('ZSCORE', slots, id) then
    redis.call('ZADD', slots, now + lease, id)
    out[#out + 1] = 1
  else
    -- Entries delivered before are older than anything queued: they go first.
    local front = deliveries > 1
    local queue = redis.call('LLEN', parked)
    if redis.call('ZCARD', slots) < limit and (front or queue == 0) then
      redis.call('ZADD', slots, now + lease, id)
      out[#out + 1] = 1
    else
      local fields = {}
      for j = 1, #entry[2], 2 do
        if entry[2][j] ~= 'prior_deliveries' then
          fields[#fields + 1] = entry[2][j]
          fields[#fields + 1] = entry[2][j + 1]
        end
      end
      -- This delivery did not run, so it does not count against the entry.
      local item = cjson.encode({f = fields, d = deliveries - 1, id = id, at = now})
      if front then redis.call('LPUSH', parked, item) else redis.call('RPUSH', parked, item) end
      redis.call('SADD', KEYS[2], business)
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      wake(KEYS[1], KEYS[2], slots, parked, business, limit, now, lease)
      out[#out + 1] = 0
    end
  end
end
return out
"""
)

# KEYS: stream, parked set, limits, then per entry: slots key, parked key.
# ARGV: group, lease ms, default limit, ack (1: XACK + XDEL too), then per entry: id, business.
RELEASE = (
    _COMMON
    + """
local now = now_ms()
local lease, default = tonumber(ARGV[2]), ARGV[3]
local woken = 0
for i = 0, (#ARGV - 4) / 2 - 1 do
  local id, business = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  local slots, parked = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  if ARGV[4] == '1' then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
  end
  redis.call('ZREM', slots, id)
  woken = woken + wake(KEYS[1], KEYS[2], slots, parked, business,
                       limit_of(KEYS[3], business, default), now, lease)
end
return woken
"""
)

# KEYS: limits, then per entry: its slots key. ARGV: lease ms, default limit, then
# per entry: id, business. Renews held leases; re-takes an expired one if a slot
# is free. Returns the ids whose slot was lost to others.
RENEW = (
    _COMMON
    + """
local now = now_ms()
local lease, default = tonumber(ARGV[1]), ARGV[2]
local lost = {}
for i = 0, (#ARGV - 2) / 2 - 1 do
  local id, business = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  local slots = KEYS[2 + i]
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if redis.call('ZSCORE', slots, id)
     or redis.call('ZCARD', slots) < limit_of(KEYS[1], business, default) then
    redis.call('ZADD', slots, now + lease, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)

# KEYS: stream, parked set, limits, then per business: slots key, parked key.
# ARGV: lease ms, default limit, then the businesses. Returns entries woken.
SWEEP = (
    _COMMON
    + """
local now = now_ms()
local woken = 0
for i = 0, #ARGV - 3 do
  local business = ARGV[3 + i]
  woken = woken + wake(KEYS[1], KEYS[2], KEYS[4 + 2 * i], KEYS[5 + 2 * i], business,
                       limit_of(KEYS[3], business, ARGV[2]), now, tonumber(ARGV[1]))
end
return woken
"""
)


@dataclass(frozen=True, slots=True)
class Held:
    """An entry that holds a slot of its business."""

    entry_id: str
    business: str


class Slots:
    """The slots of every business of one namespace, for one consumer."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        default_limit: int,
        lease_ms: int = 30_000,
        field: str = "business_id",
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.default_limit = default_limit
        self.lease_ms = lease_ms
        self.field = field
        self._acquire = redis.register_script(ACQUIRE)
        self._release = redis.register_script(RELEASE)
        self._renew = redis.register_script(RENEW)
        self._sweep = redis.register_script(SWEEP)

    def business(self, fields: dict[str, str]) -> str | None:
        """The business an entry counts against (None: not limited)."""
        return fields.get(self.field) or None

    def _base(self) -> list[str]:
        return [self._keys.stream, self._keys.parked_set, self._keys.slot_limits]

    async def acquire(self, entries: Sequence[tuple[str, str, int]]) -> list[int]:
        """For (entry id, business, deliveries) each: 1 run, 0 parked, -1 gone. One call."""
        if not entries:
            return []
        keys, args = self._base(), [self._keys.group, str(self.lease_ms), str(self.default_limit)]
        for entry_id, business, deliveries in entries:
            keys += (self._keys.slots(business), self._keys.parked(business))
            args += (entry_id, business, str(deliveries))
        return [int(x) for x in await self._acquire(keys=keys, args=args)]

    async def release(self, held: Sequence[Held], *, ack: bool) -> int:
        """Free the slots (acking the entries too with ``ack``); wake parked ones. One call."""
        if not held:
            return 0
        keys = self._base()
        args = [self._keys.group, str(self.lease_ms), str(self.default_limit), "1" if ack else "0"]
        for h in held:
            keys += (self._keys.slots(h.business), self._keys.parked(h.business))
            args += (h.entry_id, h.business)
        return int(await self._release(keys=keys, args=args))

    async def renew(self, held: Sequence[Held]) -> list[str]:
        """Extend the leases of held slots; returns ids whose slot was lost."""
        if not held:
            return []
        keys = [self._keys.slot_limits]
        args = [str(self.lease_ms), str(self.default_limit)]
        for h in held:
            keys.append(self._keys.slots(h.business))
            args += (h.entry_id, h.business)
        return [str(x) for x in await self._renew(keys=keys, args=args)]

    async def sweep(self) -> int:
        """Wake parked entries of businesses whose slots freed without a release."""
        businesses = sorted(str(b) for b in await self._redis.smembers(self._keys.parked_set))
        if not businesses:
            return 0
        keys = self._base()
        for business in businesses:
            keys += (self._keys.slots(business), self._keys.parked(business))
        args = [str(self.lease_ms), str(self.default_limit), *businesses]
        return int(await self._sweep(keys=keys, args=args))

    async def parked_total(self) -> int:
        """How many entries are parked, over all businesses."""
        businesses = await self._redis.smembers(self._keys.parked_set)
        if not businesses:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for business in businesses:
                pipe.llen(self._keys.parked(str(business)))
            return sum(int(n) for n in await pipe.execute())


async def picture(redis: aioredis.Redis, keys: Keys, *, default_limit: int) -> list[dict[str, Any]]:
    """Per business: slots in use (live leases), limit and parked count."""
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    businesses = {str(b) for b in await redis.smembers(keys.parked_set)}
    prefix = keys.slots("")
    async for key in redis.scan_iter(match=keys.slots("*"), count=500):
        businesses.add(str(key)[len(prefix) :])
    limits = {str(k): int(v) for k, v in (await redis.hgetall(keys.slot_limits)).items()}
    businesses |= set(limits)
    rows = []
    for business in sorted(businesses):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zcount(keys.slots(business), now_ms, "+inf")
            pipe.llen(keys.parked(business))
            in_use, parked = await pipe.execute()
        rows.append(
            {
                "business_id": business,
                "in_use": int(in_use),
                "limit": limits.get(business, default_limit),
                "parked": int(parked),
            }
        )
    return rows
