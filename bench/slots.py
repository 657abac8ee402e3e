"""Slot housekeeping benchmark: what sweeps, renewals and ``slots list`` cost Redis.

    .venv/bin/python bench/slots.py [--businesses 10000] [--consumers 10] [--original 81961e5]

Every business is at its limit of 1 with one more entry parked behind its
holder, as a tenant with a backlog is. Each figure is measured twice, in the
same run and the same way: for the slots code of this checkout and for the
original, ``streamrec/semaphore.py`` as committed at ``--original`` (``git
show``, loaded beside it as a module of its own), each in its own namespace of
one Redis started for the run on a free port.

Redis time is the server's own execution time of the calls an operation makes
(``INFO commandstats``: the top-level commands only, a script's usec covering
the commands it runs); wall time is the caller's, loopback included. Absolute
numbers drift with the machine; the ratios much less.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from streamrec import semaphore, service
from streamrec.devservers import LocalRedis
from streamrec.group import ensure_group
from streamrec.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "81961e5"  # the last commit before the parked-due index and the sweep lock
LIVE_MS = 600_000  # holders that keep renewing: never due during a run
CRASHED_MS = 100  # holders that stopped renewing: due after this


@dataclass(frozen=True)
class Version:
    """One slots implementation under test."""

    name: str
    module: ModuleType
    sweep_calls: tuple[str, ...]
    """The top-level commands a sweep sends (the original first read its set of businesses)."""
    picture_calls: tuple[str, ...]

    def slots(self, redis: aioredis.Redis, keys: Keys, lease_ms: int) -> Any:
        return self.module.Slots(redis, keys, default_limit=1, lease_ms=lease_ms)

    async def acquire(self, slots: Any, rows: Sequence[tuple[str, str]]) -> list[int]:
        """First deliveries of (entry id, business): the original took their count instead."""
        if self.module is semaphore:
            return list(await slots.acquire([(i, b, 0, False) for i, b in rows]))
        return list(await slots.acquire([(i, b, 1) for i, b in rows]))


@dataclass
class Cost:
    """Redis and wall time of one operation, averaged over its runs."""

    redis_us: float
    wall_ms: float


def original_module(rev: str) -> ModuleType:
    """``streamrec/semaphore.py`` at ``rev``, imported under a name of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:streamrec/semaphore.py"],  # noqa: S607
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="slots-original-")) / "semaphore_original.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("semaphore_original", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    shutil.rmtree(path.parent)
    return module


async def usec(redis: aioredis.Redis, commands: tuple[str, ...]) -> int:
    """Total execution time (µs) Redis has spent in ``commands`` so far."""
    stats: dict[str, Any] = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in commands)


async def measure(
    redis: aioredis.Redis, commands: tuple[str, ...], calls: Sequence[Callable[[], Awaitable[Any]]]
) -> Cost:
    """Run ``calls`` one after the other; their mean Redis time (in ``commands``) and wall time."""
    before = await usec(redis, commands)
    wall = time.perf_counter()
    for call in calls:
        await call()
    wall = time.perf_counter() - wall
    return Cost((await usec(redis, commands) - before) / len(calls), wall * 1000 / len(calls))


