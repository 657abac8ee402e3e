"""One consumer's group operations against a real Redis: renewals safe to repeat."""

from __future__ import annotations

import redis.asyncio as aioredis

from streamrec.group import Group, ensure_group
from streamrec.keys import Keys


async def pending_count(redis: aioredis.Redis, keys: Keys, entry_id: str) -> tuple[str, int]:
    [entry] = await redis.xpending_range(keys.stream, keys.group, entry_id, entry_id, 1)
    return str(entry["consumer"]), int(entry["times_delivered"])


async def test_a_repeated_retry_renewal_counts_one_delivery(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A retry's renewal sent twice (a client retry after a lost reply) counts once."""
    entry_id = str(await redis.xadd(keys.stream, {"n": "1"}))
    await ensure_group(redis, keys)
    group = Group(redis, keys, "c1")
    await group.read(10, None)
    assert await group.renew([(entry_id, 2)]) == [2]
    assert await group.renew([(entry_id, 2)]) == [2]
    assert await pending_count(redis, keys, entry_id) == ("c1", 2)


async def test_renewal_restores_the_count_xautoclaim_raised_on_an_own_entry(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """An own entry that XAUTOCLAIM counted once more gets its true count back."""
    entry_id = str(await redis.xadd(keys.stream, {"n": "1"}))
    await ensure_group(redis, keys)
    group = Group(redis, keys, "c1")
    await group.read(10, None)
    taken = await group.reclaim(0, 10)
    assert [i for i, _ in taken.entries] == [entry_id]
    assert await pending_count(redis, keys, entry_id) == ("c1", 2)
    assert await group.renew([(entry_id, 1)]) == [1]
    assert await pending_count(redis, keys, entry_id) == ("c1", 1)


async def test_renewal_tells_lost_and_finished_entries_apart(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """-1 for an entry another consumer owns now, -2 for one no longer pending; neither changes."""
    taken_over, acked = [str(await redis.xadd(keys.stream, {"n": str(n)})) for n in range(2)]
    await ensure_group(redis, keys)
    group = Group(redis, keys, "c1")
    await group.read(10, None)
    await redis.xclaim(keys.stream, keys.group, "c2", 0, [taken_over], justid=True)
    await group.ack([acked])
    assert await group.renew([(taken_over, 5), (acked, 5)]) == [-1, -2]
    assert await pending_count(redis, keys, taken_over) == ("c2", 1)
