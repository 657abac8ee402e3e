"""streamrec on a Redis Cluster: throughput and Redis cost per entry with P partitions.

    .venv/bin/python bench/cluster.py                  # 100,000 entries a figure
    .venv/bin/python bench/cluster.py --entries 20000
    .venv/bin/python bench/bench.py --only cluster     # the same, from the main benchmark

Starts a local Redis Cluster (3 primaries, 3 replicas: ``tests.cluster.LocalCluster``)
in a temporary directory and measures, through the cluster client:

* the raw loop (XREADGROUP COUNT 100, then XACK + XDEL pipelined, no handler) on
  one partition's stream, the reference;
* the consumer (``bench/worker.py``, no-op handler, slots on) serving P = 1, 4
  and 8 partitions, and P = 8 from two processes; entries are real recording
  events, spread evenly over the partitions and over several businesses each;
* the webhook's enqueue (``Enqueuer``, 100 callbacks in flight, 8 partitions),
  without and with ``replica_acks=1``.

Redis commands and Redis CPU per entry are summed over the primaries (INFO
before and after, less the INFO calls themselves and the idle cluster's own
CPU). Redis CPU per entry is what says how many entries one primary core can
carry: the basis of the README's scale model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from streamrec import logging as logs
from streamrec.connections import direct, redis_client
from streamrec.events import RecordingEvent
from streamrec.group import ensure_group
from streamrec.partitions import Layout, index_of
from streamrec.producer import Enqueuer
from tests.cluster import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import raw_loop  # bench/bench.py, beside this file

HERE = Path(__file__).resolve().parent
ACCOUNT = "AC" + "b" * 32
BUSINESSES_PER_PARTITION = 5
ENQUEUE_EVENTS = 20_000
ENQUEUE_IN_FLIGHT = 100
"""Callbacks being answered at once by one webhook process in the enqueue figures."""
SETTLE_S = 60.0
"""How long replicas may take to apply a fill before a run."""
IDLE_S = 1.0
"""How long the idle cluster's own CPU (cron, cluster bus) is measured before the runs."""


@dataclass(frozen=True)
class Usage:
    """What the primaries (and, for CPU, the replicas) did over a span of time."""

    commands: int = 0
    cpu_s: float = 0.0
    replica_cpu_s: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    clock: float = 0.0
    """perf_counter() when read; in a difference, the span in seconds."""

    def since(self, before: Usage) -> Usage:
        calls = {name: n - before.calls.get(name, 0) for name, n in self.calls.items()}
        return Usage(
            self.commands - before.commands,
            self.cpu_s - before.cpu_s,
            self.replica_cpu_s - before.replica_cpu_s,
            {name: n for name, n in calls.items() if n},
            self.clock - before.clock,
        )


