"""The generic stream machinery, driven with plug-in handlers through the Python API."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from streamrec.consumer import Consumer, ConsumerConfig, Delivery, Handler, ensure_group
from streamrec.devservers import LocalRedis
from streamrec.keys import Keys
from streamrec.retry import PermanentError, RetryPolicy, TransientError
from streamrec.semaphore import Slots
from streamrec.service import redis_client
from tests.conftest import entries, wait_for


def make(
    redis: aioredis.Redis,
    keys: Keys,
    handler: Handler,
    *,
    name: str = "c1",
    concurrency: int = 8,
    claim_idle_ms: int = 1_000,
    max_deliveries: int = 5,
    grace_s: float = 5.0,
    on_dead: Callable[[Delivery, str], Awaitable[None]] | None = None,
) -> Consumer:
    config = ConsumerConfig(
        name=name,
        concurrency=concurrency,
        claim_idle_ms=claim_idle_ms,
        block_ms=50,
        shutdown_grace_s=grace_s,
        retry=RetryPolicy(max_deliveries=max_deliveries, base_s=0.005, max_s=0.02),
    )
    return Consumer(redis=redis, keys=keys, handler=handler, config=config, on_dead=on_dead)


async def add(redis: aioredis.Redis, keys: Keys, count: int) -> list[str]:
    return [str(await redis.xadd(keys.stream, {"n": str(i)})) for i in range(count)]


@contextlib.asynccontextmanager
async def running_consumer(consumer: Consumer) -> AsyncIterator[asyncio.Event]:
    """Run the consumer in the background; stop it and wait for it on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def pending(redis: aioredis.Redis, keys: Keys) -> int:
    return int((await redis.xpending(keys.stream, keys.group))["pending"])


async def test_handled_entries_are_acked_and_deleted(redis: aioredis.Redis, keys: Keys) -> None:
    """Each entry runs once; afterwards the stream holds nothing and nothing is pending."""
    seen: Counter[str] = Counter()

    async def handler(delivery: Delivery) -> None:
        seen[delivery.fields["n"]] += 1

    await add(redis, keys, 50)
    await make(redis, keys, handler).run(asyncio.Event(), until_idle=True)
    assert seen == Counter({str(i): 1 for i in range(50)})
    assert await redis.xlen(keys.stream) == 0
    assert await pending(redis, keys) == 0


async def test_in_flight_never_exceeds_concurrency(redis: aioredis.Redis, keys: Keys) -> None:
    """No more handlers run at once than the configured concurrency."""
    now = peak = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.005)  # simulated work, so handlers overlap
        now -= 1

    await add(redis, keys, 40)
    await make(redis, keys, handler, concurrency=3).run(asyncio.Event(), until_idle=True)
    assert peak == 3


async def test_transient_failures_are_retried_and_counted(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A transient failure is retried; each attempt is a delivery in the PEL."""
    deliveries: list[int] = []

    async def handler(delivery: Delivery) -> None:
        deliveries.append(delivery.deliveries)
        if len(deliveries) < 3:
            raise TransientError("try again")

    await add(redis, keys, 1)
    await make(redis, keys, handler).run(asyncio.Event(), until_idle=True)
    assert deliveries == [1, 2, 3]
    assert await redis.xlen(keys.stream) == 0
    assert await redis.xlen(keys.dead) == 0


async def test_permanent_failure_is_dead_lettered_at_once(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A permanent error moves the entry to the dead letters with its error, at once."""
    calls = 0
    hooked: list[str] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("bad audio")

    async def on_dead(delivery: Delivery, reason: str) -> None:
        hooked.append(reason)

    [entry_id] = await add(redis, keys, 1)
    await make(redis, keys, handler, on_dead=on_dead).run(asyncio.Event(), until_idle=True)
    assert calls == 1
    assert hooked == ["PermanentError: bad audio"]
    [(_, fields)] = await entries(redis, keys.dead)
    assert fields["n"] == "0"
    assert fields["error"] == "PermanentError: bad audio"
    assert fields["attempts"] == "1"
    assert fields["origin_id"] == entry_id
    assert fields["consumer"] == "c1"
    assert await redis.xlen(keys.stream) == 0
    assert await pending(redis, keys) == 0


async def test_poison_entry_stops_after_max_deliveries(redis: aioredis.Redis, keys: Keys) -> None:
    """An entry that always fails runs max_deliveries times, then is dead and stays dead."""
    calls = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("always broken")

    await add(redis, keys, 1)
    await make(redis, keys, handler, max_deliveries=3).run(asyncio.Event(), until_idle=True)
    assert calls == 3
    [(_, fields)] = await entries(redis, keys.dead)
    assert fields["attempts"] == "3"
    assert fields["error"] == "RuntimeError: always broken"
    await make(redis, keys, handler, max_deliveries=3).run(asyncio.Event(), until_idle=True)
    assert calls == 3
    assert await redis.xlen(keys.stream) == 0


async def test_entries_of_a_dead_consumer_are_reclaimed(redis: aioredis.Redis, keys: Keys) -> None:
    """Entries left pending by a consumer that vanished are finished by another."""
    await add(redis, keys, 5)
    await ensure_group(redis, keys)
    await redis.xreadgroup(keys.group, "ghost", {keys.stream: ">"}, count=5)
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.deliveries)

    consumer = make(redis, keys, handler, claim_idle_ms=200)
    async with running_consumer(consumer):
        await wait_for(lambda: len(seen) == 5, what="reclaimed entries to run")
        await wait_for(lambda: consumer.processed == 5, what="acks")
    assert seen == [2] * 5
    assert await pending(redis, keys) == 0


