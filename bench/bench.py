"""streamrec benchmark: prints figures and, for each, its reference measured in the same run.

    .venv/bin/python bench/bench.py [--entries 20000] [--only machinery,slots]

Starts its own Redis (and PostgreSQL for the pipeline figures) on free ports, so
it measures the same thing on any machine and touches nothing else. Absolute
numbers drift with machine noise; the ratios, CPU time per entry and Redis
commands per entry move much less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.devservers import LocalRedis
from streamrec.group import ensure_group
from streamrec.keys import Keys
from streamrec.semaphore import Slots
from streamrec.service import redis_client


@dataclass
class Figure:
    """One measured run."""

    name: str
    entries: int
    seconds: float
    cpu_seconds: float
    redis_commands: int

    @property
    def rate(self) -> float:
        return self.entries / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.entries * 1e6

    @property
    def commands(self) -> float:
        return self.redis_commands / self.entries


async def commands_processed(redis: aioredis.Redis) -> int:
    info = await redis.info("stats")
    return int(info["total_commands_processed"])


@contextlib.asynccontextmanager
async def measured(
    redis: aioredis.Redis, name: str, entries: int, out: list[Figure]
) -> AsyncIterator[None]:
    """Measure wall time, this process's CPU time and Redis commands of the block."""
    before = await commands_processed(redis)
    cpu, wall = time.process_time(), time.perf_counter()
    yield
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    # Minus the INFO call itself.
    out.append(
        Figure(name, entries, seconds, cpu_seconds, await commands_processed(redis) - before - 1)
    )


async def fill(redis: aioredis.Redis, keys: Keys, entries: int, businesses: int) -> None:
    """Pre-enqueue ``entries`` small entries spread over ``businesses``."""
    await redis.delete(keys.stream, keys.dead, keys.parked_set)
    await ensure_group(redis, keys)
    batch = 1000
    for start in range(0, entries, batch):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + batch, entries)):
                pipe.xadd(keys.stream, {"business_id": f"b{n % businesses}", "n": str(n)})
            await pipe.execute()


async def raw_loop(redis: aioredis.Redis, keys: Keys, entries: int) -> None:
    """The reference: XREADGROUP COUNT 100, then XACK + XDEL pipelined, no handler."""
    done = 0
    while done < entries:
        reply: Any = await redis.xreadgroup(
            keys.group, "raw", {keys.stream: ">"}, count=100, block=1000
        )
        ids = [i for _, batch in reply or [] for i, _ in batch]
        if not ids:
            break
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xack(keys.stream, keys.group, *ids)
            pipe.xdel(keys.stream, *ids)
            await pipe.execute()
        done += len(ids)


async def machinery(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    slots: bool,
    concurrency: int = 100,
    handler: Callable[[Delivery], Awaitable[None]] | None = None,
) -> int:
    """Drain the stream with the consumer machinery and a no-op (or given) handler."""

    async def noop(delivery: Delivery) -> None:
        return None

    config = ConsumerConfig(name="bench", concurrency=concurrency, block_ms=10)
    consumer = Consumer(
        redis=redis,
        keys=keys,
        handler=handler or noop,
        config=config,
        slots=Slots(redis, keys, default_limit=concurrency) if slots else None,
    )
    await consumer.run(asyncio.Event(), until_idle=True)
    return consumer.processed


async def bench_machinery(redis: aioredis.Redis, entries: int, out: list[Figure]) -> None:
    keys = Keys("bench")
    await fill(redis, keys, entries, businesses=10)
    async with measured(redis, "raw loop (XREADGROUP 100 + XACK/XDEL)", entries, out):
        await raw_loop(redis, keys, entries)
    for slots in (False, True):
        await fill(redis, keys, entries, businesses=10)
        name = f"consumer, no-op handler, slots {'on' if slots else 'off'}"
        async with measured(redis, name, entries, out):
            done = await machinery(redis, keys, slots=slots)
        assert done == entries, (done, entries)


async def bench_io_bound(redis: aioredis.Redis, entries: int, out: list[Figure]) -> None:
    """Handlers that each await 50 ms, 100 in flight: the ideal is 2,000 entries/s."""
    keys = Keys("bench-io")

    async def wait_50ms(delivery: Delivery) -> None:
        await asyncio.sleep(0.05)  # the I/O being simulated

    for slots in (False, True):
        await fill(redis, keys, entries, businesses=10)
        name = f"consumer, 50 ms handler x100, slots {'on' if slots else 'off'}"
        async with measured(redis, name, entries, out):
            await machinery(redis, keys, slots=slots, concurrency=100, handler=wait_50ms)


def report(figures: list[Figure]) -> None:
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}"
    )
    print(f"{'figure':<48} {'entries/s':>10} {'CPU µs/entry':>13} {'Redis cmds/entry':>17}")
    for f in figures:
        print(f"{f.name:<48} {f.rate:>10,.0f} {f.cpu_us:>13.1f} {f.commands:>17.2f}")
    by_name = {f.name: f for f in figures}
    raw = by_name.get("raw loop (XREADGROUP 100 + XACK/XDEL)")
    off = by_name.get("consumer, no-op handler, slots off")
    on = by_name.get("consumer, no-op handler, slots on")
    print()
    if raw and off:
        print(f"consumer (slots off) / raw loop:      {off.rate / raw.rate:6.1%}")
    if raw and on:
        print(f"consumer (slots on) / raw loop:       {on.rate / raw.rate:6.1%}")
    if on and off:
        print(f"slots on / slots off (no-op handler): {on.rate / off.rate:6.1%}")
    io_on = by_name.get("consumer, 50 ms handler x100, slots on")
    io_off = by_name.get("consumer, 50 ms handler x100, slots off")
    if io_off:
        print(f"50 ms handlers, slots off / ideal:    {io_off.rate / 2000:6.1%}")
    if io_on:
        print(f"50 ms handlers, slots on / ideal:     {io_on.rate / 2000:6.1%}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--only", default="machinery,io", help="comma list: machinery,io")
    args = parser.parse_args()
    only = set(args.only.split(","))
    directory = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    server = LocalRedis(directory / "redis").start()
    redis = redis_client(server.url)
    figures: list[Figure] = []
    try:
        if "machinery" in only:
            await bench_machinery(redis, args.entries, figures)
        if "io" in only:
            await bench_io_bound(redis, min(args.entries, 4000), figures)
    finally:
        await redis.aclose()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    report(figures)


if __name__ == "__main__":
    asyncio.run(main())