class Meter:
    """Reads INFO stats, cpu and commandstats from every node of the cluster."""

    def __init__(self, cluster: LocalCluster) -> None:
        def plain(url: str) -> aioredis.Redis:
            return aioredis.Redis.from_url(url, decode_responses=True)

        self.ports = [node.port for node in cluster.primaries()]
        self.primaries = [plain(node.url) for node in cluster.primaries()]
        self.replicas = [plain(node.url) for node in cluster.replicas()]
        self.idle = Usage()
        """An idle cluster's CPU seconds per second (``calibrate``)."""

    async def read(self) -> Usage:
        """The counters now, summed over the primaries (one INFO on each node)."""
        infos = await asyncio.gather(
            *(c.info("stats", "cpu", "commandstats") for c in self.primaries)
        )
        replicas = await asyncio.gather(*(c.info("cpu") for c in self.replicas))
        calls: dict[str, int] = {}
        for info in infos:
            for name, stats in info.items():
                if name.startswith("cmdstat_"):
                    calls[name[8:]] = calls.get(name[8:], 0) + int(stats["calls"])
        return Usage(
            commands=sum(int(i["total_commands_processed"]) for i in infos),
            cpu_s=sum(_cpu_s(i) for i in infos),
            replica_cpu_s=sum(_cpu_s(i) for i in replicas),
            calls=calls,
            clock=time.perf_counter(),
        )

    async def since(self, before: Usage) -> Usage:
        """What the cluster did since ``before``, less the meter's own INFO calls and the
        CPU an idle cluster spends in that time."""
        used = (await self.read()).since(before)
        ours = len(self.primaries)
        calls = dict(used.calls)
        calls["info"] = calls.get("info", 0) - ours
        return Usage(
            used.commands - ours,
            used.cpu_s - self.idle.cpu_s * used.clock,
            used.replica_cpu_s - self.idle.replica_cpu_s * used.clock,
            {name: n for name, n in calls.items() if n},
            used.clock,
        )

    async def settle(self) -> None:
        """Wait until every replica has applied all its primary wrote (a fill's entries), so
        that a run's figures hold none of the work before it; TimeoutError past SETTLE_S."""
        async with asyncio.timeout(SETTLE_S):
            while not await self._caught_up():
                await asyncio.sleep(0.02)  # polling the replicas' offsets, within the deadline

    async def _caught_up(self) -> bool:
        primaries = await asyncio.gather(*(c.info("replication") for c in self.primaries))
        replicas = await asyncio.gather(*(c.info("replication") for c in self.replicas))
        written = {
            port: int(info["master_repl_offset"])
            for port, info in zip(self.ports, primaries, strict=True)
        }
        return all(
            int(r["slave_repl_offset"]) >= written.get(int(r["master_port"]), 0) for r in replicas
        )

    async def calibrate(self, seconds: float) -> None:
        """Measure the idle cluster's CPU per second, over the primaries and the replicas."""
        before = await self.read()
        await asyncio.sleep(seconds)  # the idle span being measured
        used = await self.since(before)
        self.idle = Usage(
            cpu_s=used.cpu_s / used.clock, replica_cpu_s=used.replica_cpu_s / used.clock
        )

    async def aclose(self) -> None:
        for client in (*self.primaries, *self.replicas):
            await client.aclose()


