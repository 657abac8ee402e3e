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

from streamrec import lua
from streamrec.keys import Keys

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
        self._claim_own = lua.register(redis, "group_claim_own")
        self._leave = lua.register(redis, "group_leave")
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

    async def renew(self, counts: Sequence[tuple[str, int]]) -> list[int]:
        """Reset the idle time of entries still ours, setting each one's delivery count.

        ``counts`` pairs an entry id with the count it must have afterwards (one
        more than before for a retry). Returns each id's count; -1 where another
        consumer owns it now, -2 where it is no longer pending (acked meanwhile).
        Safe to repeat: the count is set, not incremented.
        """
        if not counts:
            return []
        args = [self._keys.group, self.name, *_pairs(counts)]
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


def _pairs(counts: Sequence[tuple[str, int]]) -> list[str]:
    """The claim script's ARGV tail: id, count, id, count, ..."""
    return [str(value) for pair in counts for value in pair]


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)
