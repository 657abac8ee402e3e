"""streamrec benchmark: prints each figure beside its reference, measured in the same run.

    .venv/bin/python bench/bench.py                 # everything but the 1,000,000-entry memory run
    .venv/bin/python bench/bench.py --million       # with it
    .venv/bin/python bench/bench.py --only machinery,latency
    .venv/bin/python bench/bench.py --only cluster  # on a Redis Cluster: bench/cluster.py

Starts its own Redis and PostgreSQL on free ports, so it measures the same
thing on any machine and touches nothing else. Absolute numbers drift with
machine noise; the ratios, CPU time per entry and Redis commands per entry move
much less. Webhook ingest is measured by bench/ingest.py (load from wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from streamrec import logging as logs
from streamrec import schema, service
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.devservers import LocalPostgres, LocalRedis, free_port
from streamrec.events import RecordingEvent
from streamrec.group import ensure_group
from streamrec.keys import Keys
from streamrec.producer import Enqueuer
from streamrec.semaphore import Slots

HERE = Path(__file__).resolve().parent
CHOICES = ("machinery", "pipeline", "latency", "io", "burst", "memory", "cluster")
ACCOUNT = "AC" + "b" * 32
TOKEN = "bench-token"  # noqa: S105 - a local stand-in's credential


@dataclass
class Figure:
    """One measured run."""

    name: str
    entries: int
    seconds: float
    cpu_seconds: float | None = None
    redis_commands: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds else 0.0


@dataclass
class Bench:
    """Servers and results of one benchmark run."""

    redis: aioredis.Redis
    redis_url: str
    directory: Path
    figures: list[Figure] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def get(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)


async def commands(redis: aioredis.Redis) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


async def fill(redis: aioredis.Redis, keys: Keys, entries: int, *, businesses: int = 10) -> None:
    """Pre-enqueue ``entries`` small entries spread over ``businesses``."""
    await redis.delete(keys.stream, keys.dead, keys.parked_set)
    await ensure_group(redis, keys)
    for start in range(0, entries, 2000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 2000, entries)):
                pipe.xadd(keys.stream, {"business_id": f"b{n % businesses}", "n": str(n)})
            await pipe.execute()


async def raw_loop(redis: aioredis.Redis, keys: Keys, entries: int) -> None:
    """The reference: XREADGROUP COUNT 100, then XACK + XDEL pipelined, no handler."""
    done = 0
    while done < entries:
        reply: Any = await redis.xreadgroup(keys.group, "raw", {keys.stream: ">"}, count=100)
        ids = [i for _, batch in reply or [] for i, _ in batch]
        if not ids:
            break
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xack(keys.stream, keys.group, *ids)
            pipe.xdel(keys.stream, *ids)
            await pipe.execute()
        done += len(ids)


def worker_command(b: Bench, namespace: str, name: str, *options: str) -> list[str]:
    return [sys.executable, str(HERE / "worker.py"), b.redis_url, namespace, name, *options]


async def run_workers(commands_: list[list[str]]) -> list[dict[str, Any]]:
    """Run worker processes side by side; their JSON results."""
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for c in commands_
    ]
    outs = [await asyncio.to_thread(p.communicate) for p in procs]
    return [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]


async def machinery(b: Bench, entries: int) -> None:
    """Figure 1: the consumer machinery with a no-op handler, against the raw loop."""
    keys = Keys("bench-raw")
    await fill(b.redis, keys, entries)
    before, cpu, wall = await commands(b.redis), time.process_time(), time.perf_counter()
    await raw_loop(b.redis, keys, entries)
    b.add(Figure("raw loop, 1 process", entries, time.perf_counter() - wall,
                 time.process_time() - cpu, await commands(b.redis) - before - 1))  # fmt: skip
    runs = [
        ("slots off, 1 process", 1, []),
        ("slots on, 1 process", 1, ["--slots"]),
        ("slots on, 2 processes", 2, ["--slots"]),
        ("slots on, 1 process, uvloop", 1, ["--slots", "--uvloop"]),
        ("slots on, 1 process, Python's GC thresholds", 1, ["--slots", "--python-gc"]),
    ]
    for label, processes, options in runs:
        keys = Keys(f"bench-{processes}-{'-'.join(options) or 'plain'}")
        await fill(b.redis, keys, entries)
        before = await commands(b.redis)
        results = await run_workers(
            [worker_command(b, keys.namespace, f"w{n}", *options) for n in range(processes)]
        )
        # A worker's own clock excludes interpreter start-up; the slowest one is the run.
        seconds = max(float(r["wall_s"]) for r in results)
        processed = sum(r["processed"] for r in results)
        assert processed == entries, (processed, entries)
        cpu_s = sum(r["cpu_s"] for r in results)
        redis_commands = await commands(b.redis) - before - 1
        b.add(Figure(f"consumer, no-op, {label}", entries, seconds, cpu_s, redis_commands))


async def io_bound(b: Bench, entries: int) -> None:
    """Figure 5: handlers that each await 50 ms, 100 in flight; the ideal is 2,000/s."""
    keys = Keys("bench-io")

    async def wait_50ms(delivery: Delivery) -> None:
        await asyncio.sleep(0.05)  # the I/O being simulated

    await fill(b.redis, keys, entries)
    consumer = Consumer(
        redis=b.redis,
        keys=keys,
        handler=wait_50ms,
        config=ConsumerConfig(name="io", concurrency=100, block_ms=10),
        slots=Slots(b.redis, keys, default_limit=100),
    )
    wall = time.perf_counter()
    await consumer.run(asyncio.Event(), until_idle=True)
    b.add(Figure("50 ms handlers, 100 in flight, slots on", entries, time.perf_counter() - wall))


async def burst(b: Bench, count: int) -> None:
    """Figure 5b: ``count`` 50 ms jobs enqueued as fast as one process can into a worker
    already running and idle (100 in flight); from the first enqueue to the last job's
    end. The reference: a bare XREADGROUP loop running the same jobs (ideal: 2,000/s)."""
    for label, options in (
        ("raw loop", ["--raw"]),
        ("streamrec, slots on", ["--slots"]),
        ("streamrec, slots off", []),
    ):
        keys = Keys(f"bench-burst-{'-'.join(options) or 'off'}")
        await b.redis.delete(keys.stream)
        await ensure_group(b.redis, keys)
        worker = subprocess.Popen(
            worker_command(b, keys.namespace, "burst", *options, "--sleep-ms", "50",
                           "--expect", str(count)),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not await _blocked_in_a_read(b.redis):
            if time.monotonic() > deadline:
                raise RuntimeError("the burst worker never waited in its read")
            await asyncio.sleep(0.05)  # until the worker waits in its read
        began = time.time()
        for start in range(0, count, 100):
            async with b.redis.pipeline(transaction=False) as pipe:
                for n in range(start, min(start + 100, count)):
                    pipe.xadd(keys.stream, {"business_id": f"b{n % 10}", "n": str(n)})
                await pipe.execute()
        out, _ = await asyncio.to_thread(worker.communicate)
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result["processed"] == count, result
        seconds = float(result["last_done"]) - began
        b.add(Figure(f"live burst, {count} x 50 ms jobs, {label}", count, seconds, result["cpu_s"]))


async def _blocked_in_a_read(redis: aioredis.Redis) -> bool:
    """Whether a client of ``redis`` waits in a blocking XREADGROUP now."""
    return any(
        c.get("cmd") == "xreadgroup" and "b" in str(c.get("flags", ""))
        for c in await redis.client_list()
    )


async def latency(b: Bench, count: int, *, slots: bool, uvloop: bool = False) -> None:
    """Figure 4: enqueue → handler start, entries paced at 100/s, consumer in its own process."""
    keys = Keys(f"bench-latency-{slots}-{uvloop}")
    options = [*(["--slots"] if slots else []), "--latency", "--expect", str(count)]
    options += ["--uvloop"] if uvloop else []
    await b.redis.delete(keys.stream)
    await ensure_group(b.redis, keys)
    worker = subprocess.Popen(
        worker_command(b, keys.namespace, "lat", *options),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)  # let the worker start and block on its read
    for n in range(count):
        await b.redis.xadd(keys.stream, {"business_id": f"b{n % 10}", "t": repr(time.time())})
        await asyncio.sleep(0.01)  # pacing: 100 entries/s
    out, _ = await asyncio.to_thread(worker.communicate)
    samples = sorted(json.loads(out.decode().strip().splitlines()[-1])["latencies"])
    p50, p99 = samples[len(samples) // 2], samples[int(len(samples) * 0.99)]
    name = f"pickup latency at 100/s, slots {'on' if slots else 'off'}"
    name += ", uvloop" if uvloop else ""
    extra = {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "max_ms": samples[-1] * 1e3}
    b.add(Figure(name, count, 1.0, extra=extra))


async def memory(b: Bench, sizes: list[int]) -> None:
    """Figure 6: consumer RSS and Redis memory after N entries went through."""
    for size in sizes:
        keys = Keys(f"bench-mem-{size}")
        await fill(b.redis, keys, size)
        [result] = await run_workers([worker_command(b, keys.namespace, "mem", "--slots")])
        used = int((await b.redis.info("memory"))["used_memory"]) / 2**20
        extra = {"consumer_rss_mib": result["rss_mib"], "redis_used_mib": used}
        b.add(Figure(f"memory after {size:,} entries", size, result["wall_s"], extra=extra))
        await b.redis.delete(keys.stream)


@contextlib.contextmanager
def media_server(port: int) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "media_server.py"), str(port), ACCOUNT, TOKEN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait()


TMPFS = Path("/dev/shm")  # noqa: S108 - each run makes its own directory there (mkdtemp)
PIPELINE_RUNS: tuple[tuple[str, list[str], bool], ...] = (
    ("", [], False),
    (", media in tmpfs", [], True),
    (", asyncio loop", ["--asyncio"], False),
)
"""The pipeline's runs: as ``python -m streamrec consume`` runs (uvloop), with the media
directory in memory (where /dev/shm is: the disk's share of the cost), on asyncio's loop."""


async def pipeline(b: Bench, recordings: int) -> None:
    """Figure 2: stream → media download → PostgreSQL row, transcription off, 1 process."""
    postgres = LocalPostgres(
        b.directory / "postgres", durable=os.environ.get("BENCH_PG_FSYNC", "1") == "1"
    ).start()
    port = free_port()
    try:
        database = postgres.url("streamrec")
        await schema.migrate(database)
        with media_server(port):
            for n, (name, options, in_memory) in enumerate(PIPELINE_RUNS):
                if in_memory and not TMPFS.is_dir():
                    continue
                media = Path(tempfile.mkdtemp(dir=TMPFS if in_memory else b.directory))
                keys = Keys(f"bench-pipeline-{n}")
                enqueuer = Enqueuer(b.redis, keys, dedupe_ttl_s=3600)
                await ensure_group(b.redis, keys)
                for start in range(0, recordings, 50):
                    await asyncio.gather(*(
                        enqueuer.enqueue(_event(n * recordings + i))
                        for i in range(start, min(start + 50, recordings))
                    ))  # fmt: skip
                settings = {
                    "redis_url": b.redis_url, "database_url": database,
                    "twilio_account_sid": ACCOUNT, "twilio_auth_token": TOKEN,
                    "twilio_api_base": f"http://127.0.0.1:{port}",
                    "media_dir": str(media), "namespace": keys.namespace,
                    "concurrency": 32, "block_ms": 10, "metrics_port": 0, "business_slots": 32,
                }  # fmt: skip
                script = str(HERE / "pipeline.py")
                [result] = await run_workers([[sys.executable, script, json.dumps(settings),
                                               *options]])  # fmt: skip
                stages = {
                    f"{stage}_ms_per_recording": result[f"{stage}_s"] / recordings * 1e3
                    for stage in ("download", "store")
                }
                b.add(Figure(f"pipeline, download + PostgreSQL, 1 process{name}", recordings,
                             result["wall_s"], result["cpu_s"], extra=stages))  # fmt: skip
                shutil.rmtree(media, ignore_errors=True)
    finally:
        postgres.stop()


def _event(n: int) -> RecordingEvent:
    return RecordingEvent.create(
        recording_sid=f"RE{n:032x}", call_sid=f"CA{n:032x}", account_sid=ACCOUNT,
        business_id=f"b{n % 10}", status="completed",
    )  # fmt: skip


def report(b: Bench) -> str:
    out = [
        f"machine: {os.cpu_count()} cores, {platform.machine()},"
        f" Python {platform.python_version()},"
        f" Redis on loopback (no persistence)",
        "",
        f"{'figure':<60} {'per s':>9} {'CPU µs/entry':>13} {'Redis cmds/entry':>17}",
    ]
    for f in b.figures:
        if f.name.startswith(("pickup", "memory")):
            continue
        cpu = f"{f.cpu_seconds / f.entries * 1e6:13.1f}" if f.cpu_seconds is not None else " " * 13
        cmd = f"{f.redis_commands / f.entries:17.2f}" if f.redis_commands is not None else ""
        out.append(f"{f.name:<60} {f.rate:>9,.0f} {cpu} {cmd}")
    return "\n".join([*out, "", *ratios(b)])


def ratios(b: Bench) -> list[str]:
    """Each figure against its reference."""
    raw = b.get("raw loop, 1 process")
    ratios = []
    for name in ("consumer, no-op, slots off, 1 process", "consumer, no-op, slots on, 1 process"):
        measured = b.get(name)
        if raw and measured:
            ratios.append(f"{name} / raw loop: {measured.rate / raw.rate:.1%}")
    on, off = (
        b.get("consumer, no-op, slots on, 1 process"),
        b.get("consumer, no-op, slots off, 1 process"),
    )
    if on and off:
        ratios.append(f"slots on / slots off: {on.rate / off.rate:.1%}")
    two = b.get("consumer, no-op, slots on, 2 processes")
    if two:
        ratios.append(f"2 processes: {two.rate / 2:,.0f} entries/s per process")
    raw_burst = b.get("live burst, 2000 x 50 ms jobs, raw loop")
    for label in ("slots on", "slots off"):
        live = b.get(f"live burst, 2000 x 50 ms jobs, streamrec, {label}")
        if raw_burst and live:
            ratios.append(f"live burst, {label} / raw loop: {live.rate / raw_burst.rate:.1%}")
    io = b.get("50 ms handlers, 100 in flight, slots on")
    if io:
        ratios.append(f"50 ms handlers / ideal 2,000/s: {io.rate / 2000:.1%}")
    pipe = b.get("pipeline, download + PostgreSQL, 1 process")
    if pipe:
        stages = ", ".join(
            f"{k} {v:.2f}" for k, v in pipe.extra.items() if k.endswith("_ms_per_recording")
        )
        ratios.append(f"pipeline time per recording by stage (summed over concurrency): {stages}")
        ratios.append(f"pipeline / target 1,000/s: {pipe.rate / 1000:.1%}")
    return ratios + extras(b)


def extras(b: Bench) -> list[str]:
    """Latency and memory lines."""
    lines = []
    for f in b.figures:
        if f.name.startswith("pickup"):
            lines.append(
                f"{f.name}: p50 {f.extra['p50_ms']:.2f} ms, p99 {f.extra['p99_ms']:.2f} ms,"
                f" max {f.extra['max_ms']:.1f} ms"
            )
        if f.name.startswith("memory"):
            lines.append(f"{f.name}: consumer RSS {f.extra['consumer_rss_mib']:.1f} MiB,"
                         f" Redis used {f.extra['redis_used_mib']:.1f} MiB")  # fmt: skip
    return lines


@contextlib.asynccontextmanager
async def servers() -> AsyncIterator[Bench]:
    directory = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    directory.chmod(0o755)
    redis_server = LocalRedis(directory / "redis").start()
    redis = service.redis_client(redis_server.url)
    try:
        yield Bench(redis, redis_server.url, directory)
    finally:
        await redis.aclose()
        redis_server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument(
        "--million", action="store_true", help="also the 1,000,000-entry memory run"
    )
    parser.add_argument(
        "--only",
        default="machinery,pipeline,latency,io,burst,memory",
        help=f"comma-separated, of: {','.join(CHOICES)} (cluster is not in the default)",
    )
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    only = set(args.only.split(","))
    if unknown := only - set(CHOICES):
        parser.error(
            f"--only: unknown {','.join(sorted(unknown))}; choose from {','.join(CHOICES)}"
        )
    if only - {"cluster"}:
        await local(only, args)
    if "cluster" in only:
        # Its own servers (a Redis Cluster); imported here, as it needs the test harness.
        import cluster  # noqa: PLC0415

        print(await cluster.run(args.entries))


async def local(only: set[str], args: argparse.Namespace) -> None:
    """The figures measured on one local Redis (and PostgreSQL)."""
    async with servers() as b:
        if "machinery" in only:
            await machinery(b, args.entries)
        if "pipeline" in only:
            await pipeline(b, 5_000)
        if "latency" in only:
            await latency(b, 1_000, slots=False)
            await latency(b, 1_000, slots=True)
            await latency(b, 1_000, slots=True, uvloop=True)
        if "io" in only:
            await io_bound(b, 10_000)
        if "burst" in only:
            await burst(b, 2_000)
        if "memory" in only:
            await memory(b, [10_000, 1_000_000] if args.million else [10_000, 100_000])
        print(report(b))


if __name__ == "__main__":
    asyncio.run(main())
