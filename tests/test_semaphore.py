"""Per-business slots: leases, parking, waking, order and fairness, across processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.group import ensure_group
from streamrec.keys import Keys
from streamrec.retry import RetryPolicy
from streamrec.semaphore import Held, Slots
from streamrec.settings import Settings
from tests.conftest import entries, wait_for
from tests.processes import spawn_consumer
from tests.standins import MediaStandIn, OpenAIStandIn, enqueue


async def add(redis: aioredis.Redis, keys: Keys, business: str, count: int) -> list[str]:
    ids = []
    for n in range(count):
        ids.append(str(await redis.xadd(keys.stream, {"business_id": business, "n": str(n)})))
    return ids


async def read(redis: aioredis.Redis, keys: Keys, count: int = 100) -> list[str]:
    await ensure_group(redis, keys)
    reply: Any = await redis.xreadgroup(keys.group, "c1", {keys.stream: ">"}, count=count)
    return [i for _, batch in reply or [] for i, _ in batch]


async def parked(redis: aioredis.Redis, keys: Keys, business: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in await redis.lrange(keys.parked(business), 0, -1)]


async def test_acquire_runs_up_to_the_limit_and_parks_the_rest(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Within the limit entries run; the rest leave the stream and the PEL for the parked list."""
    slots = Slots(redis, keys, default_limit=2)
    ids = await add(redis, keys, "a", 5)
    await read(redis, keys)
    verdicts = await slots.acquire([(i, "a", 1) for i in ids])
    assert verdicts == [1, 1, 0, 0, 0]
    assert [i for i, _ in await entries(redis, keys.stream)] == ids[:2]
    assert (await redis.xpending(keys.stream, keys.group))["pending"] == 2
    assert [p["id"] for p in await parked(redis, keys, "a")] == ids[2:]
    assert await redis.smembers(keys.parked_set) == {"a"}
    assert await slots.parked_total() == 3


