"""``status.collect`` and ``status --json`` against a stream whose state the test built."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from streamrec import deadletters, status
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.monitor import Monitor
from streamrec.settings import Settings
from tests.processes import environment, streamrec

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


def monitor_of(redis: aioredis.Redis, keys: Keys, name: str) -> Monitor:
    """A Monitor beside a (never run) Consumer called ``name``; its beat lives 60 s."""
    consumer = Consumer(redis=redis, keys=keys, handler=nothing, config=ConsumerConfig(name=name))
    return Monitor(redis=redis, keys=keys, consumer=consumer, metrics=Metrics(), interval_s=20.0)


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
