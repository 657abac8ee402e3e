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
Delivery counts survive parking in the ``prior_deliveries`` field (see
``streamrec.delivery``).

Limits: ``STREAMREC_BUSINESS_SLOTS`` for every business, overridden per business
in the hash ``{ns}:slot-limits`` (``streamrec slots set BUSINESS N``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from streamrec.keys import Keys

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- What one call knows of a business: its limit and live holders, read once.
local function business_state(cache, limits, business, default, slots, now)
  local b = cache[business]
  if not b then
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    b = {
      limit = tonumber(redis.call('HGET', limits, business)) or tonumber(default),
      held = redis.call('ZCARD', slots),
    }
    cache[business] = b
  end
  return b
end

-- Move parked entries into free slots: XADD back with the slot reserved.
local function wake(stream, parked_set, slots, parked, business, b, now, lease)
  local woken = 0
  while b.held < b.limit do
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
    b.held = b.held + 1
    woken = woken + 1
  end
  if woken > 0 and redis.call('EXISTS', parked) == 0 then
    redis.call('SREM', parked_set, business)
  end
  return woken
end
"""

# Every script below takes the same layout, keys declared once per business:
#   KEYS: stream, parked set, limits, then per business j: slots key, parked key
#   ARGV: group, lease ms, default limit, n businesses, their names, then the
#         entries in one space-separated string (a third of the encoding work of
#         one argument per value), each giving its business by its number j.
_LAYOUT = """
local now = now_ms()
local group, lease, default = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local nb = tonumber(ARGV[4])
local first = 5 + nb
local cache = {}
local function business(j)
  local name = ARGV[4 + j]
  local slots, parked = KEYS[2 + 2 * j], KEYS[3 + 2 * j]
  return name, slots, parked, business_state(cache, KEYS[3], name, default, slots, now)
end
"""

# Entries: "id j deliveries" (deliveries so far, prior_deliveries included).
# Returns per entry: 1 run (slot held), 0 parked, -1 no longer in the stream.
ACQUIRE = (
    _COMMON
    + _LAYOUT
    + """
local out = {}
for id, j, d in string.gmatch(ARGV[first], '(%S+) (%S+) (%S+)') do
  local deliveries = tonumber(d)
  local name, slots, parked, b = business(tonumber(j))
  if b.queued == nil then b.queued = redis.call('LLEN', parked) end
  -- Entries delivered before are older than anything queued: they go first.
  local front = deliveries > 1
  if redis.call('ZSCORE', slots, id) then
    redis.call('ZADD', slots, now + lease, id)  -- its slot was reserved when it was woken
    out[#out + 1] = 1
  elseif b.held < b.limit and (front or b.queued == 0) then
    redis.call('ZADD', slots, now + lease, id)
    b.held = b.held + 1
    out[#out + 1] = 1
  else
    local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
    if not entry or entry[1] ~= id then
      out[#out + 1] = -1
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
      b.queued = b.queued + 1
      redis.call('SADD', KEYS[2], name)
      redis.call('XACK', KEYS[1], group, id)
      redis.call('XDEL', KEYS[1], id)
      out[#out + 1] = 0
      -- Queued only because others wait: move the queue on by the free slots.
      b.queued = b.queued - wake(KEYS[1], KEYS[2], slots, parked, name, b, now, lease)
    end
  end
end
return out
"""
)

# Entries: "id j"; then ARGV[first + 1] is 1 to XACK + XDEL them too.
# Returns how many parked entries were woken.
RELEASE = (
    _COMMON
    + _LAYOUT
    + """
local ids, touched = {}, {}
for id, j in string.gmatch(ARGV[first], '(%S+) (%S+)') do
  j = tonumber(j)
  ids[#ids + 1] = id
  redis.call('ZREM', KEYS[2 + 2 * j], id)
  touched[j] = true
end
if ARGV[first + 1] == '1' and #ids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
local woken = 0
for j = 1, nb do
  if touched[j] and redis.call('EXISTS', KEYS[3 + 2 * j]) == 1 then
    local name, slots, parked, b = business(j)
    woken = woken + wake(KEYS[1], KEYS[2], slots, parked, name, b, now, lease)
  end
end
return woken
"""
)

# Entries: "id j". Renews held leases; re-takes an expired one if a slot is
# free. Returns the ids whose slot was lost to others.
RENEW = (
    _COMMON
    + _LAYOUT
    + """
local lost = {}
for id, j in string.gmatch(ARGV[first], '(%S+) (%S+)') do
  local _, slots, _, b = business(tonumber(j))
  if redis.call('ZSCORE', slots, id) then
    redis.call('ZADD', slots, now + lease, id)
  elseif b.held < b.limit then
    redis.call('ZADD', slots, now + lease, id)
    b.held = b.held + 1
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)

# No entries: wakes parked entries of every business given. Returns how many.
SWEEP = (
    _COMMON
    + _LAYOUT
    + """
local woken = 0
for j = 1, nb do
  local name, slots, parked, b = business(j)
  woken = woken + wake(KEYS[1], KEYS[2], slots, parked, name, b, now, lease)
  if redis.call('EXISTS', parked) == 0 then redis.call('SREM', KEYS[2], name) end
end
return woken
"""
)


@dataclass(frozen=True, slots=True)
class Held:
    """An entry that holds a slot of its business."""

    entry_id: str
    business: str


@dataclass(frozen=True, slots=True)
class Admission:
    """What one acquire call decided for a batch of entries."""

    held: list[Held]
    refused: set[str]
    """Entries that must not run now: parked, or gone from the stream."""
    parked: int


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

    def _layout(self, businesses: Sequence[str]) -> tuple[list[str], list[str], dict[str, str]]:
        """KEYS and leading ARGV for ``businesses``, and each one's number as a string."""
        numbers: dict[str, str] = {}
        keys = [self._keys.stream, self._keys.parked_set, self._keys.slot_limits]
        for business in businesses:
            if business not in numbers:
                numbers[business] = str(len(numbers) + 1)
                keys += (self._keys.slots(business), self._keys.parked(business))
        head = [self._keys.group, str(self.lease_ms), str(self.default_limit), str(len(numbers))]
        return keys, head + list(numbers), numbers

    async def admit(self, entries: Sequence[tuple[str, dict[str, str], int]]) -> Admission:
        """Take slots for (entry id, fields, deliveries) of a batch read; one call.

        Entries of no business (no ``field``) are not limited and run.
        """
        limited = [(i, b, d) for i, f, d in entries if (b := self.business(f)) is not None]
        verdicts = await self.acquire(limited)
        held: list[Held] = []
        refused: set[str] = set()
        for (entry_id, business, _), verdict in zip(limited, verdicts, strict=True):
            if verdict == 1:
                held.append(Held(entry_id, business))
            else:
                refused.add(entry_id)
        parked = sum(1 for verdict in verdicts if verdict == 0)
        return Admission(held, refused, parked)

    async def acquire(self, entries: Sequence[tuple[str, str, int]]) -> list[int]:
        """For (entry id, business, deliveries) each: 1 run, 0 parked, -1 gone. One call."""
        if not entries:
            return []
        keys, args, numbers = self._layout([business for _, business, _ in entries])
        args.append(" ".join(f"{i} {numbers[b]} {d}" for i, b, d in entries))
        return [int(x) for x in await self._acquire(keys=keys, args=args)]

    async def release(self, held: Sequence[Held], *, ack: bool) -> int:
        """Free the slots (acking the entries too with ``ack``); wake parked ones. One call."""
        if not held:
            return 0
        keys, args, numbers = self._layout([h.business for h in held])
        args += (_packed(held, numbers), "1" if ack else "0")
        return int(await self._release(keys=keys, args=args))

    async def renew(self, held: Sequence[Held]) -> list[str]:
        """Extend the leases of held slots; returns ids whose slot was lost."""
        if not held:
            return []
        keys, args, numbers = self._layout([h.business for h in held])
        args.append(_packed(held, numbers))
        return [str(x) for x in await self._renew(keys=keys, args=args)]

    async def sweep(self) -> int:
        """Wake parked entries of businesses whose slots freed without a release."""
        members = await self._redis.smembers(self._keys.parked_set)
        if not members:
            return 0
        keys, args, _ = self._layout(sorted(str(b) for b in members))
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


def _packed(held: Sequence[Held], numbers: dict[str, str]) -> str:
    return " ".join(f"{h.entry_id} {numbers[h.business]}" for h in held)


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