async def populate(
    redis: aioredis.Redis, version: Version, keys: Keys, businesses: int, crashed: int
) -> list[tuple[str, str]]:
    """Give each business a holder and one parked entry; ``crashed`` holders stop renewing.

    Returns the (entry id, business) of the live holders.
    """
    await ensure_group(redis, keys)
    rows: list[tuple[str, str]] = []
    for start in range(0, businesses, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 1000, businesses)):
                for _ in range(2):
                    pipe.xadd(keys.stream, {"business_id": f"b{n}"})
            ids = await pipe.execute()
        rows += [(str(i), f"b{start + k // 2}") for k, i in enumerate(ids)]
        await redis.xreadgroup(keys.group, "bench", {keys.stream: ">"}, count=len(ids))
    live, dying = version.slots(redis, keys, LIVE_MS), version.slots(redis, keys, CRASHED_MS)
    cut = (businesses - crashed) * 2
    for part, slots in ((rows[:cut], live), (rows[cut:], dying)):
        for start in range(0, len(part), 1000):
            verdicts = await version.acquire(slots, part[start : start + 1000])
            assert verdicts == [1, 0] * (len(verdicts) // 2), "a holder and a parked entry each"
    await asyncio.sleep(CRASHED_MS / 1000 * 1.5)  # the crashed holders' leases run out
    return rows[:cut:2]


async def figures(
    redis: aioredis.Redis, version: Version, businesses: int, consumers: int
) -> dict[str, Cost]:
    """Every figure of one version, each on a namespace built for it."""
    out: dict[str, Cost] = {}
    keys = Keys(f"bench-slots-{version.name}-steady")
    held = await populate(redis, version, keys, businesses, crashed=0)
    sweepers = [version.slots(redis, keys, LIVE_MS) for _ in range(20)]
    out["sweep, nothing due"] = await measure(redis, version.sweep_calls,
                                              [s.sweep for s in sweepers])  # fmt: skip
    holders = [version.module.Held(i, b) for i, b in held[:100]]
    out["renew 100 held slots"] = await measure(
        redis, ("evalsha",), [lambda: sweepers[0].renew(holders)] * 20
    )
    out["slots list (picture)"] = await measure(
        redis, version.picture_calls,
        [lambda: version.module.picture(redis, keys, default_limit=1)] * 3,
    )  # fmt: skip
    keys = Keys(f"bench-slots-{version.name}-crash")
    crashed = max(1, businesses // 100)
    await populate(redis, version, keys, businesses, crashed=crashed)
    sweepers = [version.slots(redis, keys, LIVE_MS) for _ in range(consumers)]
    woken: list[int] = []
    out[f"{consumers} consumers sweep once, 1% due"] = await measure(
        redis, version.sweep_calls, [functools.partial(_woken, s, woken) for s in sweepers]
    )
    assert sum(woken) == crashed, (version.name, sum(woken), crashed)
    return out


async def _woken(slots: Any, woken: list[int]) -> None:
    woken.append(int(await slots.sweep()))


def report(results: dict[str, dict[str, Cost]], businesses: int, consumers: int) -> str:
    """The figures side by side, per operation; the group's cost per sweep period last."""
    original, new = results["original"], results["new"]
    lines = [
        f"{businesses:,} businesses at their limit, each with one entry parked; Redis on loopback",
        "",
        f"{'per call':<36} {'original µs':>12} {'new µs':>9} {'ratio':>8}"
        f" {'original ms':>12} {'new ms':>8}",
    ]
    for name, old in original.items():
        now = new[name]
        ratio = f"{old.redis_us / now.redis_us:7.1f}x" if now.redis_us else "       -"
        lines.append(
            f"{name:<36} {old.redis_us:>12,.0f} {now.redis_us:>9,.0f} {ratio}"
            f" {old.wall_ms:>12.2f} {now.wall_ms:>8.2f}"
        )
    key = f"{consumers} consumers sweep once, 1% due"
    lines += [
        "",
        f"Redis time per sweep period, {consumers} consumers, 1% of holders crashed:"
        f" original {original[key].redis_us * consumers / 1000:.1f} ms,"
        f" new {new[key].redis_us * consumers / 1000:.2f} ms",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--businesses", type=int, default=10_000)
    parser.add_argument("--consumers", type=int, default=10)
    parser.add_argument(
        "--original", default=BEFORE, help=f"git revision of the original (default {BEFORE})"
    )
    args = parser.parse_args()
    old_picture = ("time", "smembers", "scan", "hgetall", "zcount", "llen")
    versions = [
        Version("original", original_module(args.original), ("smembers", "evalsha"), old_picture),
        Version("new", semaphore, ("evalsha",), ("evalsha",)),
    ]
    directory = Path(tempfile.mkdtemp(prefix="streamrec-bench-slots-"))
    server = LocalRedis(directory / "redis").start()
    redis = service.redis_client(server.url)
    try:
        results = {
            v.name: await figures(redis, v, args.businesses, args.consumers) for v in versions
        }
    finally:
        await redis.aclose()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(report(results, args.businesses, args.consumers))


if __name__ == "__main__":
    asyncio.run(main())
