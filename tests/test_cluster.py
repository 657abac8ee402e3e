"""streamrec on a real Redis Cluster (3 primaries, 3 replicas, from ``tests.cluster``).

End to end through real processes with 8 partitions: signed callbacks to
``serve``, three ``consume`` processes, one SIGKILLed, and a primary SIGKILLed
mid-run so its replica takes over. With replica acks on, nothing accepted is
lost and nothing is done twice; the consumers carry on without a restart.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamrec import partitions
from streamrec.confirm import Unconfirmed
from streamrec.connections import direct
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.partitions import Layout
from streamrec.producer import Enqueuer
from streamrec.retry import RetryPolicy
from streamrec.semaphore import Slots
from streamrec.service import redis_client
from tests.chaos import ChaosConfig, run
from tests.cluster import LocalCluster
from tests.test_partitions import _event


@pytest.fixture
async def cluster_redis(redis_cluster: LocalCluster) -> Any:
    client = redis_client(redis_cluster.seed_url, cluster=True)
    yield client
    await client.aclose()


async def test_callbacks_and_consumers_across_8_partitions_on_3_primaries(
    cluster_redis: aioredis.Redis, redis_cluster: LocalCluster, namespace: str
) -> None:
    """The enqueue script, blocking reads, slots, acks: each partition on its own primary,
    every entry run once, one business at a time and in its stream order."""
    layout = Layout(namespace, 8)
    await partitions.claim(cluster_redis, layout)
    assert len({redis_cluster.primary_for(part.stream).port for part in layout}) == 3
    enqueuer = Enqueuer(cluster_redis, layout, dedupe_ttl_s=60, replica_acks=1)
    events = [_event(f"b{n % 20}") for n in range(200)]
    added = await asyncio.gather(*(enqueuer.enqueue(e) for e in events))
    assert all(new for new, _ in added)
    again = await asyncio.gather(*(enqueuer.enqueue(e) for e in events[:20]))
    assert not any(new for new, _ in again)
    order: dict[str, list[str]] = {}
    at_work: dict[str, int] = {}
    peak = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal peak
        business = delivery.fields["business_id"]
        order.setdefault(business, []).append(delivery.fields["recording_sid"])
        at_work[business] = at_work.get(business, 0) + 1
        peak = max(peak, at_work[business])
        await asyncio.sleep(0.002)  # the handler's work
        at_work[business] -= 1

    config = ConsumerConfig(
        name="c1",
        concurrency=16,
        claim_idle_ms=5_000,
        block_ms=100,
        retry=RetryPolicy(max_deliveries=5, base_s=0.005, max_s=0.02),
    )
    slots = Slots(cluster_redis, layout.home, default_limit=1, lease_ms=5_000)
    consumer = Consumer(
        redis=cluster_redis, keys=layout, handler=handler, config=config, slots=slots
    )
    await consumer.run(asyncio.Event(), until_idle=True)
    assert consumer.processed == 200
    assert peak == 1
    # A woken entry is added again (a new id), so its order is its first entry's id.
    first_id = {e.recording_sid: i for e, (_, i) in zip(events, added, strict=True)}
    for business, ran in order.items():
        assert ran == sorted(ran, key=lambda sid: _id_key(first_id[sid])), business
    for part in layout:
        assert await cluster_redis.xlen(part.stream) == 0
        assert (await cluster_redis.xpending(part.stream, part.group))["pending"] == 0


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq)


async def test_nothing_is_lost_through_a_consumer_kill_and_a_primary_failover(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1,000 signed callbacks over 20 businesses, P = 8, 3 consumers: one consumer and one
    primary SIGKILLed mid-run. Lost 0, enqueued once each, no work repeated beyond what
    the kill explains, slots held, and no consumer needed a restart."""
    config = ChaosConfig(
        recordings=1_000,
        duplicate_share=0.2,
        businesses=20,
        consumers=3,
        consumer_kills=1,
        kill_every_s=2.0,
        redis_kill_after_s=4.0,
        postgres_stops=0,
        webhook_outages=0,
        send_rate=150,
        reconcile_interval_s=1.0,
        partitions=8,
        cluster=True,
        replica_acks=1,
        timeout_s=240,
    )
    report = await run(config)
    with capsys.disabled():
        print("\n  cluster run (P = 8, 3 + 3 nodes):\n" + report.render())
    assert report.consumer_kills == 1
    assert report.redis_kills == 1
    assert report.consumer_exits == 0, "a consumer had to be restarted after the failover"
    assert report.dead_letters == 0
    # Lost 0, enqueued once, no stage repeated past what the kills explain, nothing left
    # pending or parked, no business over its slot limit.
    assert report.ok, report.render()
    assert math.isfinite(report.failover_recovery_s)


@pytest.fixture
def namespace() -> str:
    """A namespace of its own on the session's cluster."""
    return f"test-{uuid.uuid4().hex[:12]}"


async def test_a_callback_is_confirmed_by_the_replica_of_its_own_partition(
    fresh_cluster: LocalCluster,
) -> None:
    """With one replica ack asked, a callback whose partition's primary lost its replica is
    not confirmed (503), while one on a primary with its replica is. The confirmation is
    the WAIT of the connection that wrote the entry, not of some other node."""
    layout = Layout("acks", 8)
    seed = fresh_cluster.seed_url
    client = redis_client(seed, cluster=True)
    try:
        lonely = next(p for p in layout if fresh_cluster.primary_for(p.stream).url != seed)
        primary = fresh_cluster.primary_for(lonely.stream)
        replica = next(
            node
            for node in fresh_cluster.replicas()
            if int(node.client().info("replication")["master_port"]) == primary.port
        )
        fresh_cluster.kill(replica)
        served = next(p for p in layout if fresh_cluster.primary_for(p.stream).url == seed)
        business = {p.partition: f"b{n}" for n in range(200) for p in [layout.of(f"b{n}")]}
        # WAIT blocks for most of the deadline; the rest must hold the round trips, so the
        # client has learnt the cluster before, and the deadline leaves slack on a busy machine.
        await partitions.claim(client, layout)
        enqueuer = Enqueuer(client, layout, dedupe_ttl_s=60, replica_acks=1, deadline_ms=3_000)
        with pytest.raises(Unconfirmed, match="0 of 1 replicas acknowledged"):
            await enqueuer.enqueue(_event(business[lonely.partition]))
        added, _ = await enqueuer.enqueue(_event(business[served.partition]))
        assert added
    finally:
        nodes = direct(client)
        if nodes is not None:
            await nodes.aclose()
        await client.aclose()
