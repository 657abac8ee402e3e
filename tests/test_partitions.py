"""Partitions on one Redis: the key layout, the recorded count, and consumers serving all.

The same machinery on a real Redis Cluster is tested in ``tests/test_cluster.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from streamrec import partitions
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.partitions import Layout, PartitionsChanged
from streamrec.producer import Enqueuer
from streamrec.retry import RetryPolicy
from streamrec.semaphore import Slots
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.processes import environment
from tests.standins import callback_params


def test_one_partition_is_the_namespace_layout_of_before() -> None:
    """P = 1: every key is what it always was, so an upgrade migrates nothing."""
    (only,) = Layout("streamrec", 1).partitions
    assert only == Keys("streamrec")
    assert only.stream == "{streamrec}:recordings"
    assert only.seen("RE1") == "{streamrec}:seen:RE1"
    assert Layout("streamrec", 1).of("any-business") == only


@pytest.mark.parametrize("count", [2, 3, 4, 8, 16, 100])
def test_partition_tags_spread_evenly_over_the_cluster_slots(count: int) -> None:
    """Partition i's keys hash into the i-th of ``count`` equal ranges of the 16,384 slots."""
    layout = Layout("streamrec", count)
    for part in layout:
        slot = key_slot(part.stream.encode())
        assert part.partition * REDIS_CLUSTER_HASH_SLOTS // count <= slot
        assert slot < (part.partition + 1) * REDIS_CLUSTER_HASH_SLOTS // count
        # Every key of the partition is in that one slot: scripts stay single-slot.
        for key in (
            part.dead,
            part.seen("RE1"),
            part.slots("b"),
            part.parked("b"),
            part.parked_set,
        ):
            assert key_slot(key.encode()) == slot
    assert len({part.tag for part in layout}) == count
    assert layout.home == Keys("streamrec")