async def test_entry_past_the_cap_is_dead_lettered_without_running(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """An entry that keeps killing its consumers is dead-lettered when reclaimed past the cap."""
    [entry_id] = await add(redis, keys, 1)
    await ensure_group(redis, keys)
    await redis.xreadgroup(keys.group, "ghost", {keys.stream: ">"}, count=1)
    await redis.xclaim(keys.stream, keys.group, "ghost", 0, [entry_id], retrycount=3, justid=True)
    calls = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal calls
        calls += 1

    consumer = make(redis, keys, handler, claim_idle_ms=100, max_deliveries=3)
    async with running_consumer(consumer):
        await wait_for(lambda: consumer.dead_lettered == 1, what="dead letter")
    assert calls == 0
    [(_, fields)] = await entries(redis, keys.dead)
    assert fields["error"] == "delivered 3 times without finishing"


async def test_live_consumer_keeps_its_long_job(redis: aioredis.Redis, keys: Keys) -> None:
    """A job running longer than the claim idle time is not handed to another consumer."""
    release = asyncio.Event()
    started: list[str] = []

    async def slow(delivery: Delivery) -> None:
        started.append("a")
        await release.wait()

    async def other(delivery: Delivery) -> None:
        started.append("b")

    await add(redis, keys, 1)
    a = make(redis, keys, slow, name="a", claim_idle_ms=300)
    b = make(redis, keys, other, name="b", claim_idle_ms=300)
    async with running_consumer(a):
        await wait_for(lambda: started == ["a"], what="a to start the job")
        async with running_consumer(b):
            # Eight full reclaim scans by b span well over twice the claim idle time.
            await wait_for(lambda: b.reclaim_passes >= 8, what="b's reclaim scans")
            [entry] = await redis.xpending_range(keys.stream, keys.group, "-", "+", 1)
            assert entry["consumer"] == "a"
            assert int(entry["time_since_delivered"]) < 300
        release.set()
        await wait_for(lambda: a.processed == 1, what="a to finish")
    assert started == ["a"]


async def test_stop_lets_in_flight_work_finish(redis: aioredis.Redis, keys: Keys) -> None:
    """On stop, a handler already running finishes and its entry is acked."""
    release = asyncio.Event()
    began = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        began.set()
        await release.wait()

    await add(redis, keys, 1)
    consumer = make(redis, keys, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(began.wait(), 10)
    stop.set()
    release.set()
    await asyncio.wait_for(task, 10)
    assert consumer.processed == 1
    assert await redis.xlen(keys.stream) == 0


async def test_work_past_the_grace_period_is_left_for_reclaim(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Work still running after the grace period stays pending and another consumer does it."""
    began = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        began.set()
        await asyncio.Event().wait()

    done: list[str] = []

    async def quick(delivery: Delivery) -> None:
        done.append(delivery.entry_id)

    [entry_id] = await add(redis, keys, 1)
    first = make(redis, keys, stuck, grace_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await asyncio.wait_for(began.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert await pending(redis, keys) == 1
    second = make(redis, keys, quick, name="c2", claim_idle_ms=100)
    async with running_consumer(second):
        await wait_for(lambda: second.processed == 1, what="reclaim by c2")
    assert done == [entry_id]


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
async def test_consumer_rides_out_a_redis_restart(tmp_path: Path, appendonly: bool) -> None:
    """A consumer keeps going when its Redis is stopped and started again, data kept or not."""
    server = LocalRedis(tmp_path / "redis", appendonly=appendonly).start()
    client = redis_client(server.url, block_ms=50)
    keys = Keys("restart")
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.fields["n"])

    try:
        await add(client, keys, 3)
        consumer = make(client, keys, handler)
        async with running_consumer(consumer):
            await wait_for(lambda: consumer.processed == 3, what="first batch")
            server.stop()
            server.start()
            await add(client, keys, 3)
            await wait_for(lambda: consumer.processed == 6, what="batch after restart")
        assert sorted(seen) == ["0", "0", "1", "1", "2", "2"]
    finally:
        await client.aclose()
        server.stop()


@pytest.mark.parametrize("count", [0, 1])
async def test_until_idle_returns_on_an_empty_stream(
    redis: aioredis.Redis, keys: Keys, count: int
) -> None:
    """With until_idle the consumer returns once nothing is left."""
    await add(redis, keys, count)

    async def handler(delivery: Delivery) -> None:
        return None

    consumer = make(redis, keys, handler)
    await asyncio.wait_for(consumer.run(asyncio.Event(), until_idle=True), 10)
    assert consumer.processed == count


# Partial failures: ownership lost while a handler runs ---------------------------------------


@contextlib.asynccontextmanager
async def without_scripts(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client whose Lua calls Redis refuses (ACL), so every claim renewal fails.

    Reads, XAUTOCLAIM and acks still work: the consumer's main loop runs on while
    its renewals fail, as in a Redis stall that the main loop outlives.
    """
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    user = f"noscripts-{uuid.uuid4().hex[:8]}"
    await admin.acl_setuser(
        user, enabled=True, nopass=True, keys=["*"], channels=["*"],
        commands=["+@all", "-evalsha", "-eval", "-script"],
    )  # fmt: skip
    client = aioredis.Redis.from_url(redis_url, username=user, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_an_entry_runs_once_at_a_time_while_renewals_fail(
    redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """Renewals failing past the claim time never start a second run of an entry in work."""
    running: Counter[str] = Counter()
    peak = 0
    runs = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal peak, runs
        runs += 1
        running[delivery.entry_id] += 1
        peak = max(peak, running[delivery.entry_id])
        try:
            await asyncio.Event().wait()  # a transcription that outlasts the claim
        finally:
            running[delivery.entry_id] -= 1

    await add(redis, keys, 1)
    async with without_scripts(redis_url) as client:
        consumer = make(client, keys, handler, claim_idle_ms=200, grace_s=0.05)
        async with running_consumer(consumer):
            # Eight reclaim scans span well over the claim time, twice over.
            await wait_for(lambda: consumer.reclaim_passes >= 8 and runs >= 2, what="reclaims")
    assert peak == 1


def two_stages() -> tuple[asyncio.Event, list[str], Handler]:
    """A handler whose first stage never ends by itself: (started, stages run, handler)."""
    downloaded = asyncio.Event()
    stages: list[str] = []

    async def handler(delivery: Delivery) -> None:
        stages.append("download")
        downloaded.set()
        await asyncio.Event().wait()  # the download, still under way
        stages.append("transcribe")

    return downloaded, stages, handler


async def test_a_claim_lost_mid_job_stops_it_before_its_next_stage(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Once another consumer owns the entry, the handler is stopped and does no more stages."""
    downloaded, stages, handler = two_stages()
    [entry_id] = await add(redis, keys, 1)
    consumer = make(redis, keys, handler, claim_idle_ms=300)
    async with running_consumer(consumer):
        await asyncio.wait_for(downloaded.wait(), 10)
        # Another consumer took the entry over (as after a stall longer than the claim time).
        await redis.xclaim(keys.stream, keys.group, "other", 0, [entry_id], justid=True)
        await wait_for(lambda: consumer.in_flight == 0, what="the job to stop")
    assert stages == ["download"]
    [entry] = await redis.xpending_range(keys.stream, keys.group, "-", "+", 1)
    assert entry["consumer"] == "other"


async def test_a_slot_lease_lost_mid_job_stops_it_before_its_next_stage(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Once the entry's slot went to another entry, the handler is stopped: the limit holds."""
    downloaded, stages, handler = two_stages()
    await redis.xadd(keys.stream, {"business_id": "a"})
    config = ConsumerConfig(name="c1", claim_idle_ms=1_000, block_ms=50)
    slots = Slots(redis, keys, default_limit=1, lease_ms=300)
    consumer = Consumer(redis=redis, keys=keys, handler=handler, config=config, slots=slots)
    async with running_consumer(consumer):
        await asyncio.wait_for(downloaded.wait(), 10)
        # The lease lapsed (a stall) and another entry took the business's only slot.
        seconds, _ = await redis.time()
        await redis.delete(keys.slots("a"))
        await redis.zadd(keys.slots("a"), {"other": (int(seconds) + 60) * 1000})
        await wait_for(lambda: consumer.in_flight == 0, what="the job to stop")
    assert stages == ["download"]
    assert await redis.zrange(keys.slots("a"), 0, -1) == ["other"]
