"""One consumer's view of the consumer group: read, reclaim, renew, ack, leave.

Each method is one round trip to Redis. Scripts are used where a check and a
change must be one step (renewing only entries this consumer still owns,
leaving the group only with nothing pending).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamrec.keys import Keys

# Per id: its delivery count after the call; -1 when another consumer owns it
# now, -2 when it is not pending at all (acked meanwhile). With ARGV[3] == "1"
# the count is raised by one (a retry is a delivery).
CLAIM_OWN = """
local out = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if not p then
    out[#out + 1] = -2
  elseif p[2] == ARGV[2] then
    local count = p[4]
    if ARGV[3] == '1' then count = count + 1 end
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'RETRYCOUNT', count, 'JUSTID')
    out[#out + 1] = count
  else
    out[#out + 1] = -1
  end
end
return out
"""

# Deletes the consumer from the group only if it has no pending entries, so a
# graceful exit leaves no trace in XINFO CONSUMERS and can never drop work.
LEAVE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""

Entry = tuple[str, dict[str, str]]


@dataclass(slots=True)
class Reclaimed:
    """What one XAUTOCLAIM call took over."""

    entries: list[Entry]
    counts: dict[str, int]
    deleted: list[str]
    scan_done: bool


async def ensure_group(redis: aioredis.Redis, keys: Keys) -> None:
    """Create the stream and its group if missing (from the start of the stream)."""
    try:
        await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Group:
    """The group operations of the consumer named ``name``."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, name: str) -> None:
        self._redis = redis
        self._keys = keys
        self.name = name
        self._claim_own = redis.register_script(CLAIM_OWN)
        self._leave = redis.register_script(LEAVE)
        self._cursor = "0-0"

    async def ensure(self) -> None:
        """Create the stream and group if missing."""
        await ensure_group(self._redis, self._keys)

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer (XREADGROUP >), waiting up to ``block_ms`` (None: not)."""
        reply: Any = await self._redis.xreadgroup(
            self._keys.group, self.name, {self._keys.stream: ">"}, count=count, block=block_ms
        )
        return [(i, fields) for _, entries in reply or [] for i, fields in entries]

    async def reclaim(self, min_idle_ms: int, count: int) -> Reclaimed:
        """Take over up to ``count`` entries idle over ``min_idle_ms``, continuing the scan."""
        cursor, claimed, deleted = await self._redis.xautoclaim(
            self._keys.stream,
            self._keys.group,
            self.name,
            min_idle_time=min_idle_ms,
            start_id=self._cursor,
            count=count,
        )
        self._cursor = cursor
        entries = [(i, fields) for i, fields in claimed if fields is not None]
        counts = await self._counts([i for i, _ in entries]) if entries else {}
        return Reclaimed(entries, counts, list(deleted), scan_done=cursor == "0-0")

    async def _counts(self, ids: list[str]) -> dict[str, int]:
        """Delivery counts of entries this consumer owns, from one XPENDING range."""
        pending = await self._redis.xpending_range(
            self._keys.stream,
            self._keys.group,
            min=min(ids, key=_id_key),
            max=max(ids, key=_id_key),
            count=10_000,
            consumername=self.name,
        )
        return {str(p["message_id"]): int(p["times_delivered"]) for p in pending}

    async def renew(self, ids: Sequence[str], *, bump: bool = False) -> list[int]:
        """Reset the idle time of entries still ours (``bump``: count one more delivery).

        Returns each id's delivery count; -1 where another consumer owns it now, -2
        where it is no longer pending (its ack went through meanwhile).
        """
        if not ids:
            return []
        args = [self._keys.group, self.name, "1" if bump else "0", *ids]
        return [int(c) for c in await self._claim_own(keys=[self._keys.stream], args=args)]

    async def ack(self, ids: Sequence[str]) -> None:
        """XACK and XDEL, in one MULTI: handled entries leave the stream."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._keys.stream, self._keys.group, *ids)
            pipe.xdel(self._keys.stream, *ids)
            await pipe.execute()

    async def leave(self) -> None:
        """Remove this consumer from the group if it has nothing pending."""
        await self._leave(keys=[self._keys.stream], args=[self._keys.group, self.name])


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)