def test_a_business_belongs_to_one_partition_for_every_process() -> None:
    """The mapping is a stable hash (not Python's per-process hash) and uses every partition."""
    businesses = [f"business-{n}" for n in range(400)]
    first = [partitions.index_of(b, 8) for b in businesses]
    code = "import sys; from streamrec.partitions import index_of; " + (
        "print(','.join(str(index_of(f'business-{n}', 8)) for n in range(400)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert [int(x) for x in other.strip().split(",")] == first
    assert set(Counter(first)) == set(range(8))


async def test_the_partition_count_is_recorded_and_a_different_one_refused(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """The first start records the count; a start with another count is refused, saying why."""
    await partitions.claim(redis, Layout(keys.namespace, 4))
    await partitions.claim(redis, Layout(keys.namespace, 4))  # the same count: fine
    assert await partitions.recorded(redis, keys.namespace) == 4
    with pytest.raises(PartitionsChanged, match=r"STREAMREC_PARTITIONS is 2.*has 4 partitions"):
        await partitions.claim(redis, Layout(keys.namespace, 2))


async def test_a_consumer_started_with_another_count_exits_with_a_clear_message(
    settings: Settings, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """``consume`` with STREAMREC_PARTITIONS other than the recorded count exits 2 at once."""
    await partitions.claim(redis, Layout(keys.namespace, 8))
    env = environment(settings, STREAMREC_PARTITIONS="4")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "streamrec", "consume"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "STREAMREC_PARTITIONS is 4" in done.stderr
    assert "has 8 partitions" in done.stderr


def _event(business: str) -> RecordingEvent:
    params = callback_params()
    return RecordingEvent.create(
        recording_sid=params["RecordingSid"],
        call_sid=params["CallSid"],
        account_sid=params["AccountSid"],
        business_id=business,
        status="completed",
        duration_s="1",
        channels="1",
        source="DialVerb",
        origin="webhook",
    )


async def test_callbacks_go_to_their_business_partition_once(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Each event lands on its business's partition stream, its marker beside it; a repeat is
    a duplicate there."""
    layout = Layout(keys.namespace, 4)
    enqueuer = Enqueuer(redis, layout, dedupe_ttl_s=60)
    events = [_event(f"b{n}") for n in range(40)]
    results = await asyncio.gather(*(enqueuer.enqueue(e) for e in events))
    assert all(added for added, _ in results)
    again = await asyncio.gather(*(enqueuer.enqueue(e) for e in events[:10]))
    assert not any(added for added, _ in again)
    for event, (_, entry_id) in zip(events, results, strict=True):
        home = layout.of(event.business_id)
        found: Any = await redis.xrange(home.stream, entry_id, entry_id)
        assert found[0][1]["recording_sid"] == event.recording_sid
        assert await redis.get(home.seen(event.recording_sid)) == entry_id
    lengths = [await redis.xlen(part.stream) for part in layout]
    assert sum(lengths) == 40
    assert all(lengths), "40 businesses over 4 partitions left one empty"


def _config(name: str, concurrency: int) -> ConsumerConfig:
    return ConsumerConfig(
        name=name,
        concurrency=concurrency,
        claim_idle_ms=2_000,
        block_ms=50,
        retry=RetryPolicy(max_deliveries=5, base_s=0.005, max_s=0.02),
    )


async def test_one_consumer_serves_every_partition_within_its_concurrency(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Entries on 4 partitions all run once; at most the concurrency run at once, since every
    partition had entries waiting (a blocking read of an idle one is the only overshoot)."""
    layout = Layout(keys.namespace, 4)
    seen: Counter[str] = Counter()
    running = peak = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.002)  # the handler's work
        seen[delivery.fields["n"]] += 1
        running -= 1

    for n in range(400):
        await redis.xadd(layout.partitions[n % 4].stream, {"n": str(n)})
    consumer = Consumer(redis=redis, keys=layout, handler=handler, config=_config("c1", 8))
    await consumer.run(asyncio.Event(), until_idle=True)
    assert seen == Counter({str(n): 1 for n in range(400)})
    assert peak <= 8
    for part in layout:
        assert await redis.xlen(part.stream) == 0
        assert (await redis.xpending(part.stream, part.group))["pending"] == 0


async def test_a_partition_with_a_backlog_does_not_starve_the_others(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Partition 0 holds 2,000 slow entries; entries added to partitions 1-3 afterwards run
    long before partition 0's backlog is through."""
    layout = Layout(keys.namespace, 4)
    order: list[str] = []
    stop = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        await asyncio.sleep(0.01)  # the handler's work
        order.append(delivery.fields["n"])

    for n in range(2_000):
        await redis.xadd(layout.partitions[0].stream, {"n": f"backlog-{n}"})
    consumer = Consumer(redis=redis, keys=layout, handler=handler, config=_config("c1", 8))
    task = asyncio.create_task(consumer.run(stop))
    try:
        await wait_for(lambda: len(order) >= 50, what="the backlog under way")
        for part in layout.partitions[1:]:
            for n in range(10):
                await redis.xadd(part.stream, {"n": f"p{part.partition}-{n}"})
        await wait_for(
            lambda: sum(1 for n in order if n.startswith("p")) == 30, what="the other partitions"
        )
        assert sum(1 for n in order if n.startswith("backlog")) < 1_000
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_slots_hold_per_business_across_partitions(redis: aioredis.Redis, keys: Keys) -> None:
    """Limit 2 per business, 12 businesses on 4 partitions, 2 consumers: no business ever has
    more than 2 at work, and every entry runs once."""
    layout = Layout(keys.namespace, 4)
    at_work: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    seen: Counter[str] = Counter()

    def handler_for() -> object:
        async def handler(delivery: Delivery) -> None:
            business = delivery.fields["business_id"]
            at_work[business] += 1
            peak[business] = max(peak[business], at_work[business])
            await asyncio.sleep(0.005)  # the handler's work
            at_work[business] -= 1
            seen[delivery.fields["n"]] += 1

        return handler

    for n in range(240):
        business = f"b{n % 12}"
        await redis.xadd(layout.of(business).stream, {"n": str(n), "business_id": business})
    slots = Slots(redis, layout.home, default_limit=2, lease_ms=2_000)
    consumers = [
        Consumer(
            redis=redis,
            keys=layout,
            handler=handler_for(),  # type: ignore[arg-type]
            config=_config(f"c{i}", 8),
            slots=slots,
        )
        for i in range(2)
    ]
    await asyncio.gather(*(c.run(asyncio.Event(), until_idle=True) for c in consumers))
    assert seen == Counter({str(n): 1 for n in range(240)})
    assert max(peak.values()) <= 2
    for part in layout:
        assert await redis.xlen(part.stream) == 0
        assert await redis.zcard(part.parked_set) == 0
