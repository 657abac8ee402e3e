"""A benchmark consumer process: drains the stream with a no-op handler through the Python API.

    python bench/worker.py REDIS_URL NAMESPACE NAME [--slots] [--concurrency 100]
        [--latency] [--expect N] [--partitions N] [--cluster]

Prints one JSON line: entries processed, wall and CPU seconds, peak RSS, and
(with --latency) each entry's pickup latency from its ``t`` field (enqueue
time, seconds since the epoch) to the handler's start.

With ``--partitions N`` the consumer serves every partition of
``Layout(NAMESPACE, N)`` (slots per partition); ``--cluster`` makes REDIS_URL a
seed node of a Redis Cluster, as ``STREAMREC_REDIS_CLUSTER=true`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamrec import logging as logs
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.keys import Keys
from streamrec.loops import loop_factory, tune_gc
from streamrec.partitions import Layout
from streamrec.semaphore import Slots
from streamrec.service import redis_client


def rss_mib() -> float:
    """Resident set size now, from /proc (peak from getrusage where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def raw_burst(
    redis: Any, keys: Keys, args: argparse.Namespace, handler: Any
) -> dict[str, Any]:
    """The reference for a live burst: XREADGROUP (blocking when idle), each entry's handler
    in a task of its own with at most --concurrency at once, XACK + XDEL as each ends."""
    done = in_flight = 0
    freed = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def run(entry_id: str) -> None:
        nonlocal done, in_flight
        await handler(None)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xack(keys.stream, keys.group, entry_id)
            pipe.xdel(keys.stream, entry_id)
            await pipe.execute()
        done += 1
        in_flight -= 1
        freed.set()

    cpu = time.process_time()
    while done < args.expect:
        while in_flight >= args.concurrency:
            freed.clear()
            await freed.wait()
        free = args.concurrency - in_flight
        reply = await redis.xreadgroup(
            keys.group, args.name, {keys.stream: ">"}, count=free, block=2_000
        )
        for _, batch in reply or []:
            for entry_id, _ in batch:
                in_flight += 1
                task = asyncio.create_task(run(entry_id))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    return {"processed": done, "cpu_s": time.process_time() - cpu}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("namespace")
    parser.add_argument("name")
    parser.add_argument("--slots", action="store_true")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    parser.add_argument(
        "--python-gc", action="store_true", help="Python's GC thresholds, not streamrec's"
    )
    parser.add_argument("--expect", type=int, default=0, help="stop after this many entries")
    parser.add_argument("--partitions", type=int, default=0, help="serve Layout(NAMESPACE, N)")
    parser.add_argument("--sleep-ms", type=float, default=0.0, help="each handler awaits this")
    parser.add_argument(
        "--raw", action="store_true", help="the reference: a bare XREADGROUP loop, not streamrec"
    )
    parser.add_argument("--cluster", action="store_true", help="REDIS_URL is a cluster node")
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    # Draining: a short block ends the run soon after the stream is empty. Latency:
    # a long one, as in production, so the consumer sleeps in XREADGROUP.
    block_ms = 2_000 if args.latency or args.sleep_ms else 10
    redis = redis_client(args.redis_url, block_ms=block_ms, cluster=args.cluster)
    # The slots are given on the namespace's keys; with a layout, the consumer
    # applies them to each partition's.
    keys = Keys(args.namespace)
    served: Keys | Layout = Layout(args.namespace, args.partitions) if args.partitions else keys
    latencies: list[float] = []
    stop = asyncio.Event()
    last_done = 0.0

    async def handler(delivery: Delivery) -> None:
        nonlocal last_done
        if args.latency:
            latencies.append(time.time() - float(delivery.fields["t"]))
        if args.sleep_ms:
            await asyncio.sleep(args.sleep_ms / 1000)  # the I/O being simulated
            last_done = time.time()

    if args.raw:
        result = await raw_burst(redis, keys, args, handler)
        print(json.dumps({**result, "last_done": last_done}))
        await redis.aclose()
        return

    consumer = Consumer(
        redis=redis,
        keys=served,
        handler=handler,
        config=ConsumerConfig(name=args.name, concurrency=args.concurrency, block_ms=block_ms),
        slots=Slots(redis, keys, default_limit=args.concurrency) if args.slots else None,
    )
    cpu, wall = time.process_time(), time.perf_counter()
    if args.expect:
        run = asyncio.create_task(consumer.run(stop))
        while consumer.processed < args.expect and not run.done():
            await asyncio.sleep(0.01)  # polling a counter of this process only
        stop.set()
        await run
    else:
        await consumer.run(stop, until_idle=True)
    result = {
        "processed": consumer.processed,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "rss_mib": rss_mib(),
        "latencies": latencies,
        "last_done": last_done,
    }
    await redis.aclose()
    print(json.dumps(result))


if __name__ == "__main__":
    if "--python-gc" not in sys.argv:
        tune_gc()  # as python -m streamrec does
    with asyncio.Runner(loop_factory=loop_factory("--uvloop" in sys.argv)) as runner:
        runner.run(main())