async def test_release_wakes_the_oldest_parked_entry_with_its_slot_reserved(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Freeing a slot moves the oldest parked entry back to the stream, its slot reserved."""
    slots = Slots(redis, keys, default_limit=1)
    first, second, third = await add(redis, keys, "a", 3)
    await read(redis, keys)
    assert await slots.acquire([(first, "a", 1), (second, "a", 1), (third, "a", 1)]) == [1, 0, 0]
    assert await slots.release([Held(first, "a")], ack=True) == 1
    [(woken, fields)] = await entries(redis, keys.stream)
    assert fields == {"business_id": "a", "n": "1"}
    assert await redis.zscore(keys.slots("a"), woken) is not None
    await read(redis, keys)
    assert await slots.acquire([(woken, "a", 1)]) == [1]
    assert [p["id"] for p in await parked(redis, keys, "a")] == [third]


async def test_a_new_entry_queues_behind_parked_ones(redis: aioredis.Redis, keys: Keys) -> None:
    """While a business has parked entries, a new one parks behind them, even with a slot free."""
    slots = Slots(redis, keys, default_limit=1)
    held, waiting = await add(redis, keys, "a", 2)
    await read(redis, keys)
    await slots.acquire([(held, "a", 1), (waiting, "a", 1)])
    await slots.release([Held(held, "a")], ack=True)  # wakes `waiting`, reserving the slot
    await redis.zrem(keys.slots("a"), *await redis.zrange(keys.slots("a"), 0, -1))
    await redis.rpush(keys.parked("a"), json.dumps({"f": ["business_id", "a"], "d": 0, "id": "x"}))
    await redis.sadd(keys.parked_set, "a")
    [late] = await add(redis, keys, "a", 1)
    await read(redis, keys)
    assert await slots.acquire([(late, "a", 1)]) == [0]
    # The queue moved instead: the head ("x") was woken into the free slot.
    assert [p["id"] for p in await parked(redis, keys, "a")] == [late]


async def test_redelivered_entries_park_at_the_front(redis: aioredis.Redis, keys: Keys) -> None:
    """An entry delivered before parks ahead of the queue, keeping its delivery count."""
    slots = Slots(redis, keys, default_limit=1)
    ids = await add(redis, keys, "a", 3)
    await read(redis, keys)
    await slots.acquire([(ids[0], "a", 1), (ids[1], "a", 1)])
    assert await slots.acquire([(ids[2], "a", 3)]) == [0]
    queue = await parked(redis, keys, "a")
    assert [p["id"] for p in queue] == [ids[2], ids[1]]
    assert queue[0]["d"] == 2


async def test_an_override_changes_one_business_limit(redis: aioredis.Redis, keys: Keys) -> None:
    """A per-business limit in the slot-limits hash wins over the default."""
    slots = Slots(redis, keys, default_limit=3)
    await redis.hset(keys.slot_limits, "small", "1")
    small, big = await add(redis, keys, "small", 3), await add(redis, keys, "big", 3)
    await read(redis, keys)
    assert await slots.acquire([(i, "small", 1) for i in small]) == [1, 0, 0]
    assert await slots.acquire([(i, "big", 1) for i in big]) == [1, 1, 1]


async def test_an_unrenewed_lease_expires_and_the_sweep_wakes_the_next(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A holder that stops renewing (it crashed) loses its slot within one lease period."""
    slots = Slots(redis, keys, default_limit=1, lease_ms=300)
    holder, waiting = await add(redis, keys, "a", 2)
    await read(redis, keys)
    acquired = time.monotonic()
    await slots.acquire([(holder, "a", 1), (waiting, "a", 1)])
    await wait_for(slots.sweep, timeout=5, what="the sweep to wake the parked entry")
    assert time.monotonic() - acquired >= 0.29  # not before the lease ran out (clock skew aside)
    [woken] = [i for i, _ in await entries(redis, keys.stream) if i != holder]
    assert await redis.zrange(keys.slots("a"), 0, -1) == [woken]


async def test_renewal_keeps_a_slot_past_its_lease(redis: aioredis.Redis, keys: Keys) -> None:
    """A holder that renews keeps its slot for many lease periods."""
    slots = Slots(redis, keys, default_limit=1, lease_ms=300)
    holder, waiting = await add(redis, keys, "a", 2)
    await read(redis, keys)
    await slots.acquire([(holder, "a", 1), (waiting, "a", 1)])
    deadline = time.monotonic() + 1.5  # five lease periods
    while time.monotonic() < deadline:
        assert await slots.renew([Held(holder, "a")]) == []
        assert await slots.sweep() == 0
        await asyncio.sleep(0.1)  # the holder's renewal cadence, a third of the lease
    assert await redis.zrange(keys.slots("a"), 0, -1) == [holder]


def consumer(
    redis: aioredis.Redis, keys: Keys, handler: Any, *, limit: int, concurrency: int = 10
) -> Consumer:
    config = ConsumerConfig(
        name="c1",
        concurrency=concurrency,
        claim_idle_ms=1_000,
        block_ms=50,
        retry=RetryPolicy(base_s=0.005, max_s=0.02),
    )
    slots = Slots(redis, keys, default_limit=limit, lease_ms=1_000)
    return Consumer(redis=redis, keys=keys, handler=handler, config=config, slots=slots)


async def test_one_consumer_keeps_each_business_within_its_limit_in_order(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """With spare concurrency, a business still runs at most its limit, oldest first."""
    busy: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    order: dict[str, list[int]] = {"a": [], "b": []}

    async def handler(delivery: Delivery) -> None:
        business = delivery.fields["business_id"]
        order[business].append(int(delivery.fields["n"]))
        busy[business] += 1
        peak[business] = max(peak[business], busy[business])
        await asyncio.sleep(0.005)  # simulated work, so entries overlap
        busy[business] -= 1

    await add(redis, keys, "a", 30)
    await add(redis, keys, "b", 10)
    worker = consumer(redis, keys, handler, limit=2)
    await asyncio.wait_for(worker.run(asyncio.Event(), until_idle=True), 30)
    assert peak == Counter({"a": 2, "b": 2})
    assert order["a"] == list(range(30))
    assert order["b"] == list(range(10))
    assert worker.processed == 40
    assert await redis.xlen(keys.stream) == 0
    assert await redis.exists(keys.parked("a"), keys.parked("b"), keys.parked_set) == 0


async def test_delivery_counts_survive_parking(redis: aioredis.Redis, keys: Keys) -> None:
    """Deliveries made before an entry was parked still count towards the cap."""
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.deliveries)
        assert "prior_deliveries" not in delivery.fields

    slots = Slots(redis, keys, default_limit=1)
    blocker, entry = await add(redis, keys, "a", 2)
    await read(redis, keys)
    await slots.acquire([(blocker, "a", 1), (entry, "a", 3)])
    await slots.release([Held(blocker, "a")], ack=True)
    await asyncio.wait_for(
        consumer(redis, keys, handler, limit=1).run(asyncio.Event(), until_idle=True), 30
    )
    assert seen == [3]


# Real processes ------------------------------------------------------------------------------


async def completed(db: Any) -> int:
    return int(await db.fetchval("SELECT count(*) FROM recordings WHERE status = 'completed'"))


async def test_the_limit_holds_across_consumer_processes(
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """Three consumer processes never have more than the limit of one business in work."""
    media.delay_s = 0.03
    sids = await enqueue(redis, keys, 24, business="a", media=media) + await enqueue(
        redis, keys, 24, business="b", media=media
    )
    limited = settings.model_copy(update={"business_slots": 2, "openai_api_key": None})
    for n in range(3):
        children.append(spawn_consumer(limited, f"c{n}", tmp_path, STREAMREC_CONCURRENCY="6"))
    await wait_for(lambda: _equals(completed(db), len(sids)), timeout=60, what="all recordings")
    assert media.peak["a"] == 2
    assert media.peak["b"] == 2


async def test_a_sigkilled_holder_frees_its_slot_within_a_lease(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """SIGKILL a slot holder: the slot is free within one lease, and its entry completes."""
    lease_ms = 1_000
    limited = settings.model_copy(update={"business_slots": 1, "slot_lease_ms": lease_ms})
    sids = await enqueue(redis, keys, 3, business="a", media=media)
    openai_api.gate = asyncio.Event()
    children.append(spawn_consumer(limited, "holder", tmp_path))
    await wait_for(lambda: sum(openai_api.waiting.values()) == 1, what="the holder at work")
    children[0].send_signal(signal.SIGKILL)
    await asyncio.to_thread(children[0].wait)
    seconds, micros = await redis.time()
    killed_ms = int(seconds) * 1000 + int(micros) // 1000
    [expiry] = await redis.zrange(keys.slots("a"), 0, -1, withscores=True)
    assert float(expiry[1]) <= killed_ms + lease_ms, "the lease runs out within one period"
    openai_api.gate.set()
    children.append(spawn_consumer(limited, "rescuer", tmp_path))
    await wait_for(lambda: _equals(completed(db), len(sids)), timeout=30, what="all completed")
    assert await db.fetchval("SELECT count(*) FROM recordings") == len(sids)


async def test_parked_entries_survive_a_consumer_killed_between_parking_and_waking(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """A consumer killed while entries it parked wait for its slot: all of them still run."""
    limited = settings.model_copy(update={"business_slots": 1, "slot_lease_ms": 1_000})
    sids = await enqueue(redis, keys, 6, business="a", media=media)
    openai_api.gate = asyncio.Event()
    children.append(spawn_consumer(limited, "parker", tmp_path))
    await wait_for(lambda: _equals(redis.llen(keys.parked("a")), 5), what="five parked")
    await wait_for(lambda: sum(openai_api.waiting.values()) == 1, what="one at work")
    children[0].send_signal(signal.SIGKILL)
    await asyncio.to_thread(children[0].wait)
    openai_api.gate.set()
    children.append(spawn_consumer(limited, "heir", tmp_path))
    await wait_for(lambda: _equals(completed(db), len(sids)), timeout=30, what="all completed")
    assert await db.fetchval("SELECT count(*) FROM recordings") == len(sids)
    assert await redis.exists(keys.parked("a")) == 0


async def test_a_flooding_business_does_not_hold_up_another(
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Business A floods 5,000 recordings; B's 20, sent after, all start before A drains."""
    media.delay_s = 0.01
    limited = settings.model_copy(update={"business_slots": 3, "openai_api_key": None})
    for n in range(2):
        children.append(spawn_consumer(limited, f"c{n}", tmp_path))
    flood = await enqueue(redis, keys, 5_000, business="A", media=media)
    sent = time.monotonic()
    trickle = await enqueue(redis, keys, 20, business="B", media=media)
    await wait_for(lambda: set(trickle) <= set(media.started), timeout=60, what="B's recordings")
    waited = time.monotonic() - sent
    a_started = sum(1 for sid in media.started if sid in set(flood))
    with capsys.disabled():
        print(
            f"\n  fairness: B's 20 recordings all started {waited:.2f}s after they were sent;"
            f" by then A had started {a_started} of 5000"
        )
    assert a_started < len(flood), "A's backlog had not drained when B was done"


async def _equals(value: Any, expected: int) -> bool:
    return int(await value) == expected