def _cpu_s(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


@dataclass
class Figure:
    """One measured run."""

    name: str
    entries: int
    seconds: float
    cpu_s: float
    usage: Usage

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds else 0.0

    def per_entry_us(self, seconds: float) -> float:
        return seconds / self.entries * 1e6


def event(n: int, business: str) -> RecordingEvent:
    """A recording event as the webhook makes it from a callback."""
    return RecordingEvent.create(
        recording_sid=f"RE{n:032x}", call_sid=f"CA{n:032x}", account_sid=ACCOUNT,
        business_id=business, status="completed", duration_s="60", channels="1",
        source="DialVerb",
    )  # fmt: skip


def businesses(layout: Layout) -> list[list[str]]:
    """BUSINESSES_PER_PARTITION business ids of each partition."""
    found: list[list[str]] = [[] for _ in layout]
    n = 0
    while any(len(ids) < BUSINESSES_PER_PARTITION for ids in found):
        ids = found[index_of(f"b{n}", layout.count)]
        if len(ids) < BUSINESSES_PER_PARTITION:
            ids.append(f"b{n}")
        n += 1
    return found


async def fill(redis: aioredis.Redis, layout: Layout, entries: int) -> None:
    """Add ``entries`` recording events, evenly over the partitions and their businesses."""
    owners = businesses(layout)
    await asyncio.gather(*(ensure_group(redis, part) for part in layout))
    for start in range(0, entries, 2000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 2000, entries)):
                part = layout.partitions[n % layout.count]
                ids = owners[part.partition]
                business = ids[n // layout.count % len(ids)]
                fields = event(n, business).to_fields()
                pipe.xadd(part.stream, fields)  # type: ignore[arg-type]  # dict is invariant
            await pipe.execute()


async def raw(redis: aioredis.Redis, meter: Meter, entries: int) -> Figure:
    """The raw loop on one partition's stream, in this process."""
    layout = Layout("bench-raw", 1)
    await fill(redis, layout, entries)
    await meter.settle()
    before, cpu = await meter.read(), time.process_time()
    await raw_loop(redis, layout.partitions[0], entries)
    cpu_s, used = time.process_time() - cpu, await meter.since(before)
    return Figure("raw loop, 1 partition, 1 process", entries, used.clock, cpu_s, used)


async def consume(
    seed_url: str, redis: aioredis.Redis, meter: Meter, entries: int, *, count: int, processes: int
) -> Figure:
    """The consumer, no-op handler and slots on, over ``count`` partitions."""
    layout = Layout(f"bench-p{count}x{processes}", count)
    await fill(redis, layout, entries)
    options = ["--slots", "--cluster", "--partitions", str(count)]
    commands = [
        [sys.executable, str(HERE / "worker.py"), seed_url, layout.namespace, f"w{n}", *options]
        for n in range(processes)
    ]
    await meter.settle()
    before = await meter.read()
    results = await run_workers(commands)
    used = await meter.since(before)
    processed = sum(int(r["processed"]) for r in results)
    assert processed == entries, (processed, entries)
    # A worker's own clock excludes interpreter start-up; the slowest one is the run.
    seconds = max(float(r["wall_s"]) for r in results)
    cpu_s = sum(float(r["cpu_s"]) for r in results)
    return Figure(consumer_name(count, processes), entries, seconds, cpu_s, used)


async def run_workers(commands: Sequence[list[str]]) -> list[dict[str, Any]]:
    """Run worker processes side by side; their JSON results."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE) for c in commands]
    outs = [await asyncio.to_thread(p.communicate) for p in procs]
    for proc, (out, _) in zip(procs, outs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"worker exited {proc.returncode}: {out.decode()[-2000:]}")
    return [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]


async def enqueue(redis: aioredis.Redis, meter: Meter, events: int, *, acks: int) -> Figure:
    """The webhook's enqueue of ``events`` callbacks over 8 partitions, ENQUEUE_IN_FLIGHT at
    a time, confirmed by ``acks`` replicas."""
    layout = Layout(f"bench-enqueue-{acks}", 8)
    owners = [b for ids in businesses(layout) for b in ids]
    batch = [event(n, owners[n % len(owners)]) for n in range(events)]
    await asyncio.gather(*(ensure_group(redis, part) for part in layout))
    enqueuer = Enqueuer(redis, layout, dedupe_ttl_s=3600, replica_acks=acks)
    await meter.settle()
    before, cpu = await meter.read(), time.process_time()
    for start in range(0, events, ENQUEUE_IN_FLIGHT):
        window = batch[start : start + ENQUEUE_IN_FLIGHT]
        added = await asyncio.gather(*(enqueuer.enqueue(e) for e in window))
        assert all(new for new, _ in added)
    cpu_s, used = time.process_time() - cpu, await meter.since(before)
    return Figure(enqueue_name(acks), events, used.clock, cpu_s, used)


def report(figures: list[Figure], meter: Meter) -> str:
    """The table of figures, then what they say."""
    out = [
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end;"
        f" Redis Cluster of {len(meter.primaries)} primaries + {len(meter.replicas)} replicas"
        " on loopback (no persistence)",
        "",
        f"{'figure':<52} {'per s':>8} {'CPU µs':>7} {'Redis cmds':>11} {'Redis CPU µs':>13}",
    ]
    for f in figures:
        out.append(
            f"{f.name:<52} {f.rate:>8,.0f} {f.per_entry_us(f.cpu_s):>7.1f}"
            f" {f.usage.commands / f.entries:>11.2f} {f.per_entry_us(f.usage.cpu_s):>13.1f}"
        )
    notes = [
        "",
        "per entry; CPU µs: the consumer processes' (raw loop and enqueue: this process's);",
        "Redis cmds and Redis CPU µs: summed over the primaries, less an idle cluster's "
        f"{meter.idle.cpu_s * 1e3:.1f} ms CPU/s (replicas {meter.idle.replica_cpu_s * 1e3:.1f})",
    ]
    return "\n".join([*out, *notes, "", *ratios(figures)])


CONSUMERS = ((1, 1), (4, 1), (8, 1), (8, 2))
"""(partitions, processes) of each consumer figure."""


def consumer_name(count: int, processes: int) -> str:
    plural = "es" if processes > 1 else ""
    return f"consumer, no-op, slots on, P = {count}, {processes} process{plural}"


def enqueue_name(acks: int) -> str:
    return f"enqueue, P = 8, {ENQUEUE_IN_FLIGHT} in flight, replica acks {acks}"


def ratios(figures: list[Figure]) -> list[str]:
    """Each figure against its reference, and what the consumer's calls carry."""
    by = {f.name: f for f in figures}
    raw, one = by["raw loop, 1 partition, 1 process"], by[consumer_name(1, 1)]
    lines = [f"consumer P = 1 / raw loop: {one.rate / raw.rate:.1%}"]
    for count in (4, 8):
        f = by[consumer_name(count, 1)]
        lines.append(f"consumer P = {count} / P = 1, 1 process: {f.rate / one.rate:.1%}")
    lines.append(
        f"P = 8, 2 processes: {by[consumer_name(8, 2)].rate / 2:,.0f} entries/s per process"
    )
    carried = []
    for count, processes in CONSUMERS:
        f = by[consumer_name(count, processes)]
        carried.append(f"P = {count} x {processes}: {_per_call(f, 'xreadgroup')} / "
                       f"{_per_call(f, 'evalsha')}")  # fmt: skip
    lines.append("entries per XREADGROUP / per script call: " + ", ".join(carried))
    enqueued = [
        f"acks {acks}: {_per_call(by[enqueue_name(acks)], 'evalsha', 'eval')}" for acks in (0, 1)
    ]
    lines.append("callbacks per enqueue script call: " + ", ".join(enqueued))
    for count in (1, 8):
        f = by[consumer_name(count, 1)]
        lines.append(f"commands per entry, P = {count}, 1 process: {_calls(f)}")
    return [*lines, *model(by)]


def model(by: dict[str, Figure]) -> list[str]:
    """Redis CPU per recording (enqueue + consume), the basis of the scale model."""
    consumed = max(
        (by[consumer_name(8, 1)], by[consumer_name(8, 2)]),
        key=lambda f: f.usage.cpu_s / f.entries,
    )
    consume_us = consumed.per_entry_us(consumed.usage.cpu_s)
    lines = [
        f"consume, P = 8, slots on: {consume_us:.1f} µs Redis CPU per entry"
        f" (the higher of 1 and 2 processes): one primary core saturates at"
        f" ~{1e6 / consume_us:,.0f} entries/s"
    ]
    for acks in (0, 1):
        f = by[enqueue_name(acks)]
        enqueue_us = f.per_entry_us(f.usage.cpu_s)
        total = enqueue_us + consume_us
        replicas = f.per_entry_us(f.usage.replica_cpu_s) + consumed.per_entry_us(
            consumed.usage.replica_cpu_s
        )
        lines.append(
            f"per recording, enqueue (replica acks {acks}) + consume: {total:.1f} µs Redis CPU"
            f" ({enqueue_us:.1f} + {consume_us:.1f}; replicas {replicas:.1f}):"
            f" one primary core saturates at ~{1e6 / total:,.0f} recordings/s"
        )
    return lines


def _per_call(f: Figure, *commands: str) -> str:
    """Entries per call of ``commands`` in ``f``."""
    calls = sum(f.usage.calls.get(c, 0) for c in commands)
    return f"{f.entries / calls:.1f}" if calls else "-"


def _calls(f: Figure) -> str:
    """The commands the primaries ran (Lua's included) per entry, most first."""
    top = sorted(f.usage.calls.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {n / f.entries:.3f}" for name, n in top if n / f.entries >= 0.001)


async def run(entries: int) -> str:
    """Start a cluster, measure every figure, stop it; the report."""
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="streamrec-cluster-bench-")))
    await asyncio.to_thread(cluster.start)
    redis = redis_client(cluster.seed_url, block_ms=10, cluster=True)
    meter = Meter(cluster)
    try:
        await meter.calibrate(IDLE_S)
        figures = [await raw(redis, meter, entries)]
        for count, processes in CONSUMERS:
            figures.append(
                await consume(
                    cluster.seed_url, redis, meter, entries, count=count, processes=processes
                )
            )
        for acks in (0, 1):
            figures.append(await enqueue(redis, meter, ENQUEUE_EVENTS, acks=acks))
        return report(figures, meter)
    finally:
        await meter.aclose()
        nodes = direct(redis)
        if nodes is not None:
            await nodes.aclose()
        await redis.aclose()
        cluster.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    print(await run(args.entries))


if __name__ == "__main__":
    asyncio.run(main())
