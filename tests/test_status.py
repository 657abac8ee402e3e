"""``status.collect`` and ``status --json`` against streams whose state the test built:
one partition, as most deployments run, and four."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis

from streamrec import deadletters, health, semaphore, service, status
from streamrec.connections import redis_client
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.devservers import free_port
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.monitor import Monitor
from streamrec.partitions import Layout
from streamrec.settings import Settings
from tests.cluster import LocalCluster
from tests.conftest import wait_for
from tests.processes import environment, streamrec
from tests.standins import MediaStandIn, enqueue

LENGTH = 6  # entries in the stream
BY_C1 = 2  # read (not acked) by consumer c1
BY_C2 = 1  # read (not acked) by consumer c2
DEAD = 2  # entries in the dead-letter stream

# The figures about the stream and its group (detail=False keeps all of them).
GROUP_FIGURES = (
    "stream", "group", "length", "lag", "pending", "dead_letters", "last_delivered_id",
    "oldest_pending_id",
)  # fmt: skip
# Figures that depend on when the report was taken, not on the state built.
CLOCK_FIELDS = {"collected_at_ms", "oldest_pending_idle_ms"}
CONSUMER_CLOCK_FIELDS = {"idle_ms", "oldest_pending_idle_ms", "last_seen_ms_ago"}


async def nothing(delivery: Delivery) -> None:
    """A handler for consumers that are never run."""


def monitor_of(redis: aioredis.Redis, keys: Keys | Layout, name: str) -> Monitor:
    """A Monitor beside a (never run) Consumer called ``name``; its beat lives 60 s."""
    consumer = Consumer(redis=redis, keys=keys, handler=nothing, config=ConsumerConfig(name=name))
    return Monitor(redis=redis, layout=keys, consumer=consumer, metrics=Metrics(), interval_s=20.0)


async def build_state(redis: aioredis.Redis, keys: Keys) -> list[str]:
    """LENGTH entries, the group, c1 and c2 holding some, DEAD dead letters, c1 beating.

    Returns the ids of the stream's entries, oldest first.
    """
    for n in range(DEAD):  # entries that failed before the group was made
        fields = {"v": "1", "n": f"dead-{n}"}
        entry_id = str(await redis.xadd(keys.stream, fields))  # type: ignore[arg-type]
        assert await deadletters.move(
            redis,
            keys,
            entry_id=entry_id,
            fields=fields,
            error="PermanentError: boom",
            attempts=1,
            consumer="c0",
        )
    ids = [str(await redis.xadd(keys.stream, {"v": "1", "n": str(n)})) for n in range(LENGTH)]
    await redis.xgroup_create(keys.stream, keys.group, id="0")
    await redis.xreadgroup(keys.group, "c1", {keys.stream: ">"}, count=BY_C1)
    await redis.xreadgroup(keys.group, "c2", {keys.stream: ">"}, count=BY_C2)
    await monitor_of(redis, keys, "c1").tick()
    return ids


def without_clock(report: dict[str, Any]) -> dict[str, Any]:
    """The report with time-dependent figures dropped."""
    stable = {k: v for k, v in report.items() if k not in CLOCK_FIELDS}
    stable["partitions"] = [
        {k: v for k, v in p.items() if k not in CLOCK_FIELDS} for p in report["partitions"]
    ]
    if stable.get("oldest_waiting"):
        stable["oldest_waiting"] = {
            k: v for k, v in stable["oldest_waiting"].items() if k != "age_ms"
        }
    stable["consumers"] = [
        {k: v for k, v in c.items() if k not in CONSUMER_CLOCK_FIELDS} for c in report["consumers"]
    ]
    return stable


def assert_built_state(report: dict[str, Any], keys: Keys, ids: list[str]) -> None:
    """``report`` describes exactly the state build_state made."""
    assert report["stream"] == keys.stream
    assert report["group"] == keys.group
    assert report["length"] == LENGTH
    assert report["lag"] == LENGTH - BY_C1 - BY_C2
    assert report["pending"] == BY_C1 + BY_C2
    assert report["dead_letters"] == DEAD
    assert report["last_delivered_id"] == ids[BY_C1 + BY_C2 - 1]
    assert report["oldest_pending_id"] == ids[0]
    assert isinstance(report["oldest_pending_idle_ms"], int)
    assert report["oldest_pending_idle_ms"] >= 0
    by_name = {c["name"]: c for c in report["consumers"]}
    assert list(by_name) == ["c1", "c2"]
    assert (by_name["c1"]["pending"], by_name["c2"]["pending"]) == (BY_C1, BY_C2)
    for consumer in by_name.values():
        assert isinstance(consumer["oldest_pending_idle_ms"], int)
        assert isinstance(consumer["idle_ms"], int)
        assert isinstance(consumer["last_seen_ms_ago"], int)
    beat = by_name["c1"]["heartbeat"]
    assert beat is not None
    assert (beat["name"], beat["pid"], beat["processed"]) == ("c1", os.getpid(), 0)
    assert by_name["c2"]["heartbeat"] is None


async def test_collect_reports_the_state_exactly(redis: aioredis.Redis, keys: Keys) -> None:
    """collect() reports length, lag, pending, dead letters, per-consumer pending and beats."""
    ids = await build_state(redis, keys)
    assert_built_state(await status.collect(redis, keys), keys, ids)


async def test_collect_without_detail_leaves_consumers_out(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """collect(detail=False) has the same group figures and an empty consumer list."""
    await build_state(redis, keys)
    full = await status.collect(redis, keys)
    brief = await status.collect(redis, keys, detail=False)
    assert brief["consumers"] == []
    assert {k: brief[k] for k in GROUP_FIGURES} == {k: full[k] for k in GROUP_FIGURES}


async def test_status_json_cli_equals_the_state(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``status --json`` prints the document collect() returns for the same state."""
    ids = await build_state(redis, keys)
    finished = await streamrec("status", "--json", env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    printed = json.loads(finished.stdout)
    assert_built_state(printed, keys, ids)
    assert without_clock(printed) == without_clock(await status.collect(redis, keys))


async def test_collect_of_a_namespace_without_a_stream(redis: aioredis.Redis, keys: Keys) -> None:
    """With no stream at all, collect() answers zeros and None under the same keys."""
    report = await status.collect(redis, keys)
    assert report["stream"] == keys.stream
    assert (report["length"], report["pending"], report["dead_letters"]) == (0, 0, 0)
    for name in ("lag", "last_delivered_id", "oldest_pending_id", "oldest_pending_idle_ms"):
        assert report[name] is None, name
    assert report["consumers"] == []
    await build_state(redis, keys)
    assert set(report) == set(await status.collect(redis, keys))


async def test_a_beating_consumer_outside_the_group_is_listed(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A consumer with a heartbeat but nothing read yet appears with pending 0."""
    await monitor_of(redis, keys, "fresh").tick()
    report = await status.collect(redis, keys)
    [consumer] = report["consumers"]
    assert consumer["name"] == "fresh"
    assert consumer["pending"] == 0
    assert consumer["oldest_pending_idle_ms"] is None
    assert consumer["heartbeat"]["name"] == "fresh"
    assert isinstance(consumer["last_seen_ms_ago"], int)
    assert "fresh" in status.render(report)


async def test_render_mentions_each_consumer(redis: aioredis.Redis, keys: Keys) -> None:
    """render() names the stream, its figures and every consumer with its liveness."""
    await build_state(redis, keys)
    text = status.render(await status.collect(redis, keys))
    flat = " ".join(text.split())
    assert keys.stream in flat
    for phrase in (f"length {LENGTH}", f"pending {BY_C1 + BY_C2}", f"dead letters {DEAD}"):
        assert phrase in flat, phrase
    [c1_line] = [line for line in text.splitlines() if line.split()[0] == "c1"]
    [c2_line] = [line for line in text.splitlines() if line.split()[0] == "c2"]
    assert f"pending {BY_C1}" in " ".join(c1_line.split())
    assert "(alive)" in c1_line
    assert "(no heartbeat)" in c2_line


def test_render_of_an_empty_report_says_no_consumers() -> None:
    """An empty namespace renders as length 0 and 'no consumers'."""
    report = {
        "stream": "{x}:recordings",
        "group": "workers",
        "length": 0,
        "lag": None,
        "pending": 0,
        "oldest_pending_idle_ms": None,
        "dead_letters": 0,
        "consumers": [],
    }
    text = status.render(report)
    assert "length 0" in text
    assert "no consumers" in text


async def test_status_shows_the_outcomes_of_the_last_minute_and_hour(
    redis: aioredis.Redis, keys: Keys, settings: Settings, media: MediaStandIn, tmp_path: Path
) -> None:
    """After a consumer completed 3 entries (each retried once) and dead-lettered 1,
    ``status`` and ``status --json`` show 3 / 3 / 1 for the last minute and hour."""
    [refused] = await enqueue(redis, keys, 1)
    media.status_for[refused] = 403
    await enqueue(redis, keys, 3)
    await asyncio.wait_for(service.consume(settings, asyncio.Event(), until_idle=True), 60)

    expected = {"completed": 3, "failed": 3, "dead_lettered": 1}
    report = await status.collect(redis, keys)
    assert report["throughput"] == {"last_minute": expected, "last_hour": expected}
    env = environment(settings)
    printed = await streamrec("status", "--json", env=env, cwd=tmp_path)
    assert json.loads(printed.stdout)["throughput"]["last_minute"] == expected
    text = (await streamrec("status", env=env, cwd=tmp_path)).stdout
    for window in ("last minute", "last hour"):
        assert f"{window}: completed 3 failed attempts 3 dead-lettered 1" in " ".join(
            text.split()
        ), text


async def test_a_repeated_heartbeat_counts_nothing_twice(redis: aioredis.Redis, keys: Keys) -> None:
    """A monitor beating twice (as a retried call would) after 2 completions counts 2."""
    await enqueue(redis, keys, 2)
    consumer = Consumer(
        redis=redis, keys=keys, handler=nothing, config=ConsumerConfig(name="twice")
    )
    monitor = Monitor(redis=redis, layout=keys, consumer=consumer, metrics=Metrics())
    await consumer.run(asyncio.Event(), until_idle=True)
    assert consumer.processed == 2
    await monitor.tick()
    await monitor.tick()
    counts = await status.throughput(redis, keys)
    assert counts["last_minute"] == {"completed": 2, "failed": 0, "dead_lettered": 0}


async def test_a_consumer_pruned_while_silent_counts_only_what_it_had_not(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A consumer whose heartbeat expired and was pruned by another's beat adds, when it
    beats again, only the outcomes it had not counted yet, not its whole history."""
    consumer = Consumer(
        redis=redis, keys=keys, handler=nothing, config=ConsumerConfig(name="silent")
    )
    monitor = Monitor(
        redis=redis, layout=keys, consumer=consumer, metrics=Metrics(), interval_s=0.1
    )
    await enqueue(redis, keys, 2)
    await consumer.run(asyncio.Event(), until_idle=True)
    await monitor.tick()  # its beat lives a second
    await wait_for(lambda: _no_heartbeats(redis, keys), what="the heartbeat expired")
    await monitor_of(redis, keys, "other").tick()  # prunes it, and what it had counted
    assert not await redis.hexists(keys.outcome_totals, "silent:completed")

    await enqueue(redis, keys, 1)
    await consumer.run(asyncio.Event(), until_idle=True)
    await monitor.tick()
    counts = await status.throughput(redis, keys)
    assert counts["last_minute"]["completed"] == 3


async def _no_heartbeats(redis: aioredis.Redis, keys: Keys) -> bool:
    return not await status.heartbeats(redis, keys)


async def test_status_shows_each_consumer_processed_rate_and_metrics_port(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """A live consumer's line in ``status`` shows what it processed, its rate and the
    port its /metrics is on, from its heartbeat."""
    port = free_port()
    live = settings.model_copy(
        update={"metrics_port": port, "http_host": "127.0.0.1", "reconcile_interval_s": 0}
    )
    stop = asyncio.Event()
    running = asyncio.create_task(service.consume(live, stop))
    try:
        await enqueue(redis, keys, 3)
        report = await wait_for(lambda: _processed(redis, keys, 3), what="a beat with 3 done")
    finally:
        stop.set()
        await running
    [consumer] = report["consumers"]
    beat = consumer["heartbeat"]
    assert (beat["processed"], beat["metrics_port"]) == (3, port)
    assert beat["rate_per_s"] > 0
    [line] = [line for line in status.render(report).splitlines() if "test-consumer" in line]
    flat = " ".join(line.split())
    assert "processed 3" in flat
    assert f"{beat['rate_per_s']:.2f}/s" in flat
    assert f"metrics {beat['host']}:{port}" in flat


async def _processed(redis: aioredis.Redis, keys: Keys, count: int) -> dict[str, Any] | None:
    report = await status.collect(redis, keys)
    beats = [c["heartbeat"] for c in report["consumers"] if c["heartbeat"]]
    return report if beats and beats[0]["processed"] == count else None


async def test_oldest_waiting_is_the_oldest_pending_else_the_oldest_undelivered(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """With nothing waiting it is None; with lag it is the first entry after the last
    delivered one; once that is read, the same entry as pending; its age is since its id."""
    assert (await status.collect(redis, keys))["oldest_waiting"] is None
    ids = [str(await redis.xadd(keys.stream, {"v": "1", "n": str(n)})) for n in range(3)]
    assert (await status.collect(redis, keys))["oldest_waiting"]["id"] == ids[0]
    await redis.xgroup_create(keys.stream, keys.group, id="0")
    await redis.xreadgroup(keys.group, "c1", {keys.stream: ">"}, count=1)
    await redis.xack(keys.stream, keys.group, ids[0])
    await redis.xdel(keys.stream, ids[0])

    undelivered = (await status.collect(redis, keys))["oldest_waiting"]
    assert (undelivered["id"], undelivered["delivered"]) == (ids[1], False)
    await redis.xreadgroup(keys.group, "c1", {keys.stream: ">"}, count=1)
    report = await status.collect(redis, keys)
    pending = report["oldest_waiting"]
    assert (pending["id"], pending["delivered"]) == (ids[1], True)
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    assert 0 <= pending["age_ms"] <= now_ms - int(ids[1].split("-")[0])
    assert f"oldest waiting {ids[1]}" in status.render(report)


async def test_status_watch_redraws_in_place(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``status --watch`` clears the screen and redraws each frame; with --json it writes
    one document per line."""
    await build_state(redis, keys)
    env = environment(settings)
    shown = await streamrec("status", "--watch", "0.05", "--count", "3", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    frames = shown.stdout.split(status.CLEAR)
    assert frames[0] == ""
    assert len(frames) == 4
    for frame in frames[1:]:
        assert f"length {LENGTH}" in " ".join(frame.split())
    lines = await streamrec(
        "status", "--json", "--watch", "0.05", "--count", "2", env=env, cwd=tmp_path
    )
    assert lines.returncode == 0, lines.stderr
    documents = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [d["length"] for d in documents] == [LENGTH, LENGTH]


def watch_in_background(
    settings: Settings, cwd: Path, out: Path, err: Path
) -> subprocess.Popen[bytes]:
    """Start ``status --watch 0.1`` writing to ``out`` and ``err``."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "streamrec", "status", "--watch", "0.1"],
            env=environment(settings),
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
        )


async def test_status_watch_stops_cleanly_on_ctrl_c(
    settings: Settings, tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """SIGINT (Ctrl-C) ends ``status --watch`` with exit 0 and no traceback."""
    out, err = tmp_path / "out", tmp_path / "err"
    watching = watch_in_background(settings, tmp_path, out, err)
    children.append(watching)
    await wait_for(lambda: out.read_text().count(status.CLEAR) >= 2, what="two frames drawn")
    watching.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(watching.wait, 10) == 0
    assert "Traceback" not in err.read_text()


# Four partitions. Each partition's entries get ids of their own choosing (their
# order across partitions is what the aggregation is about) and the pending ones
# an idle time set by XCLAIM, so the state is the same whenever the test runs.
PARTS = 4
STREAMS = {0: ["10-1", "10-2", "10-3"], 2: ["5-1", "5-2"], 3: ["20-1", "20-2", "20-3", "20-4"]}
READ = {0: [("c1", 2, 30_000)], 3: [("c1", 1, 90_000), ("c2", 2, 1_000)]}
"""Per partition: (consumer, entries it reads, the idle time they are given)."""
DEAD_IDS = {2: ["7-0"], 3: ["6-0", "8-0"]}
PARKED_BUSINESS = "b7"


@asynccontextmanager
async def partitioned(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Layout]:
    """PARTS partitions of ``keys``'s namespace, their keys deleted on the way out (the
    ``redis`` fixture deletes only the namespace's own tag)."""
    yield Layout(keys.namespace, PARTS)
    async for key in redis.scan_iter(match=f"{{{keys.namespace}:*}}:*", count=1000):
        await redis.delete(key)


@pytest_asyncio.fixture(loop_scope="session")
async def layout(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Layout]:
    """Four partitions of this test's namespace."""
    async with partitioned(redis, keys) as made:
        yield made


def dead_fields(n: int, business: str = "9") -> dict[str, str]:
    """A dead letter's fields as a consumer writes them: the entry's, then its failure."""
    return {
        "v": "1", "recording_sid": f"RE{n:032x}", "business_id": business,
        "error": f"PermanentError: {n}", "attempts": "1", "origin_id": f"1-{n}",
        "consumer": "c1", "failed_at": "1700000000000",
    }  # fmt: skip


async def build_partitions(redis: aioredis.Redis, layout: Layout) -> None:
    """STREAMS, READ and DEAD_IDS on the partitions, partition 1 left without a stream,
    two entries of PARKED_BUSINESS parked, a limit of business b9 set, c1 beating."""
    for index, ids in STREAMS.items():
        keys = layout.partitions[index]
        await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
        for entry_id in ids:
            await redis.xadd(keys.stream, {"v": "1", "n": entry_id}, id=entry_id)
        for consumer, count, idle in READ.get(index, []):
            read: Any = await redis.xreadgroup(
                keys.group, consumer, {keys.stream: ">"}, count=count
            )
            held: list[Any] = [entry_id for entry_id, _ in read[0][1]]
            await redis.xclaim(keys.stream, keys.group, consumer, 0, held, idle=idle)
    for index, ids in DEAD_IDS.items():
        for n, entry_id in enumerate(ids):
            dead = layout.partitions[index].dead
            await redis.xadd(dead, dead_fields(n), id=entry_id)  # type: ignore[arg-type]
    parked = layout.of(PARKED_BUSINESS)
    await redis.sadd(parked.slot_businesses, PARKED_BUSINESS)
    await redis.rpush(parked.parked(PARKED_BUSINESS), "{}", "{}")
    await semaphore.Slots(redis, layout.of("b9"), default_limit=3).set_limit("b9", 5)
    await monitor_of(redis, layout, "c1").tick()


async def test_collect_sums_the_partitions_and_lists_each(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """The figures are over all partitions (lengths, lag, pending and dead letters summed,
    the oldest pending and oldest waiting entries the oldest of any, each consumer's
    holdings summed) and ``partitions`` has each one's own."""
    await build_partitions(redis, layout)
    report = await status.collect(redis, layout, default_slots=3)
    assert report["stream"] == f"{{{layout.namespace}:*}}:recordings"
    assert (report["length"], report["pending"], report["lag"]) == (9, 5, 1 + 2 + 1)
    assert (report["dead_letters"], report["parked"]) == (3, 2)
    assert report["last_delivered_id"] == "20-3"
    assert report["oldest_pending_id"] == "20-1"
    assert report["oldest_pending_idle_ms"] >= 90_000
    waiting = report["oldest_waiting"]
    assert (waiting["id"], waiting["delivered"], waiting["partition"]) == ("5-1", False, 2)

    by_name = {c["name"]: c for c in report["consumers"]}
    assert (by_name["c1"]["pending"], by_name["c2"]["pending"]) == (3, 2)
    assert by_name["c1"]["oldest_pending_idle_ms"] >= 90_000
    assert by_name["c1"]["heartbeat"]["name"] == "c1"
    assert by_name["c2"]["heartbeat"] is None
    limits = {b["business_id"]: (b["limit"], b["parked"]) for b in report["businesses"]}
    assert limits == {PARKED_BUSINESS: (3, 2), "b9": (5, 0)}

    parts = report["partitions"]
    assert [p["index"] for p in parts] == list(range(PARTS))
    assert [p["stream"] for p in parts] == [k.stream for k in layout]
    assert [p["tag"] for p in parts] == [k.tag for k in layout]
    figures = [(p["length"], p["lag"], p["pending"], p["dead_letters"]) for p in parts]
    assert figures == [(3, 1, 2, 0), (0, None, 0, 0), (2, 2, 0, 1), (4, 1, 3, 2)]
    assert [p["oldest_pending_id"] for p in parts] == ["10-1", None, None, "20-1"]
    assert 30_000 <= parts[0]["oldest_pending_idle_ms"] < parts[3]["oldest_pending_idle_ms"]
    parked = layout.of(PARKED_BUSINESS).partition
    assert [p["parked"] for p in parts] == [2 if i == parked else 0 for i in range(PARTS)]


async def test_collect_without_detail_has_the_partitions_figures(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """What the monitor samples (detail=False) has the same sums and partition figures,
    parked left unread."""
    await build_partitions(redis, layout)
    full = await status.collect(redis, layout)
    brief = await status.collect(redis, layout, detail=False)
    assert {k: brief[k] for k in GROUP_FIGURES} == {k: full[k] for k in GROUP_FIGURES}
    assert [p["parked"] for p in brief["partitions"]] == [None] * PARTS
    assert without_clock(brief)["partitions"] == [
        {**p, "parked": None} for p in without_clock(full)["partitions"]
    ]


async def test_one_partition_lists_itself_with_the_same_figures(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """With one partition, ``partitions`` has one element carrying the top-level figures,
    and the text has no partition table."""
    await build_state(redis, keys)
    report = await status.collect(redis, Layout(keys.namespace))
    [part] = report["partitions"]
    assert (part["index"], part["tag"], part["stream"]) == (0, keys.namespace, keys.stream)
    for name in ("length", "lag", "pending", "dead_letters", "oldest_pending_id"):
        assert part[name] == report[name], name
    assert report["oldest_waiting"]["partition"] == 0
    assert "partition" not in status.render(report)


async def test_render_shows_a_table_of_the_partitions(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """With more than one partition the text has a line per partition with its figures."""
    await build_partitions(redis, layout)
    text = status.render(await status.collect(redis, layout))
    assert f"({PARTS} partitions)" in text
    rows = {
        line.split()[1]: line.split()
        for line in text.splitlines()
        if line.split() and line.split()[0].isdigit() and len(line.split()) > 2
    }
    assert list(rows) == [k.stream for k in layout]
    assert rows[layout.partitions[3].stream][2:5] == ["4", "1", "3"]
    assert rows[layout.partitions[1].stream][2:5] == ["0", "-", "0"]
    assert "oldest waiting 5-1 in partition 2" in text


async def test_status_json_with_partitions_equals_collect(
    redis: aioredis.Redis, layout: Layout, settings: Settings, tmp_path: Path
) -> None:
    """``status --json`` with STREAMREC_PARTITIONS=4 prints the document collect() returns,
    and records no partition count (it only reads)."""
    await build_partitions(redis, layout)
    env = environment(settings, STREAMREC_PARTITIONS=str(PARTS))
    finished = await streamrec("status", "--json", env=env, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    printed = json.loads(finished.stdout)
    expected = await status.collect(redis, layout)
    assert without_clock(printed) == without_clock(expected)
    assert await redis.get(layout.home.partitions) is None


async def test_status_refuses_a_count_other_than_the_recorded_one(
    redis: aioredis.Redis, layout: Layout, settings: Settings, tmp_path: Path
) -> None:
    """With 4 partitions recorded, ``status`` configured for 1 exits 2 saying both counts."""
    await redis.set(layout.home.partitions, PARTS)
    finished = await streamrec("status", env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 2
    assert f"STREAMREC_PARTITIONS is 1, but namespace {layout.namespace!r} has 4" in (
        finished.stderr
    )
    assert finished.stdout == ""


async def test_the_operations_reads_work_on_a_redis_cluster(redis_cluster: LocalCluster) -> None:
    """On a Redis Cluster, whose primaries hold different partitions, ``status``, ``check``
    and the dead-letter operations give what they give on one server: each call keeps
    to one partition's keys (or the deployment-wide ones)."""
    cluster = redis_client(redis_cluster.seed_url, cluster=True)
    layout = Layout(f"t{uuid.uuid4().hex[:12]}", PARTS)
    try:
        assert len({redis_cluster.primary_for(part.stream).port for part in layout}) > 1
        await build_partitions(cluster, layout)
        report = await status.collect(cluster, layout, default_slots=3)
        assert (report["length"], report["pending"], report["lag"]) == (9, 5, 4)
        assert (report["dead_letters"], report["parked"]) == (3, 2)
        assert report["oldest_waiting"]["id"] == "5-1"
        assert report["redis"]["address"] in {n.url.split("/")[2] for n in redis_cluster.nodes}
        assert "partition" in status.render(report)
        assert await health.check(cluster, layout) == (True, "ok: fresh heartbeat from c1")
        listed = await deadletters.listing(cluster, layout)
        assert [d.ref for d in listed] == ["3/6-0", "2/7-0", "3/8-0"]
        moved = await deadletters.replay_refs(cluster, layout, ["7-0", "3/6-0"])
        assert [(ref, new and new[0]) for ref, new in moved.items()] == [("7-0", 2), ("3/6-0", 3)]
        assert await deadletters.replay_all(cluster, layout) == 1
        assert await deadletters.total(cluster, layout) == 0
        assert [await cluster.xlen(part.stream) for part in layout] == [3, 0, 3, 6]
    finally:
        for part in (*layout, layout.home):
            async for key in cluster.scan_iter(match=f"{{{part.tag or part.namespace}}}:*"):
                await cluster.delete(key)
        await cluster.aclose()
