"""Crashes and signals, with consumers as real processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamrec.keys import Keys
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.processes import spawn_consumer
from tests.standins import MediaStandIn, OpenAIStandIn, enqueue


async def completed(db: Any) -> set[str]:
    return {
        r["recording_sid"]
        for r in await db.fetch("SELECT recording_sid FROM recordings WHERE status = 'completed'")
    }


async def exited(proc: subprocess.Popen[bytes]) -> int:
    code = await asyncio.to_thread(proc.wait, 30)
    return int(code)


async def test_sigkilled_consumer_loses_nothing_and_repeats_no_committed_stage(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """A consumer SIGKILLed mid-job: another finishes its entries, one row each, no rework."""
    # Given 12 recordings, of which 4 get stuck in transcription
    sids = await enqueue(redis, keys, 12)
    held = set(sids[:4])
    openai_api.gate = asyncio.Event()
    openai_api.hold = held
    children.append(spawn_consumer(settings, "victim", tmp_path))
    await wait_for(lambda: set(openai_api.waiting) == held, what="victim stuck in transcription")
    await wait_for(lambda: completed(db), what="first rows")
    await wait_for(
        lambda: _count(completed(db), len(sids) - len(held)), what="the others to complete"
    )
    done_before_kill = await completed(db)
    # When the consumer is killed mid-transcription and another starts
    children[0].send_signal(signal.SIGKILL)
    await exited(children[0])
    openai_api.gate.set()
    children.append(spawn_consumer(settings, "rescuer", tmp_path))
    # Then every recording completes exactly once
    await wait_for(lambda: _count(completed(db), len(sids)), timeout=30, what="all completed")
    assert await db.fetchval("SELECT count(*) FROM recordings") == len(sids)
    assert done_before_kill == set(sids) - held
    for sid in sids:
        assert media.served[sid] == 1, "the download was committed before the kill"
        expected_calls = 2 if sid in held else 1
        assert openai_api.calls[sid] == expected_calls
    await wait_for(lambda: _empty(redis, keys), what="stream drained and nothing pending")


async def test_sigterm_finishes_in_flight_work_and_exits_zero(
    settings: Settings,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """SIGTERM: in-flight recordings complete, the process exits 0, nothing is lost."""
    sids = await enqueue(redis, keys, 20)
    openai_api.gate = asyncio.Event()
    proc = spawn_consumer(settings, "graceful", tmp_path, STREAMREC_CONCURRENCY="4")
    children.append(proc)
    await wait_for(lambda: sum(openai_api.waiting.values()) == 4, what="4 jobs in flight")
    in_flight = set(openai_api.waiting)
    proc.send_signal(signal.SIGTERM)
    openai_api.gate.set()
    assert await exited(proc) == 0
    assert in_flight <= await completed(db)
    assert (await redis.xpending(keys.stream, keys.group))["pending"] == 0
    children.append(spawn_consumer(settings, "next", tmp_path))
    await wait_for(lambda: _count(completed(db), len(sids)), timeout=30, what="the rest")
    assert all(openai_api.calls[sid] == 1 for sid in sids)


async def test_sigterm_past_the_grace_period_leaves_work_for_reclaim(
    settings: Settings,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """Work unfinished when the grace period ends stays pending; the next consumer does it."""
    sids = await enqueue(redis, keys, 3)
    openai_api.gate = asyncio.Event()
    proc = spawn_consumer(settings, "impatient", tmp_path, STREAMREC_SHUTDOWN_GRACE_S="0.1")
    children.append(proc)
    await wait_for(lambda: sum(openai_api.waiting.values()) == 3, what="3 jobs in flight")
    proc.send_signal(signal.SIGTERM)
    assert await exited(proc) == 0
    assert (await redis.xpending(keys.stream, keys.group))["pending"] == 3
    openai_api.gate.set()
    children.append(spawn_consumer(settings, "reclaimer", tmp_path))
    await wait_for(lambda: _count(completed(db), len(sids)), timeout=30, what="reclaimed work")
    await wait_for(lambda: _empty(redis, keys), what="nothing pending")


async def _count(rows: Any, expected: int) -> bool:
    return len(await rows) == expected


async def _empty(redis: aioredis.Redis, keys: Keys) -> bool:
    pending = (await redis.xpending(keys.stream, keys.group))["pending"]
    return pending == 0 and await redis.xlen(keys.stream) == 0


async def test_a_consumer_paused_past_its_claim_stops_before_its_next_stage(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """SIGSTOP a consumer mid-download past its claim: once resumed it transcribes nothing."""
    # Given a consumer frozen while its download is under way
    [sid] = await enqueue(redis, keys, 1, media=media)
    media.gate = asyncio.Event()
    sleeper = spawn_consumer(settings, "sleeper", tmp_path)
    children.append(sleeper)
    await wait_for(lambda: media.in_flight[sid] == 1, what="the sleeper downloading")
    sleeper.send_signal(signal.SIGSTOP)
    media.gate.set()  # its download finishes into a process that does not run
    # When another consumer takes the entry over and completes it
    children.append(spawn_consumer(settings, "rescuer", tmp_path))
    await wait_for(lambda: _count(completed(db), 1), timeout=30, what="the rescuer's row")
    # Then the sleeper, resumed, stops before its next stage
    sleeper.send_signal(signal.SIGCONT)
    log = tmp_path / "sleeper.log"
    await wait_for(lambda: '"work_stopped"' in log.read_text(), what="the sleeper to stop")
    sleeper.send_signal(signal.SIGTERM)
    assert await exited(sleeper) == 0
    assert openai_api.calls[sid] == 1
    assert await db.fetchval("SELECT count(*) FROM recordings") == 1


@pytest.mark.parametrize("twilio_acted", [False, True], ids=["request_lost", "answer_lost"])
async def test_a_consumer_killed_at_its_delete_leaves_it_to_the_next(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
    twilio_acted: bool,
) -> None:
    """SIGKILL during the DELETE after the commit: the next consumer deletes; one took effect."""
    # Given a consumer whose row is completed and whose DELETE is held at Twilio
    [sid] = await enqueue(redis, keys, 1, media=media)
    media.delete_gate = asyncio.Event()
    victim = spawn_consumer(settings, "victim", tmp_path, STREAMREC_DELETE_FROM_TWILIO="true")
    children.append(victim)
    try:
        await wait_for(lambda: media.delete_waiting[sid] == 1, what="the victim's delete")
        assert await completed(db) == {sid}
        # When it is killed there, Twilio having acted on the request or not, and another starts
        victim.send_signal(signal.SIGKILL)
        await exited(victim)
        if twilio_acted:
            media.delete_gate.set()  # the request goes on; its answer finds nobody
            await wait_for(lambda: media.deletes[sid] == 1, what="the victim's delete to act")
        else:
            media.delete_hold = set()  # the victim's request stays held, never acted on
        children.append(
            spawn_consumer(settings, "rescuer", tmp_path, STREAMREC_DELETE_FROM_TWILIO="true")
        )
        # Then the rescuer deletes (or finds it deleted) and records it; nothing is redone
        await wait_for(lambda: _deleted(db, sid), timeout=30, what="deleted_at recorded")
    finally:
        media.delete_gate.set()
    assert (media.delete_requests[sid], media.deletes[sid]) == (2, 1)
    assert (media.served[sid], openai_api.calls[sid]) == (1, 1)
    await wait_for(lambda: _empty(redis, keys), what="stream drained and nothing pending")


async def _deleted(db: Any, sid: str) -> bool:
    query = "SELECT deleted_at IS NOT NULL FROM recordings WHERE recording_sid = $1"
    return bool(await db.fetchval(query, sid))
