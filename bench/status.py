"""streamrec status benchmark: ``status.collect`` with a million dedupe markers in Redis.

    .venv/bin/python bench/status.py [--markers 1000000] [--rounds 5] [--original PATH]

``streamrec status`` (``status.collect``), ``streamrec check`` (``health.check``,
what every container health check runs) and the heartbeat read they share
(``status.heartbeats``) are timed against a Redis holding ``--markers``
``seen:`` keys, the dedupe markers the webhook keeps for seven days (a busy
account holds millions), beside a stream with a group, pending entries, dead
letters and three beating consumers.

Each measurement runs in a child process of its own against a Redis of its own
(temporary directory, free port, stopped and removed afterwards), so two runs
never share a keyspace. With ``--original PATH`` (a checkout of other code,
e.g. ``git worktree add /tmp/orig-status HEAD`` taken before a change) the same
measurement runs again with that checkout's streamrec, and both are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# A measuring child imports the streamrec of the checkout its parent names.
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT") or str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from streamrec import health, status
from streamrec.consumer import Consumer, ConsumerConfig
from streamrec.delivery import Delivery
from streamrec.devservers import LocalRedis
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.monitor import Monitor

ROOT = Path(__file__).resolve().parents[1]
CODE_ROOT = sys.path[0]
"""The checkout whose streamrec this process imported."""
NAMESPACE = "bench-status"
BATCH = 100_000  # markers per Lua call: each call blocks Redis for a fraction of a second
RESULT_MARK = "STATUS_RESULT "

FILL = """
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  redis.call('SET', ARGV[1] .. i, '1700000000000-0', 'EX', 604800)
end
"""


async def nothing(delivery: Delivery) -> None:
    """The handler of consumers that only beat."""


async def build(redis: aioredis.Redis, keys: Keys, markers: int) -> None:
    """The markers, a stream of 100 entries with a group, 15 pending, 2 dead, 3 beating."""
    prefix = keys.seen("RE")
    for start in range(0, markers, BATCH):
        await redis.eval(FILL, 0, prefix, str(start), str(min(start + BATCH, markers) - 1))
    for n in range(100):
        await redis.xadd(keys.stream, {"v": "1", "n": str(n)})
    await redis.xgroup_create(keys.stream, keys.group, id="0")
    await redis.xreadgroup(keys.group, "c1", {keys.stream: ">"}, count=10)
    await redis.xreadgroup(keys.group, "c2", {keys.stream: ">"}, count=5)
    for n in range(2):
        await redis.xadd(keys.dead, {"v": "1", "n": str(n), "error": "PermanentError: boom"})
    for name in ("c1", "c2", "c3"):
        consumer = Consumer(
            redis=redis, keys=keys, handler=nothing, config=ConsumerConfig(name=name)
        )
        monitor = Monitor(
            redis=redis, layout=keys, consumer=consumer, metrics=Metrics(), interval_s=600
        )
        await monitor.tick()


async def timed(call: Callable[[], Awaitable[Any]], rounds: int) -> dict[str, float]:
    """Milliseconds per call over ``rounds`` calls: median, min, max."""
    took = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        took.append((time.perf_counter() - started) * 1000)
    return {
        "median": round(statistics.median(took), 2),
        "min": round(min(took), 2),
        "max": round(max(took), 2),
    }


async def measure(markers: int, rounds: int) -> dict[str, Any]:
    """Build the state on a Redis of our own and time the three reads."""
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-status-") as scratch:
        server = LocalRedis(Path(scratch) / "redis").start()
        redis = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            keys = Keys(NAMESPACE)
            started = time.perf_counter()
            await build(redis, keys, markers)
            built_s = time.perf_counter() - started
            report = await status.collect(redis, keys)
            assert [c["name"] for c in report["consumers"]] == ["c1", "c2", "c3"]
            assert report["pending"] == 15
            healthy, _ = await health.check(redis, keys)
            assert healthy
            return {
                "code": CODE_ROOT,
                "keys": await redis.dbsize(),
                "build_s": round(built_s, 1),
                "collect_ms": await timed(lambda: status.collect(redis, keys), rounds),
                "check_ms": await timed(lambda: health.check(redis, keys), rounds),
                "heartbeats_ms": await timed(lambda: status.heartbeats(redis, keys), rounds),
            }
        finally:
            await redis.aclose()
            server.stop()


def run_child(code: Path, markers: int, rounds: int) -> dict[str, Any]:
    """One measurement in a child process importing the streamrec of ``code``."""
    finished = subprocess.run(
        [sys.executable, __file__, "--measure", f"--markers={markers}", f"--rounds={rounds}"],
        env={**os.environ, "BENCH_CODE_ROOT": str(code)},
        capture_output=True,
        text=True,
        check=False,
    )
    for line in finished.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return result
    raise RuntimeError(f"measurement with {code} failed:\n{finished.stderr}")


def show(label: str, result: dict[str, Any]) -> None:
    """One measurement as a few lines."""
    print(f"{label}: {result['code']}  ({result['keys']:,} keys, built in {result['build_s']}s)")
    for name in ("collect_ms", "check_ms", "heartbeats_ms"):
        figures = result[name]
        print(
            f"  {name[:-3]:<11} median {figures['median']:>9.2f} ms"
            f"   min {figures['min']:>9.2f}   max {figures['max']:>9.2f}"
        )


def main() -> None:
    """Measure this checkout (and --original, if given) and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markers", type=int, default=1_000_000, help="seen: keys (1,000,000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each read (5)")
    parser.add_argument("--original", type=Path, help="a checkout to measure as well")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = asyncio.run(measure(args.markers, args.rounds))
        print(RESULT_MARK + json.dumps(result))
        return
    show("this checkout", run_child(ROOT, args.markers, args.rounds))
    if args.original:
        show("original", run_child(args.original.resolve(), args.markers, args.rounds))


if __name__ == "__main__":
    main()
