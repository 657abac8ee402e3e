"""The monitor: its rate over the last minute, and the gauges it samples, over every
partition and per partition."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as aioredis

from streamrec.consumer import Consumer, ConsumerConfig
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.monitor import Monitor, Rate
from streamrec.partitions import Layout
from tests.test_status import PARTS, build_partitions, nothing, partitioned


@pytest_asyncio.fixture(loop_scope="session")
async def layout(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Layout]:
    """Four partitions of this test's namespace."""
    async with partitioned(redis, keys) as made:
        yield made


def test_rate_is_over_the_last_minute_of_samples() -> None:
    """From one sample the rate is 0; later, the count added since the newest sample
    at least a minute old, per second."""
    rate = Rate()
    assert rate.sample(0, 100.0) == 0.0
    assert rate.sample(10, 105.0) == 2.0
    assert rate.sample(40, 160.0) == round(40 / 60, 2)
    # (100, 0) is now older than (105, 10), which is itself a minute old: it goes.
    assert rate.sample(70, 165.0) == 1.0
    assert rate.sample(70, 400.0) == 0.0


async def test_a_tick_sets_the_total_and_the_partition_gauges(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """After a tick the group gauges hold the sums over the partitions, and each
    ``streamrec_partition_*`` gauge, labelled with its partition, that partition's own."""
    await build_partitions(redis, layout)
    metrics = Metrics()
    consumer = Consumer(
        redis=redis, keys=layout, handler=nothing, config=ConsumerConfig(name="gauged")
    )
    monitor = Monitor(redis=redis, layout=layout, consumer=consumer, metrics=metrics)
    await monitor.tick()
    assert await redis.hexists(layout.home.heartbeats, "gauged")

    def value(name: str, partition: int | None = None) -> float | None:
        labels = None if partition is None else {"partition": str(partition)}
        return metrics.registry.get_sample_value(name, labels)

    assert value("streamrec_pending_entries") == 5
    assert value("streamrec_lag_entries") == 4
    assert value("streamrec_dead_letters") == 3
    assert (value("streamrec_oldest_pending_age_seconds") or 0) >= 90
    per = {
        name: [value(f"streamrec_partition_{name}", i) for i in range(PARTS)]
        for name in ("pending_entries", "lag_entries", "dead_letters")
    }
    assert per == {
        "pending_entries": [2, 0, 0, 3],
        "lag_entries": [1, 0, 2, 1],
        "dead_letters": [0, 0, 1, 2],
    }
    ages = [value("streamrec_partition_oldest_pending_age_seconds", i) or 0 for i in range(PARTS)]
    assert 30 <= ages[0] < ages[3]
    assert ages[1:3] == [0, 0]
